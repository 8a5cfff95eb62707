"""What `diffbox run` and `diffbox chat` show. On a terminal: a live progress bar (stage,
percent, node and step, clip, ETA) and a summary table; otherwise a line per change of stage
or node. The live part and notes go to stderr, results to stdout; `--json` prints one JSON
document on stdout and nothing live."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn
from rich.table import Table

from .download import outputs_of, source_url
from .errors import ClientError, JobFailed
from .exits import EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE
from .job import Job


class RunDisplay:
    def __init__(self, machine: bool) -> None:
        self.machine = machine
        self.err = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False, soft_wrap=True)
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._last_line: tuple[Any, ...] | None = None

    @contextmanager
    def live(self, job: Job) -> Iterator[None]:
        """The progress bar while the job runs (a terminal, not --json)."""
        self.note(f"job {job.id} submitted via {job.transport.name}")
        if self.machine or not self.err.is_terminal:
            yield
            return
        bar = Progress(SpinnerColumn(), TextColumn("{task.fields[stage]:<9}"), BarColumn(),
                       TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[detail]}"),
                       TextColumn("{task.fields[eta]}"), console=self.err)
        with bar:
            self._bar, self._task = bar, bar.add_task("job", total=100, stage="queued", detail="", eta="")
            try:
                yield
                if job.status == "COMPLETED":
                    bar.update(self._task, completed=100, stage="done", detail="", eta="")
            finally:
                self._bar = self._task = None

    def progress(self, update: dict[str, Any]) -> None:
        stage, percent = str(update.get("stage", "")), float(update.get("percent") or 0)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=percent, stage=stage, detail=_detail(update), eta=_eta(update))
        elif not self.machine:
            line = (stage, update.get("node"), update.get("clip"))
            if line != self._last_line:
                self._last_line = line
                self.note(" ".join(p for p in (stage, f"{percent:.0f}%", _detail(update), _eta(update)) if p))

    def summary(self, job: Job, result: dict[str, Any], paths: list[Path]) -> None:
        outputs = outputs_of(result)
        if self.machine:
            self._json({"id": job.id, "status": job.status, "result": _without_inline_data(result),
                        "files": [str(p) for p in paths]})
            return
        names = [paths[i].name if i < len(paths) else str(e.get("filename", "")) for i, e in enumerate(outputs)]
        table = Table(title=f"job {job.id}: {job.status}", title_justify="left")
        # A file's name is never cut short or broken: it is how the user finds the file.
        table.add_column("file", min_width=max(map(len, names), default=4), no_wrap=True)
        for column in ("kind", "size", "media", "sha256"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for index, (name, entry) in enumerate(zip(names, outputs, strict=True)):
            sha = str(entry.get("sha256", ""))[:12]
            table.add_row(name, str(entry.get("kind", "")), decimal(int(entry.get("bytes") or 0)), _media(entry),
                          f"{sha}… ok" if index < len(paths) and sha else sha)
        self.out.print(table)
        if paths:
            self.out.print(f"saved in {paths[0].parent.resolve()}", markup=False)
        facts: dict[str, Any] = {k: result[k] for k in ("workflow", "seed", "preset", "steps") if k in result}
        if facts:
            self.out.print("  ".join(f"{k}: {v}" for k, v in facts.items()), markup=False)
        if isinstance(timings := result.get("timings"), dict) and timings:
            # The worker's own figures: inputs_s, queue_s, inference_s, upload_s, total_s, ...
            self.out.print("timings: " + "  ".join(f"{k.removesuffix('_s')} {v} s" for k, v in timings.items()),
                           markup=False)

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def chat_done(self, job: Job, result: dict[str, Any], streamed: bool) -> None:
        if self.machine:
            self._json({"id": job.id, "status": job.status, "result": result})
            return
        if not streamed:
            self.write(str(result.get("text", json.dumps(result))))
        self.write("\n")
        usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens") if usage else None
        self.note(", ".join(str(p) for p in (result.get("finish_reason"), tokens and f"{tokens} tokens") if p))

    def refused(self, err: Exception) -> int:
        """A request refused before it was sent (or arguments that make none)."""
        message = err.message if isinstance(err, JobFailed) else str(err)
        if self.machine:
            self._json({"status": "REFUSED", "error": _error(err)})
        else:
            self.err.print(f"error: {message}", markup=False, style="red")
        return EXIT_USAGE

    def failed(self, job: Job | None, err: ClientError) -> int:
        if self.machine:
            self._json({"id": job.id if job else None, "status": job.status if job else None, "error": _error(err)})
            return EXIT_FAILED
        where = f"job {job.id} " if job else ""
        if isinstance(err, JobFailed):
            self.err.print(f"{where}failed ({err.type}): {err.message}", markup=False, style="red")
            if err.details is not None:
                self.err.print(json.dumps(err.details, indent=1, ensure_ascii=False), markup=False)
        else:
            self.err.print(f"{where}error: {err}", markup=False, style="red")
        return EXIT_FAILED

    def timed_out(self, job: Job) -> int:
        self.note(f"job {job.id} is still {job.status} after --timeout; it goes on")
        if self.machine:
            self._json({"id": job.id, "status": job.status})
        return EXIT_TIMEOUT

    def note(self, text: str) -> None:
        self.err.print(text, markup=False, style="dim")

    def _json(self, document: dict[str, Any]) -> None:
        print(json.dumps(document, ensure_ascii=False))


def _detail(update: dict[str, Any]) -> str:
    parts = [str(update["node"])] if update.get("node") else []
    if update.get("step") is not None and update.get("steps"):
        parts.append(f"step {update['step']}/{update['steps']}")
    if update.get("clip") is not None and update.get("clips"):
        parts.append(f"clip {update['clip']}/{update['clips']}")
    if update.get("bytes") is not None:
        total = f"/{update['total'] / 1e6:.1f}" if update.get("total") else ""
        parts.append(f"{update['bytes'] / 1e6:.1f}{total} MB")
    return " ".join(parts)


def _eta(update: dict[str, Any]) -> str:
    eta = update.get("eta_s")
    return f"ETA {_duration(float(eta))}" if isinstance(eta, int | float) else ""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _media(entry: dict[str, Any]) -> str:
    parts = []
    if entry.get("width") and entry.get("height"):
        parts.append(f"{entry['width']}x{entry['height']}")
    if entry.get("frames"):
        parts.append(f"{entry['frames']} frames")
    if entry.get("duration_s"):
        parts.append(f"{entry['duration_s']} s")
    if entry.get("clip"):
        parts.append(f"clip {entry['clip']}")
    return ", ".join(parts)


def _without_inline_data(result: dict[str, Any]) -> dict[str, Any]:
    """The result without base64 data (saved to files instead); URLs stay."""
    out = dict(result)
    for key in ("outputs", "images"):
        if isinstance(out.get(key), list):
            out[key] = [{k: v for k, v in e.items() if k != "data" or source_url(e) == v} if isinstance(e, dict)
                        else e for e in out[key]]
    return out


def _error(err: Exception) -> dict[str, Any]:
    return err.to_dict() if isinstance(err, JobFailed) else {"type": "client", "message": str(err)}
