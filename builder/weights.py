"""Weights: which files a set of workflows needs, fetching them into ComfyUI's folder layout
with a lock of what was fetched, and checking what is on disk against that lock.

The transfer is huggingface_hub's `hf_hub_download` (redirects, auth, Xet-backed repos,
resuming a dropped connection). Ours is what it does not do: resolve every file first (the
commit a revision names, and the size and sha256 the Hub reports for the content), check the
disk has room, fetch several files at once under one progress line, check the sha256 of the
bytes written, put each file at `{dest}/{folder}/{name}` and record it in the lock.

A file is fetched into `{dest}/.incoming/{key}/` (same filesystem, a folder ComfyUI doesn't
list) and renamed into place only once its hash is right.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from huggingface_hub import constants, get_hf_file_metadata, get_token, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.tqdm import silent_tqdm

from diffbox import model_lock
from diffbox.model_lock import LockedFile, WeightsLock
from diffbox.model_paths import chat_model_dir
from diffbox.workflows.manifest import Manifest, ModelFile

from . import BuildError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 16 << 20
INCOMING = ".incoming"


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_lock(path: Path) -> WeightsLock:
    try:
        return model_lock.read(path)
    except model_lock.LockError as exc:
        raise BuildError(str(exc)) from None


# -- resolve ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    """One file as the Hub reports it at a revision."""

    commit: str
    size: int
    # The content's sha256 for LFS/Xet files (the Hub's X-Linked-Etag); None for small files
    # kept in git, whose ETag is a git blob id.
    sha256: str | None


def describe_hub_error(exc: Exception, repo: str, revision: str) -> str:
    if isinstance(exc, GatedRepoError):
        page = f"{constants.ENDPOINT}/{repo}"
        if get_token() is None:
            return f"{repo} is gated: accept its terms at {page}, then set HF_TOKEN (no token was given)"
        return f"{repo} is gated and the token in HF_TOKEN has no access: accept its terms at {page}"
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision} not found in {repo}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"no such file in {repo} at {revision}"
    if isinstance(exc, RepositoryNotFoundError):
        return f"repository {repo} not found (a private one needs HF_TOKEN)"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} from the Hub"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def resolve(file: ModelFile, revision: str) -> Remote:
    """Ask the Hub (HEAD, as huggingface_hub does before a download) what `revision` of the
    file is: the commit, the size and the sha256 of its content."""
    meta = get_hf_file_metadata(hf_hub_url(file.repo, file.path, revision=revision), retry_on_errors=True)
    if meta.commit_hash is None or meta.size is None:
        raise BuildError(f"{file.repo} {file.path}: the Hub's answer has no commit or size; is HF_ENDPOINT a Hub?")
    etag = meta.etag or ""
    return Remote(meta.commit_hash, meta.size, etag if _SHA256.fullmatch(etag) else None)


# -- download -----------------------------------------------------------------------------


Status = Literal["present", "adopted", "downloaded", "failed", "held"]


@dataclass(frozen=True)
class Outcome:
    file: ModelFile
    status: Status
    detail: str = ""
    seconds: float = 0.0
    size: int = 0


@dataclass
class _Job:
    """One selected file on its way through resolve, plan and fetch."""

    file: ModelFile
    revision: str  # what to ask the Hub for: the manifest's revision, or the locked commit
    pinned: LockedFile | None  # the --locked entry it must match
    remote: Remote | None = None
    outcome: Outcome | None = None
    locked: LockedFile | None = None  # what goes into the lock beside the weights


class _Progress:
    """One line of bytes for all parallel downloads, fed by the sizes of the files in the
    staging folder (so it needs no hook into the transfer). Redrawn in place on a terminal;
    a line every 30 s in a build log."""

    def __init__(self, total: int, staging: Path, out: TextIO = sys.stderr) -> None:
        self.total = total
        self.staging = staging
        self.out = out
        self.tty = out.isatty()
        self.done = 0
        self.lock = threading.Lock()
        self.t0 = self.last_line = time.monotonic()

    def finish(self, size: int) -> None:
        with self.lock:
            self.done += size

    def _staged(self) -> int:
        total = 0
        for path in self.staging.rglob("*") if self.staging.is_dir() else ():
            # A file may be renamed into place or cleaned up meanwhile.
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size if path.is_file() else 0
        return total

    def refresh(self, force: bool = False) -> None:
        with self.lock:
            now = time.monotonic()
            if not (self.tty or force or now - self.last_line >= 30):
                return
            current = min(self.done + self._staged(), self.total)
            self.last_line = now
            rate = current / max(now - self.t0, 1e-3)
            left = f", {(self.total - current) / rate:.0f} s left" if rate > 0 and current < self.total else ""
            line = f"weights: {human_size(current)} of {human_size(self.total)}, {human_size(rate)}/s{left}"
            self.out.write(f"\r{line}\033[K" if self.tty else line + "\n")
            self.out.flush()

    def say(self, line: str) -> None:
        with self.lock:
            self.out.write(("\r\033[K" if self.tty else "") + line + "\n")
            self.out.flush()


def _entry(job: _Job, remote: Remote, sha256: str) -> LockedFile:
    f = job.file
    return LockedFile(repo=f.repo, path=f.path, folder=f.folder, revision=f.revision, commit=remote.commit,
                      size=remote.size, sha256=sha256, fetched_at=model_lock.now())


def _same_request(entry: LockedFile, f: ModelFile) -> bool:
    return (entry.repo, entry.path, entry.folder, entry.revision) == (f.repo, f.path, f.folder, f.revision)


def _already_there(job: _Job, dest: Path, have: WeightsLock) -> bool:
    """The file is in place and the lock beside it says it is what was asked for; no network."""
    entry = have.files.get(job.file.key)
    path = job.file.local_path(dest)
    if entry is None or not _same_request(entry, job.file) or not path.is_file():
        return False
    if job.pinned is not None and (entry.commit, entry.sha256) != (job.pinned.commit, job.pinned.sha256):
        return False
    if path.stat().st_size != entry.size:
        return False
    job.locked = entry
    job.outcome = Outcome(job.file, "present", size=entry.size)
    return True


def _resolve(job: _Job) -> None:
    try:
        remote = job.remote = resolve(job.file, job.revision)
    except BuildError as exc:
        job.outcome = Outcome(job.file, "failed", str(exc))
        return
    except Exception as exc:
        # A network failure that outlasted huggingface_hub's retries fails this file, not the run.
        job.outcome = Outcome(job.file, "failed", describe_hub_error(exc, job.file.repo, job.revision))
        return
    pinned = job.pinned
    # A small file kept in git has no sha256 from the Hub: its bytes are checked once fetched.
    if pinned is not None and (remote.size != pinned.size or remote.sha256 not in (None, pinned.sha256)):
        job.outcome = Outcome(job.file, "failed", f"drift: the Hub now reports {remote.size} bytes, sha256 "
                                                  f"{remote.sha256} at {job.revision}; the lock has {pinned.size} "
                                                  f"bytes, sha256 {pinned.sha256}")


def _adopt(job: _Job, dest: Path) -> None:
    """A file in place but not in the lock (an older builder, or copied by hand) is kept,
    and recorded, when its bytes are the ones the Hub reports."""
    path, remote = job.file.local_path(dest), job.remote
    if remote is None or remote.sha256 is None or not path.is_file() or path.stat().st_size != remote.size:
        return
    if sha256_file(path) == remote.sha256:
        job.locked = _entry(job, remote, remote.sha256)
        job.outcome = Outcome(job.file, "adopted", "its sha256 is the Hub's", size=remote.size)


def _fetch(job: _Job, dest: Path, progress: _Progress) -> None:
    f, remote = job.file, job.remote
    assert remote is not None
    t0 = time.monotonic()
    staging = dest / INCOMING / f.key
    try:
        # At the resolved commit, so the bytes are the ones just resolved even if the branch moves.
        staged = Path(hf_hub_download(f.repo, f.path, revision=remote.commit, local_dir=staging,
                                      tqdm_class=silent_tqdm))
        actual = sha256_file(staged)
        expected = job.pinned.sha256 if job.pinned is not None else remote.sha256
        if expected is not None and actual != expected:
            job.outcome = Outcome(f, "failed", f"sha256 mismatch: the Hub says {expected}, the bytes written hash "
                                               f"to {actual}; the file was deleted")
            return
        final = f.local_path(dest)
        final.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(final)
        job.locked = _entry(job, remote, actual)
        job.outcome = Outcome(f, "downloaded", seconds=time.monotonic() - t0, size=remote.size)
    except Exception as exc:
        job.outcome = Outcome(f, "failed", describe_hub_error(exc, f.repo, remote.commit))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        progress.finish(remote.size)


def _pinned(files: list[ModelFile], pins: WeightsLock) -> dict[str, LockedFile]:
    """The --locked entry of each file; refuses a lock made for another manifest."""
    wrong = []
    for f in files:
        entry = pins.files.get(f.key)
        if entry is None:
            wrong.append(f"{f.key}: not in the lock")
        elif not _same_request(entry, f):
            wrong.append(f"{f.key}: the lock has {entry.repo}@{entry.revision} {entry.path} ({entry.folder}), "
                         f"the manifest {f.repo}@{f.revision} {f.path} ({f.folder})")
    if wrong:
        raise BuildError("the lock does not match the manifest; make a new lock with `download` and commit it:\n  "
                         + "\n  ".join(wrong))
    return {f.key: pins.files[f.key] for f in files}


def _check_space(jobs: list[_Job], dest: Path) -> None:
    need = sum(j.remote.size for j in jobs if j.remote is not None)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise BuildError(f"{dest} has {human_size(free)} free; the files to fetch need {human_size(need)} "
                         f"({need} bytes, as the Hub reports them)")


def download(files: list[ModelFile], dest: Path, *, workers: int = 4, pins: WeightsLock | None = None,
             ) -> list[Outcome]:
    """Fetch every selected file not already in place under `dest`, `workers` at a time, and
    record each in `dest/weights.lock.json`. With `pins` (a committed lock) each file comes
    from its locked commit and must have its locked sha256; any drift fetches nothing."""
    dest.mkdir(parents=True, exist_ok=True)
    lock_file = dest / model_lock.LOCK_NAME
    have = read_lock(lock_file) if lock_file.is_file() else WeightsLock()
    pinned = _pinned(files, pins) if pins is not None else {}
    jobs = [_Job(f, pinned[f.key].commit if f.key in pinned else f.revision, pinned.get(f.key)) for f in files]
    todo = [j for j in jobs if not _already_there(j, dest, have)]
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="resolve") as pool:
        list(pool.map(_resolve, todo))
        list(pool.map(lambda j: _adopt(j, dest), [j for j in todo if j.outcome is None]))
    fetch = [j for j in todo if j.outcome is None]
    if pins is not None and any(j.outcome is not None and j.outcome.status == "failed" for j in jobs):
        for j in fetch:
            j.outcome = Outcome(j.file, "held", "not fetched: other files do not match the lock")
        fetch = []
    _check_space(fetch, dest)
    progress = _Progress(sum(j.remote.size for j in fetch if j.remote is not None), dest / INCOMING)
    for j in jobs:
        if j.outcome is not None:
            progress.say(_outcome_line(j.outcome))
    _run_fetches(fetch, dest, workers, progress)
    have.files.update((j.file.key, j.locked) for j in jobs if j.locked is not None)
    model_lock.write(lock_file, have)
    shutil.rmtree(dest / INCOMING, ignore_errors=True)
    return [j.outcome for j in jobs if j.outcome is not None]


def _run_fetches(fetch: list[_Job], dest: Path, workers: int, progress: _Progress) -> None:
    if not fetch:
        return
    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(progress, stop), daemon=True)
    ticker.start()

    def one(job: _Job) -> None:
        _fetch(job, dest, progress)
        assert job.outcome is not None
        progress.say(_outcome_line(job.outcome))

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fetch") as pool:
            list(pool.map(one, fetch))
    finally:
        stop.set()
        ticker.join()
        progress.refresh(force=True)
        if progress.tty:
            progress.out.write("\n")


def _tick(progress: _Progress, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        progress.refresh()


def _outcome_line(outcome: Outcome) -> str:
    f = outcome.file
    where = f"{f.folder}/{f.name}"
    if outcome.status in ("failed", "held"):
        return f"{outcome.status.upper():7} {where}: {f.repo}@{f.revision} {f.path}: {outcome.detail}"
    if outcome.status != "downloaded":
        return f"{outcome.status:7} {where}" + (f" ({outcome.detail})" if outcome.detail else "")
    rate = outcome.size / outcome.seconds / 1e6 if outcome.seconds else 0.0
    return f"fetched {where} ({human_size(outcome.size)}, {outcome.seconds:.0f} s, {rate:.0f} MB/s)"


def download_chat_model(repo: str, revision: str, dest: Path, *, workers: int = 4) -> Path:
    """A vLLM model as a whole snapshot, at `chat_model_dir(dest, repo)` (vLLM's `--model`)."""
    # Imported here: it pulls in huggingface_hub's whole API client, about half of the
    # builder's start-up time, which the model files don't need.
    from huggingface_hub import snapshot_download

    target = chat_model_dir(dest, repo)
    snapshot_download(repo, revision=revision, local_dir=target, max_workers=workers)
    return target


# -- verify -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    file: ModelFile
    status: Literal["ok", "missing", "not locked", "lock differs", "wrong size", "sha256 mismatch"]
    entry: LockedFile | None = None
    actual_size: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def verify(files: list[ModelFile], dest: Path, lock: WeightsLock, *, hashes: bool = True) -> Iterator[Check]:
    """Each file against its lock entry: present, the manifest's request, size, sha256
    (unless not `hashes`: hashing reads every byte)."""
    for f in files:
        entry = lock.files.get(f.key)
        path = f.local_path(dest)
        if not path.is_file():
            yield Check(f, "missing", entry)
        elif entry is None:
            yield Check(f, "not locked", None, path.stat().st_size, "run download to record it")
        elif not _same_request(entry, f):
            yield Check(f, "lock differs", entry, path.stat().st_size,
                        f"locked {entry.repo}@{entry.revision} {entry.path}")
        elif (size := path.stat().st_size) != entry.size:
            yield Check(f, "wrong size", entry, size)
        elif not hashes:
            yield Check(f, "ok", entry, size, "size only")
        elif (actual := sha256_file(path)) != entry.sha256:
            yield Check(f, "sha256 mismatch", entry, size, f"got {actual}")
        else:
            yield Check(f, "ok", entry, size, "sha256")


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
