"""LoRAs a request brings: named by source (hf://, https://, s3://), fetched at request time,
checked before ComfyUI sees a byte, and cached on the models volume by content.

request.py (the request's entries and their sources), header.py (the safetensors check),
cache.py (the content-addressed cache, its locks and budget), sources.py (one fetcher per
kind of source), fetch.py (a job's LoRAs: cache or download, pinned while the job runs).
"""
