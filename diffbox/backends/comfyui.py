"""ComfyUI's HTTP API: upload, queue, history, interrupt, files.

A thin typed client over `requests`; the WebSocket side of a job lives in `comfyui_job.py`.
Every call has a timeout, and every answer a user could have caused becomes a `JobError`
that names the node or the file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from .. import logs
from ..errors import JobError, backend, validation

log = logs.get("comfyui")
HTTP_TIMEOUT_S = 30.0
OUTPUT_KEYS = ("images", "gifs", "videos", "audio")


@dataclass(frozen=True)
class FileRef:
    """An output file as ComfyUI names it in `/history` or an `executed` message."""

    node: str
    filename: str
    subfolder: str
    type: str
    animated: bool = False


def output_files(node: str, output: dict[str, Any]) -> list[FileRef]:
    """Every file one node's output lists, under any of ComfyUI's output keys."""
    animated = any(output.get("animated") or [])
    refs = []
    for key in OUTPUT_KEYS:
        for item in output.get(key) or []:
            if isinstance(item, dict) and "filename" in item:
                refs.append(
                    FileRef(
                        node=node,
                        filename=str(item["filename"]),
                        subfolder=str(item.get("subfolder", "")),
                        type=str(item.get("type", "output")),
                        animated=animated or key in ("gifs", "videos"),
                    )
                )
    return refs


class ComfyClient:
    def __init__(self, base_url: str, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = session or requests.Session()

    @property
    def ws_url(self) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urlunsplit((scheme, parts.netloc, parts.path + "/ws", "", ""))

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def probe(self) -> bool:
        try:
            return self.http.get(self._url("/system_stats"), timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def upload_image(self, name: str, data: bytes, subfolder: str) -> str:
        """Upload into `subfolder` of ComfyUI's input folder; returns the name LoadImage uses."""
        response = self.http.post(
            self._url("/upload/image"),
            files={"image": (name, data, "application/octet-stream")},
            data={"subfolder": subfolder, "overwrite": "true", "type": "input"},
            timeout=HTTP_TIMEOUT_S,
        )
        if response.status_code != 200:
            raise backend(f"ComfyUI refused the upload of {name!r} (HTTP {response.status_code})")
        body = response.json()
        stored = f"{body.get('subfolder')}/{body.get('name')}" if body.get("subfolder") else body.get("name")
        return str(stored)

    def queue_prompt(self, graph: dict[str, Any], client_id: str, prompt_id: str) -> str:
        # Our own prompt id (ComfyUI takes one): the job knows it even when the answer is lost.
        body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
        response = self.http.post(self._url("/prompt"), json=body, timeout=HTTP_TIMEOUT_S)
        if response.status_code == 200:
            try:
                return str(response.json()["prompt_id"])
            except (ValueError, KeyError):
                raise backend("ComfyUI accepted the prompt but its answer had no prompt_id") from None
        raise prompt_error(response)

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        response = self.http.get(self._url(f"/history/{prompt_id}"), timeout=HTTP_TIMEOUT_S)
        response.raise_for_status()
        entry = response.json().get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def queue(self) -> tuple[list[str], list[str]]:
        """Prompt ids (running, pending)."""
        body = self.http.get(self._url("/queue"), timeout=HTTP_TIMEOUT_S).json()
        return (
            [str(item[1]) for item in body.get("queue_running", [])],
            [str(item[1]) for item in body.get("queue_pending", [])],
        )

    def delete_queued(self, prompt_id: str) -> None:
        self.http.post(self._url("/queue"), json={"delete": [prompt_id]}, timeout=HTTP_TIMEOUT_S)

    def interrupt(self, prompt_id: str) -> None:
        # With a prompt_id ComfyUI interrupts only if that prompt is the one running, so a
        # cancel can never stop another job's prompt.
        self.http.post(self._url("/interrupt"), json={"prompt_id": prompt_id}, timeout=HTTP_TIMEOUT_S)

    def forget(self, prompt_id: str) -> None:
        """Drop the prompt from ComfyUI's in-memory history (it grows for the worker's life)."""
        response = self.http.post(self._url("/history"), json={"delete": [prompt_id]}, timeout=HTTP_TIMEOUT_S)
        # ComfyUI answers an empty 200; anything else did not come from its history route.
        if response.status_code != 200 or response.content:
            raise ValueError(f"ComfyUI answered HTTP {response.status_code} to the history delete")

    def log_entries(self) -> list[tuple[str, str]] | None:
        """ComfyUI's recent log lines as (time, text) (`/internal/logs/raw`); None when it
        serves none (an older or a remote ComfyUI without that route)."""
        try:
            response = self.http.get(self._url("/internal/logs/raw"), timeout=HTTP_TIMEOUT_S)
            response.raise_for_status()
            return [(str(e["t"]), str(e["m"])) for e in response.json()["entries"]]
        except (requests.RequestException, ValueError, KeyError, TypeError):
            return None

    def download(self, ref: FileRef, dest: Path) -> Path:
        """Stream one output file to `dest` (when ComfyUI's folders are not on this disk)."""
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        with self.http.get(self._url("/view"), params=params, stream=True, timeout=HTTP_TIMEOUT_S) as r:
            if r.status_code != 200:
                raise backend(f"ComfyUI could not serve output {ref.filename!r} (HTTP {r.status_code})")
            with dest.open("wb") as f:
                shutil.copyfileobj(r.raw, f, 1 << 20)
        return dest


def prompt_error(response: requests.Response) -> JobError:
    """ComfyUI's answer to a refused prompt, as a value naming the nodes at fault."""
    try:
        body = response.json()
    except ValueError:
        return backend(
            f"ComfyUI answered HTTP {response.status_code} to the prompt",
            {"body": response.text[:500]},
        )
    error = body.get("error") if isinstance(body, dict) else None
    node_errors = body.get("node_errors") if isinstance(body, dict) else None
    if response.status_code != 400 or not isinstance(error, dict):
        return backend(f"ComfyUI answered HTTP {response.status_code} to the prompt", {"body": body})
    parts = []
    for node_id, node in (node_errors or {}).items():
        for err in node.get("errors", []):
            parts.append(
                f"node {node_id} ({node.get('class_type')}): {err.get('message')}"
                + (f" [{err.get('details')}]" if err.get("details") else "")
            )
    message = "; ".join(parts) or f"{error.get('message')}" + (
        f" ({error.get('details')})" if error.get("details") else ""
    )
    return validation(
        f"ComfyUI refused the graph: {message}",
        {"comfyui_error": error, "node_errors": node_errors or {}},
    )
