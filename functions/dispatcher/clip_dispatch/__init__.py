"""From uploaded objects to Batch jobs: admission (is it an image we embed?) and submission (manifest,
SubmitJob, job record). The dispatcher function runs it for each SQS batch; the CLI's backfill and
retry run the same code for objects S3 events never announced or that failed."""
