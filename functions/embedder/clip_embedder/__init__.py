"""The Lambda lane: the embedding function (clip_embedder.app)."""
