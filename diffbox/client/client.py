"""`Client`: jobs on a diffbox endpoint, from Python."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from ..errors import JobError
from ..workflows import parse
from .errors import InvalidRequest
from .job import Job
from .transports import Transport, connect
from .uploads import Uploader, UploadMode, attach_local_files, uploader

Request = Mapping[str, Any] | BaseModel


class Client:
    """Jobs on one endpoint::

        client = Client("abc123")                  # a RunPod endpoint id (RUNPOD_API_KEY)
        client = Client("https://...modal.run")    # any base URL with RunPod's API (DIFFBOX_API_KEY)
        client = Client("modal:diffbox/Worker")    # a Modal deployment, through Modal's client
        job = client.submit({"workflow": "i2v", "image": "cat.jpg", "prompt": "a cat walks"})
        for update in job.progress():
            print(update["stage"], update["percent"])
        paths = job.download("out")

    `endpoint` defaults to DIFFBOX_ENDPOINT. Requests are dicts (or the worker's own request
    models) and are validated here as the worker validates them, so a bad one raises
    InvalidRequest before anything is sent. Local files in image fields are sent inline, or
    through the S3 store of DIFFBOX_S3_* when it is set (`upload`: see `uploads.uploader`).
    """

    def __init__(self, endpoint: str | Transport | None = None, *, api_key: str | None = None,
                 poll_s: float = 1.0, upload: UploadMode | Uploader = "auto") -> None:
        endpoint = endpoint if endpoint is not None else os.environ.get("DIFFBOX_ENDPOINT")
        if not endpoint:
            raise ValueError("no endpoint: give a RunPod endpoint id, a URL or modal:APP/CLASS "
                             "(or set DIFFBOX_ENDPOINT)")
        self.transport = connect(endpoint, api_key) if isinstance(endpoint, str) else endpoint
        self.poll_s = poll_s
        self._upload = upload
        self._uploader: Uploader | None = None

    def prepare(self, request: Request) -> dict[str, Any]:
        """The request as it will be sent: local files attached, and validated."""
        if isinstance(request, BaseModel):
            payload = request.model_dump(mode="json", exclude_unset=True)
        else:
            payload = dict(request)
        # Through a lambda: the uploader (an S3 client, perhaps) is made only for a local file.
        payload = attach_local_files(payload, lambda path: self.uploader(path))
        try:
            parse(payload)
        except JobError as err:
            raise InvalidRequest(err.type, err.message, err.details) from None
        limit = self.transport.max_request_bytes
        if limit is not None and (size := len(json.dumps(payload))) > limit:
            raise InvalidRequest("validation", f"the request is {size / 1e6:.1f} MB, above the {limit / 1e6:g} MB "
                                 "a RunPod endpoint accepts: send large inputs as URLs, or set DIFFBOX_S3_* so "
                                 "local files go to S3")
        return payload

    def submit(self, request: Request) -> Job:
        return Job(self.transport, self.transport.submit(self.prepare(request)), self.poll_s)

    def run(self, request: Request, timeout: float | None = None) -> dict[str, Any]:
        """Submit and wait: the result, or JobFailed."""
        return self.submit(request).result(timeout)

    def job(self, job_id: str) -> Job:
        """A job submitted earlier (by id)."""
        return Job(self.transport, job_id, self.poll_s)

    @property
    def uploader(self) -> Uploader:
        if self._uploader is None:
            self._uploader = self._upload if callable(self._upload) else uploader(self._upload)
        return self._uploader
