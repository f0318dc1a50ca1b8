"""clip-pipeline: the command-line tool for running the pipeline locally and operating a deployed stack."""
