"""Jobs' input files in ComfyUI's input folder: one file for the same bytes, there while a job holds it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from diffbox.backends.comfyui_inputs import SharedInputs
from diffbox.errors import JobError


def _no_upload(name: str, data: bytes, subfolder: str) -> None:
    raise AssertionError("a worker sharing ComfyUI's disk writes its inputs there, it never uploads them")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_file_stays_while_any_job_holds_it_and_goes_with_the_last(tmp_path: Path) -> None:
    inputs = SharedInputs("diffbox", tmp_path, _no_upload)
    assert inputs.folder.startswith("diffbox/in-")
    first = inputs.hold([("a.png", b"A"), ("b.png", b"B")])
    second = inputs.hold([("a.png", b"A")])
    assert _files(tmp_path) == {f"{inputs.folder}/a.png": b"A", f"{inputs.folder}/b.png": b"B"}
    first.release()
    assert _files(tmp_path) == {f"{inputs.folder}/a.png": b"A"}
    first.release()  # twice is once
    assert inputs.held() == {"a.png": 1}
    second.release()
    assert _files(tmp_path) == {} and not (tmp_path / inputs.folder).exists()
    assert (tmp_path / "diffbox").is_dir()  # the parent is shared with the jobs' outputs


def test_a_held_file_is_not_written_again(tmp_path: Path) -> None:
    """A running prompt may be reading it: the next job with the same bytes leaves it alone."""
    inputs = SharedInputs("diffbox", tmp_path, _no_upload)
    held = inputs.hold([("a.png", b"A")])
    path = tmp_path / inputs.folder / "a.png"
    before = os.stat(path)
    again = inputs.hold([("a.png", b"A")])
    assert os.stat(path).st_ino == before.st_ino and os.stat(path).st_mtime_ns == before.st_mtime_ns
    held.release()
    again.release()


def test_the_same_file_twice_in_one_job_is_held_once(tmp_path: Path) -> None:
    inputs = SharedInputs("diffbox", tmp_path, _no_upload)
    held = inputs.hold([("a.png", b"A"), ("a.png", b"A")])
    assert inputs.held() == {"a.png": 1}
    held.release()
    assert inputs.held() == {} and _files(tmp_path) == {}


def test_a_failed_write_lets_go_of_what_it_held_and_names_the_file(tmp_path: Path) -> None:
    inputs = SharedInputs("diffbox", tmp_path, _no_upload)
    (tmp_path / inputs.folder).mkdir(parents=True)
    (tmp_path / inputs.folder / "b.png").mkdir()  # a folder where the file must go: the rename fails
    with pytest.raises(JobError) as failed:
        inputs.hold([("a.png", b"A"), ("b.png", b"B")])
    assert failed.value.type == "backend" and "'b.png'" in failed.value.message
    assert inputs.held() == {}
    assert [p.name for p in (tmp_path / inputs.folder).iterdir()] == ["b.png"]  # no part file, no a.png


def test_without_comfyui_s_disk_each_job_uploads_into_the_worker_s_folder() -> None:
    sent: list[tuple[str, bytes, str]] = []
    inputs = SharedInputs("diffbox", None, lambda name, data, folder: sent.append((name, data, folder)))
    inputs.hold([("a.png", b"A")]).release()
    inputs.hold([("a.png", b"A")]).release()
    assert sent == [("a.png", b"A", inputs.folder)] * 2


def test_two_workers_never_share_a_folder(tmp_path: Path) -> None:
    one, other = SharedInputs("diffbox", tmp_path, _no_upload), SharedInputs("diffbox", tmp_path, _no_upload)
    assert one.folder != other.folder
    held = one.hold([("a.png", b"A")])
    other.hold([("a.png", b"A")]).release()
    assert _files(tmp_path) == {f"{one.folder}/a.png": b"A"}
    held.release()


def test_jobs_holding_and_releasing_at_once_leave_nothing(tmp_path: Path) -> None:
    inputs = SharedInputs("diffbox", tmp_path, _no_upload)
    seen_missing: list[str] = []

    def job(index: int) -> None:
        for _ in range(50):
            held = inputs.hold([("a.png", b"A"), (f"{index}.png", b"X")])
            if not (tmp_path / inputs.folder / "a.png").is_file():
                seen_missing.append(f"job {index}")
            held.release()

    threads = [threading.Thread(target=job, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen_missing == [] and inputs.held() == {} and _files(tmp_path) == {}
