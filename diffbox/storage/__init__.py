"""Where a job's outputs go: described (`outputs`, `mp4`), then stored inline or in S3 (`stores`, `s3`)."""
