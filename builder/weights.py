"""Weights: which files a set of workflows needs, fetching them into ComfyUI's folder layout,
and checking what is on disk.

Files come from the Hugging Face Hub at the manifest's revisions. A file is fetched into
`{dest}/{folder}/{name}.{etag}.incomplete` and renamed into place only once its size and
hash are right, so ComfyUI (which lists only model extensions) never sees a partial file and
an interrupted run resumes where it stopped. huggingface_hub's own `hf_hub_download` can't be
used for that: it deletes its partial file when a download fails.
"""

from __future__ import annotations

import glob
import hashlib
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO
from urllib.parse import urlsplit

from huggingface_hub import get_hf_file_metadata, hf_hub_url, snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.file_download import http_get
from huggingface_hub.utils._headers import build_hf_headers
from huggingface_hub.utils.tqdm import silent_tqdm

from diffbox.model_paths import chat_model_dir
from diffbox.workflows.manifest import Manifest, ModelFile

from . import BuildError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 16 << 20


def model_sets(manifest: Manifest, workflows: Iterable[str]) -> list[str]:
    """The manifest's model sets for workflow names: `qwen_edit` means every variant
    (`qwen_edit:2511`, `qwen_edit:2509`); `qwen_edit:2511` only that one."""
    chosen: dict[str, None] = {}
    for name in workflows:
        matches = [s for s in manifest.workflows if s == name or s.startswith(name + ":")]
        if not matches:
            raise BuildError(f"unknown workflow {name!r}; the manifest has {', '.join(manifest.workflows)}")
        chosen.update(dict.fromkeys(matches))
    return list(chosen)


def select(manifest: Manifest, workflows: Iterable[str] | None, presets: Iterable[str] | None) -> list[ModelFile]:
    """Every file the workflows need with the presets (None: all of either), each once."""
    sets = list(manifest.workflows) if workflows is None else model_sets(manifest, workflows)
    wanted = None if presets is None else list(presets)
    files: dict[str, ModelFile] = {}
    for model_set in sets:
        available = manifest.workflows[model_set]
        for preset in available if wanted is None else wanted:
            if preset not in available:
                raise BuildError(f"{model_set} has no preset {preset!r}; it has {', '.join(available)}")
            files.update((f.key, f) for f in manifest.required(model_set, preset))
    where: dict[str, str] = {}
    for f in files.values():
        spot = f"{f.folder}/{f.name}"
        if spot in where:
            raise BuildError(f"manifest entries {where[spot]!r} and {f.key!r} both land at {spot}")
        where[spot] = f.key
    return list(files.values())


def parse_repo_ref(value: str) -> tuple[str, str]:
    """`org/name@revision` (the revision defaults to main) as (repo, revision)."""
    repo, _, revision = value.partition("@")
    if repo.count("/") != 1:
        raise BuildError(f"--chat-model {value!r}: expected ORG/NAME[@REVISION]")
    return repo, revision or "main"


# -- download -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    file: ModelFile
    status: Literal["present", "downloaded", "failed"]
    detail: str = ""
    seconds: float = 0.0


def partial_path(final: Path, etag: str) -> Path:
    """Where a file is fetched before it is complete; named by the remote version (its ETag)
    so a partial file is only ever resumed from the same bytes."""
    tag = re.sub(r"[^0-9A-Za-z]", "", etag)[:16] or "unknown"
    return final.with_name(f"{final.name}.{tag}.incomplete")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Progress:
    """One line of bytes for all parallel downloads, fed by the sizes of the files on disk
    (so it needs no hook into huggingface_hub's transfer loop). Redrawn in place on a
    terminal; a line every 30 s in a build log."""

    def __init__(self, total: int, out: TextIO = sys.stderr) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.done = 0
        self.active: dict[str, Path] = {}
        self.lock = threading.Lock()
        self.t0 = self.last_line = time.monotonic()
        # Files found complete count towards the total but not the rate.
        self.skipped = 0

    def start(self, key: str, path: Path) -> None:
        with self.lock:
            self.active[key] = path

    def finish(self, key: str, size: int, skipped: bool = False) -> None:
        with self.lock:
            self.active.pop(key, None)
            self.done += size
            self.skipped += size if skipped else 0

    def refresh(self, force: bool = False) -> None:
        with self.lock:
            current = self.done + sum(p.stat().st_size for p in self.active.values() if p.exists())
            now = time.monotonic()
            if not (self.tty or force or now - self.last_line >= 30):
                return
            self.last_line = now
            rate = (current - self.skipped) / max(now - self.t0, 1e-3)
            left = f", {(self.total - current) / rate:.0f} s left" if rate > 0 and current < self.total else ""
            line = (f"weights: {human_size(current)} of {human_size(self.total)}, "
                    f"{human_size(rate)}/s{left}")
            self.out.write(f"\r{line}\033[K" if self.tty else line + "\n")
            self.out.flush()

    def say(self, line: str) -> None:
        with self.lock:
            self.out.write(("\r\033[K" if self.tty else "") + line + "\n")
            self.out.flush()


def _describe_http_error(exc: HfHubHTTPError) -> str:
    status = exc.response.status_code if exc.response is not None else None
    reason = {401: "unauthorised (gated or private: set HF_TOKEN)", 403: "forbidden (accept the licence, set HF_TOKEN)",
              404: "not found"}.get(status or 0, "request failed")
    return f"HTTP {status}: {reason}"


def _fetch(file: ModelFile, dest: Path, token: str | None, endpoint: str | None, progress: _Progress) -> Outcome:
    t0 = time.monotonic()
    final = file.local_path(dest)
    # A final file only ever appears complete (downloads go to a partial first), so without a
    # known size its presence is enough.
    if final.is_file() and file.size in (None, final.stat().st_size):
        progress.finish(file.key, final.stat().st_size, skipped=True)
        return Outcome(file, "present")
    url = hf_hub_url(file.repo, file.path, revision=file.revision, endpoint=endpoint)
    headers = build_hf_headers(token=token)
    try:
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=True)
    except HfHubHTTPError as exc:
        return Outcome(file, "failed", _describe_http_error(exc))
    if meta.size is not None and file.size is not None and meta.size != file.size:
        return Outcome(file, "failed", f"the manifest says {file.size} bytes, the Hub has {meta.size} "
                                       f"(commit {meta.commit_hash}): fix the manifest's size or revision")
    size = file.size if file.size is not None else meta.size
    etag = meta.etag or ""
    expected_sha = file.sha256 or (etag if _SHA256.fullmatch(etag) else None)
    partial = partial_path(final, etag)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{glob.escape(final.name)}.*.incomplete"):
        if stale != partial:
            stale.unlink()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        # A signed CDN URL; the Hub token is not for that host (huggingface_hub does the same).
        headers.pop("authorization", None)
    progress.start(file.key, partial)
    fetched = 0
    try:
        with partial.open("ab") as f:
            done = f.tell()
            if size is not None and done > size:
                f.truncate(0)
                done = 0
            http_get(meta.location, f, resume_size=done, headers=headers, expected_size=size,
                     displayed_filename=file.name, tqdm_class=silent_tqdm)
        if expected_sha and (actual := sha256_file(partial)) != expected_sha:
            partial.unlink()
            return Outcome(file, "failed", f"sha256 mismatch: expected {expected_sha}, got {actual}")
        partial.replace(final)
        fetched = final.stat().st_size
    except HfHubHTTPError as exc:
        return Outcome(file, "failed", _describe_http_error(exc))
    except OSError as exc:
        return Outcome(file, "failed", str(exc).splitlines()[0])
    finally:
        progress.finish(file.key, fetched)
    return Outcome(file, "downloaded", seconds=time.monotonic() - t0)


def _fetch_or_fail(file: ModelFile, dest: Path, token: str | None, endpoint: str | None,
                   progress: _Progress) -> Outcome:
    try:
        return _fetch(file, dest, token, endpoint, progress)
    except Exception as exc:
        # A network failure that outlasted huggingface_hub's retries fails this file, not the run.
        return Outcome(file, "failed", f"{type(exc).__name__}: {exc}".splitlines()[0])


def download(
    files: list[ModelFile], dest: Path, *, workers: int = 4, token: str | None = None, endpoint: str | None = None
) -> list[Outcome]:
    """Fetch every file not already complete under `dest`, `workers` at a time; one failure
    does not stop the others."""
    progress = _Progress(sum(f.size or 0 for f in files))
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fetch") as pool:
        pending = {pool.submit(_fetch_or_fail, f, dest, token, endpoint, progress) for f in files}
        ticker = threading.Event()
        watcher = threading.Thread(target=_tick, args=(progress, ticker), daemon=True)
        watcher.start()
        try:
            for future in as_completed(pending):
                outcome = future.result()
                outcomes.append(outcome)
                progress.say(_outcome_line(outcome))
        finally:
            ticker.set()
            watcher.join()
            progress.refresh(force=True)
            if progress.tty:
                progress.out.write("\n")
    order = {f.key: i for i, f in enumerate(files)}
    return sorted(outcomes, key=lambda o: order[o.file.key])


def _tick(progress: _Progress, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        progress.refresh()


def _outcome_line(outcome: Outcome) -> str:
    where = f"{outcome.file.folder}/{outcome.file.name}"
    if outcome.status == "failed":
        return f"FAILED  {where}: {outcome.file.repo}@{outcome.file.revision} {outcome.file.path}: {outcome.detail}"
    if outcome.status == "present":
        return f"present {where}"
    if outcome.file.size is None:
        return f"fetched {where} ({outcome.seconds:.0f} s)"
    rate = outcome.file.size / outcome.seconds / 1e6 if outcome.seconds else 0.0
    return f"fetched {where} ({human_size(outcome.file.size)}, {outcome.seconds:.0f} s, {rate:.0f} MB/s)"


def download_chat_model(
    repo: str, revision: str, dest: Path, *, workers: int = 4, token: str | None = None, endpoint: str | None = None
) -> Path:
    """A vLLM model as a whole snapshot, at `chat_model_dir(dest, repo)` (vLLM's `--model`)."""
    target = chat_model_dir(dest, repo)
    snapshot_download(repo, revision=revision, local_dir=target, token=token, endpoint=endpoint, max_workers=workers)
    return target


# -- verify -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    file: ModelFile
    status: Literal["ok", "missing", "wrong size", "sha256 mismatch"]
    actual_size: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def verify(files: list[ModelFile], dest: Path, *, hashes: bool = True) -> Iterator[Check]:
    """Presence, size and (where the manifest has one, and `hashes`) sha256 of each file."""
    for f in files:
        path = f.local_path(dest)
        if not path.is_file():
            partials = list(path.parent.glob(f"{glob.escape(path.name)}.*.incomplete")) if path.parent.is_dir() else []
            yield Check(f, "missing", None, "partial download present" if partials else "")
            continue
        size = path.stat().st_size
        if f.size is not None and size != f.size:
            yield Check(f, "wrong size", size)
        elif not hashes or f.sha256 is None:
            yield Check(f, "ok", size, "size only" if f.sha256 is None else "hash not checked")
        elif (actual := sha256_file(path)) != f.sha256:
            yield Check(f, "sha256 mismatch", size, f"got {actual}")
        else:
            yield Check(f, "ok", size, "sha256")


# -- output -------------------------------------------------------------------------------


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
