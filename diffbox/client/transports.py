"""Where jobs go: a RunPod endpoint, any URL that speaks RunPod's API, or a Modal deployment.

Every transport answers in RunPod's envelope, so `Job` needs to know only one:
`status(id)` gives `{"id", "status", "output", "error"}` with RunPod's statuses (IN_QUEUE,
IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT); while a job runs, `output` is its
latest progress payload. `stream(id)` gives `{"status", "stream": [{"output": chunk}]}`, the
chunks produced since the last call.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import requests

from .envelope import Envelope
from .errors import EndpointError, NotSupported

# RunPod refuses /run bodies above 10 MB (DESIGN.md section 3); inline images count.
RUNPOD_MAX_REQUEST_BYTES = 10 * 1000 * 1000
# How long one status request may take. The runpod SDK's local API server runs a /run job
# inside the /status request that first asks for it, so there one request lasts the whole
# job: the worker's own bound (DIFFBOX_JOB_TIMEOUT_S, 3600 s by default) and some margin.
LONG_READ_S = 4000.0
DEFAULT_MODAL_PROGRESS_DICT = "diffbox-progress"


class Transport(Protocol):
    name: str
    # Above this a request is refused before it is sent; None: no limit known.
    max_request_bytes: int | None

    def submit(self, payload: dict[str, Any]) -> str:
        """Queue one job; its id."""
        ...

    def status(self, job_id: str, timeout_s: float | None = None) -> Envelope:
        """The job's status envelope; `timeout_s` bounds the request (None: LONG_READ_S)."""
        ...

    def stream(self, job_id: str, timeout_s: float | None = None) -> Envelope:
        """The chunks since the last call; raises NotSupported where the endpoint cannot stream."""
        ...

    def cancel(self, job_id: str) -> None:
        """Ask the platform to stop the job; raises NotSupported where it cannot."""
        ...


class HttpTransport:
    """RunPod's serverless API under `base_url`: POST /run, /status/{id}, /stream/{id},
    /cancel/{id}. Works with `https://api.runpod.ai/v2/ENDPOINT_ID`, the Modal web endpoint
    (`diffbox.api.http_api`), and the runpod SDK's local API server (`handler.py --rp_serve_api`),
    which takes POST only and has no /cancel."""

    name = "http"
    max_request_bytes: int | None = RUNPOD_MAX_REQUEST_BYTES
    # POST works on every server above; one that says 405 is then asked with GET.
    read_method = "POST"

    def __init__(self, base_url: str, api_key: str | None = None, session: requests.Session | None = None,
                 timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s

    def submit(self, payload: dict[str, Any]) -> str:
        body = self._call("POST", "run", {"input": payload}, self.timeout_s)
        if not isinstance(body.get("id"), str):
            raise EndpointError(f"{self.base_url}/run answered no job id: {_brief(body)}")
        return str(body["id"])

    def status(self, job_id: str, timeout_s: float | None = None) -> Envelope:
        return self._read("status", job_id, timeout_s)

    def stream(self, job_id: str, timeout_s: float | None = None) -> Envelope:
        try:
            body = self._read("stream", job_id, timeout_s)
        except NotSupported:
            raise NotSupported(f"{self.base_url} has no /stream") from None
        # The local API server's answer for a plain (non-generator) handler; the job is still queued.
        if body.get("status") == "FAILED" and "Stream not supported" in str(body.get("error")):
            raise NotSupported(f"{self.base_url} does not stream: its handler is not a generator")
        return body

    def cancel(self, job_id: str) -> None:
        try:
            self._call("POST", f"cancel/{job_id}", None, self.timeout_s)
        except NotSupported:
            raise NotSupported(
                f"{self.base_url} has no /cancel (the runpod SDK's local API server, `--rp_serve_api`, "
                "serves only /run, /runsync, /status and /stream): the job runs to its end") from None

    def _read(self, route: str, job_id: str, timeout_s: float | None) -> Envelope:
        path = f"{route}/{job_id}"
        try:
            return self._call(self.read_method, path, None, timeout_s or LONG_READ_S)
        except _MethodNotAllowed:
            self.read_method = "GET" if self.read_method == "POST" else "POST"
            return self._call(self.read_method, path, None, timeout_s or LONG_READ_S)

    def _send(self, method: str, path: str, body: Any, timeout_s: float) -> requests.Response:
        return self.session.request(method, f"{self.base_url}/{path}", json=body, headers=self.headers,
                                    timeout=(10.0, timeout_s))

    def _call(self, method: str, path: str, body: Any, timeout_s: float) -> Envelope:
        where = f"{method} {self.base_url}/{path}"
        try:
            response = self._send(method, path, body, timeout_s)
        except requests.ReadTimeout:
            # A job's own timeout ran out while the server held the request (the local API
            # server runs the job inside it): the job goes on, as when polling runs out.
            raise TimeoutError(f"{where}: no answer within {timeout_s:g} s") from None
        except requests.RequestException as exc:
            raise EndpointError(f"{where}: {type(exc).__name__}: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        code = response.status_code
        if code == 401:
            raise EndpointError(f"{where}: unauthorized; check the API key (DIFFBOX_API_KEY or RUNPOD_API_KEY)")
        if code == 405:
            raise _MethodNotAllowed(where)
        # FastAPI's answer for a route it does not have (a missing job has an envelope instead).
        if code == 404 and data == {"detail": "Not Found"}:
            raise NotSupported(where)
        if code >= 400 or not isinstance(data, dict):
            raise EndpointError(f"{where}: HTTP {code}: {_brief(data if data is not None else response.text)}")
        return data


class _MethodNotAllowed(NotSupported):
    pass


class RunpodTransport(HttpTransport):
    """A RunPod endpoint by id, through the runpod SDK's `Endpoint` client (its session with
    retries, its `Authorization`, `runpod.endpoint_url_base`); RUNPOD_API_KEY by default."""

    name = "runpod"
    read_method = "GET"  # as the SDK reads /status and /stream

    def __init__(self, endpoint_id: str, api_key: str | None = None, base_url: str | None = None,
                 timeout_s: float = 30.0) -> None:
        import runpod

        try:
            self.endpoint = runpod.Endpoint(endpoint_id, api_key=api_key or os.environ.get("RUNPOD_API_KEY"))
        except RuntimeError as exc:
            raise EndpointError(f"RunPod endpoint {endpoint_id}: {exc} (set RUNPOD_API_KEY)") from None
        client = self.endpoint.rp_client
        if base_url:
            client.endpoint_url_base = base_url.rstrip("/")
        super().__init__(f"{client.endpoint_url_base}/{endpoint_id}", session=client.rp_session, timeout_s=timeout_s)
        self.headers = dict(client.headers)


class ModalTransport:
    """A deployed `modal_app.py`: each job is a spawned `Worker.run` call whose call id is the
    job id, and its progress is read from the app's progress Dict, as the app's web endpoint
    reads it. Modal does not stream a spawned call: chat comes back whole (for tokens as they
    come, call `Worker().stream.remote_gen` with Modal's own client)."""

    name = "modal"
    max_request_bytes: int | None = None

    def __init__(self, app_name: str, class_name: str = "Worker", progress_dict: str | None = None) -> None:
        import modal

        self.modal = modal
        self.worker = modal.Cls.from_name(app_name, class_name)()
        dict_name = progress_dict or os.environ.get("DIFFBOX_MODAL_PROGRESS_DICT") or DEFAULT_MODAL_PROGRESS_DICT
        self.progress = modal.Dict.from_name(dict_name)

    def submit(self, payload: dict[str, Any]) -> str:
        return str(self.worker.run.spawn(payload).object_id)

    def status(self, job_id: str, timeout_s: float | None = None) -> Envelope:
        exception = self.modal.exception
        try:
            result = self.modal.FunctionCall.from_id(job_id).get(timeout=0)
        except (exception.NotFoundError, exception.InvalidError, exception.OutputExpiredError):
            return {"id": job_id, "status": "FAILED", "error": "job not found (unknown id, or its result has expired)"}
        except exception.FunctionTimeoutError:
            return self._unless_cancelled(job_id, {"id": job_id, "status": "TIMED_OUT",
                                                   "error": {"type": "timeout", "message": "the Modal call timed out"}})
        except (TimeoutError, exception.TimeoutError):
            progress = self.progress.get(job_id)
            return self._unless_cancelled(job_id, {"id": job_id, "status": "IN_PROGRESS" if progress else "IN_QUEUE",
                                                   "output": progress})
        except Exception as exc:
            return self._unless_cancelled(job_id, {"id": job_id, "status": "FAILED", "error": {
                "type": "backend", "message": f"the worker's Modal call failed: {type(exc).__name__}: {exc}"}})
        if isinstance(result, dict) and "error" in result:
            return {"id": job_id, "status": "FAILED", "error": result["error"]}
        return {"id": job_id, "status": "COMPLETED", "output": result}

    def stream(self, job_id: str, timeout_s: float | None = None) -> Envelope:
        raise NotSupported("a spawned Modal call is not streamed; its result comes whole")

    def cancel(self, job_id: str) -> None:
        self.modal.FunctionCall.from_id(job_id).cancel()
        # The mark the app's web endpoint reads too: Modal reports a cancelled call as failed.
        self.progress.put(_cancel_key(job_id), True)

    def _unless_cancelled(self, job_id: str, envelope: Envelope) -> Envelope:
        return {"id": job_id, "status": "CANCELLED"} if self.progress.get(_cancel_key(job_id)) else envelope


def _cancel_key(job_id: str) -> str:
    return f"{job_id}/cancelled"


def connect(endpoint: str, api_key: str | None = None) -> Transport:
    """The transport for `endpoint`: `modal:APP/CLASS` (CLASS defaults to Worker), a base URL
    (`http://...`, `https://...`; key from DIFFBOX_API_KEY or RUNPOD_API_KEY), a RunPod
    endpoint id (`runpod:ID` or just `ID`; key from RUNPOD_API_KEY), or `local`: a worker in
    this process, configured by the DIFFBOX_* settings (see local.py)."""
    endpoint = endpoint.strip()
    if endpoint == "local":
        from .local import LocalTransport  # the worker itself: imported only to run one here

        return LocalTransport()
    if endpoint.startswith("modal:"):
        app_name, _, class_name = endpoint.removeprefix("modal:").partition("/")
        if not app_name:
            raise ValueError(f"{endpoint!r}: expected modal:APP/CLASS, e.g. modal:diffbox/Worker")
        return ModalTransport(app_name, class_name or "Worker")
    if endpoint.startswith(("http://", "https://")):
        key = api_key or os.environ.get("DIFFBOX_API_KEY") or os.environ.get("RUNPOD_API_KEY")
        return HttpTransport(endpoint, key)
    endpoint_id = endpoint.removeprefix("runpod:")
    if not endpoint_id or "/" in endpoint_id:
        raise ValueError(f"{endpoint!r}: expected a RunPod endpoint id, a URL or modal:APP/CLASS")
    return RunpodTransport(endpoint_id, api_key)


def _brief(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
