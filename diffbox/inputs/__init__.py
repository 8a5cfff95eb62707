"""What a request brings in: images (base64, data URIs, `s3://`) and the SSRF-safe URL fetcher."""
