"""A client for diffbox endpoints: RunPod endpoints, Modal deployments, and any URL that
serves RunPod's API (the runpod SDK's local server, the Modal web endpoint).

    from diffbox.client import Client, JobFailed
    job = Client("ENDPOINT_ID").submit({"workflow": "i2v", "image": "cat.jpg", "prompt": "a cat walks"})
    for update in job.progress():
        print(update["percent"])
    job.download("out")

`python -m diffbox run` and `python -m diffbox chat` are the same from a terminal (cli.py).
"""

from .client import Client
from .errors import (
    ChecksumMismatch,
    ClientError,
    DownloadError,
    EndpointError,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    NotSupported,
    UploadError,
)
from .job import Job
from .transports import HttpTransport, ModalTransport, RunpodTransport, Transport, connect

__all__ = [
    "ChecksumMismatch",
    "Client",
    "ClientError",
    "DownloadError",
    "EndpointError",
    "HttpTransport",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobFailed",
    "ModalTransport",
    "NotSupported",
    "RunpodTransport",
    "Transport",
    "UploadError",
    "connect",
]
