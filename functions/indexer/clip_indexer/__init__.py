"""The indexer function: the vector store's one writer (see app.py)."""
