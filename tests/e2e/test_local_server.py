"""`python -m diffbox serve` as a user runs it: RunPod's API on loopback over real HTTP, jobs
run by the worker in that process, against the fake ComfyUI or a real one
(DIFFBOX_TEST_COMFYUI_URL). Unlike the runpod SDK's local server, `/status` shows progress as
RunPod does and `/cancel` stops the job.

On the fake, the long job is a sampler whose steps the fake times; on a real ComfyUI, which
has no weights here, it is a chain of model-free nodes (ComfyUI checks for an interrupt
between nodes).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from rich.filesize import decimal

from diffbox.client import Client
from tests.conftest import REPO, TEST_INPUT, WORKER_LOGS, ComfyTarget, free_port, worker_env
from tests.e2e.test_client import CLI, Terminal, _terminal_env
from tests.jobkit import job_files, queue_ids, sampler_graph, sampling_fake, wait_until

STEP_DELAY_S = 0.05


def _long_graph(comfy: ComfyTarget, seconds: int) -> dict[str, Any]:
    """A graph that runs for about `seconds` on `comfy` and reports progress as it goes."""
    if comfy.is_fake:
        return sampler_graph(int(seconds / STEP_DELAY_S))
    # A 1024x1024 image blurred again and again: 0.7 s a node on an idle 2-core CPU, several
    # times that under load. Few heavy nodes rather than many light ones: ComfyUI's
    # progress_state messages carry every node of the graph, so their traffic grows with the
    # square of its size. The colour differs from run to run, or ComfyUI would answer from its cache.
    nodes = seconds * 2
    graph: dict[str, Any] = {"0": {"class_type": "EmptyImage", "inputs": {
        "width": 1024, "height": 1024, "batch_size": 1, "color": random.randrange(1 << 24)}}}
    for n in range(1, nodes + 1):
        graph[str(n)] = {"class_type": "ImageBlur", "inputs": {"image": [str(n - 1), 0], "blur_radius": 15,
                                                               "sigma": 1.0}}
    graph["end"] = {"class_type": "SaveImage", "inputs": {"images": [str(nodes), 0], "filename_prefix": "blur"}}
    return graph


class Served:
    """`python -m diffbox serve --port PORT` in a process of its own."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        WORKER_LOGS.append(log_path)
        self.log_path = log_path
        self.proc = subprocess.Popen([*CLI, "serve", "--port", self.url.rsplit(":", 1)[1]], cwd=REPO, env=env,
                                     stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{log_path.read_text()}"
            try:
                requests.get(f"{self.url}/status/none", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)

    def post(self, path: str, body: Any = None) -> dict[str, Any]:
        return dict(requests.post(f"{self.url}/{path}", json=body, timeout=30).json())

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(requests.get(f"{self.url}/status/{job_id}", timeout=30).json())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture(scope="module")
def comfy(comfyui: ComfyTarget) -> Iterator[ComfyTarget]:
    if not comfyui.is_fake:
        yield comfyui
        return
    with sampling_fake(comfyui, step_delay_s=STEP_DELAY_S) as fake:
        yield fake


@pytest.fixture(scope="module")
def served(comfy: ComfyTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    server = Served(worker_env(comfy, tmp / "work"), tmp / "serve.log")
    yield server
    if server.proc.poll() is None:
        server.stop()


def test_status_shows_progress_while_the_job_runs(served: Served, comfy: ComfyTarget) -> None:
    job_id = served.post("run", {"input": {"workflow": _long_graph(comfy, 4)}})["id"]
    seen: list[dict[str, Any]] = []
    while (body := served.status(job_id))["status"] in ("IN_QUEUE", "IN_PROGRESS"):
        if body["status"] == "IN_PROGRESS":
            seen.append(body["output"])
        time.sleep(0.05)
    assert body["status"] == "COMPLETED", body
    assert body["output"]["images"][0]["filename"].endswith(".png")
    # RunPod's way: while the job runs, `output` is its latest progress payload.
    running = [u for u in seen if u["stage"] == "running"]
    assert len(running) >= 2 and running[-1]["percent"] > running[0]["percent"], seen
    assert [u["seq"] for u in seen] == sorted(u["seq"] for u in seen)
    if comfy.is_fake:
        assert any(u.get("node") == "KSampler" and u.get("steps") == 80 for u in running)
    else:
        assert any(u.get("node") == "ImageBlur" for u in running)


def test_the_client_cli_shows_a_moving_bar(served: Served, comfy: ComfyTarget, tmp_path: Path) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(_long_graph(comfy, 4)))
    term = Terminal([*CLI, "run", "--input", str(graph), "--endpoint", served.url, "--poll", "0.1",
                     "--out", str(tmp_path / "out")], _terminal_env())
    assert term.wait(120) == 0, term.text()
    text = term.text()
    percents = {int(p) for p in _percents(text)}
    assert "running" in text and len(percents - {0, 100}) >= 2, text  # the bar moved
    assert "COMPLETED" in text and "saved in" in text and "timings:" in text
    [saved] = (tmp_path / "out").iterdir()
    assert saved.suffix == ".png"


def _percents(text: str) -> list[str]:
    import re

    return re.findall(r"\s(\d{1,3})%", text)


def test_cancel_stops_the_prompt(served: Served, comfy: ComfyTarget) -> None:
    job = Client(served.url, poll_s=0.05).submit({"workflow": _long_graph(comfy, 60)})
    for update in job.progress(timeout=60):
        if update["stage"] == "running" and update["percent"] > 6:
            break
    assert served.post(f"cancel/{job.id}")["id"] == job.id
    wait_until(lambda: served.status(job.id)["status"] == "CANCELLED", 60, "the job is cancelled")
    # Its prompt is out of ComfyUI's queue and its files are gone: the worker took it all back.
    wait_until(lambda: queue_ids(comfy.url) == ([], []), 30, "ComfyUI's queue is empty")
    if comfy.base_dir is not None:
        wait_until(lambda: job_files(comfy, job.id) == [], 30, "the job's files are removed")
    after = served.post("runsync", {"input": TEST_INPUT["input"]})
    assert after["status"] == "COMPLETED" and len(after["output"]["images"]) == 2


def test_stream_gives_a_plain_jobs_result_as_its_one_chunk(served: Served) -> None:
    job = Client(served.url, poll_s=0.05).submit(TEST_INPUT["input"])
    [result] = list(job.stream(timeout=60))
    # In the order ComfyUI wrote them: with the graph's first nodes answered from its cache (the
    # module's jobs send the same image), either save node may run first.
    assert sorted(i["filename"].rsplit(".", 1)[1] for i in result["images"]) == ["mp4", "png"]
    body = requests.post(f"{served.url}/stream/{job.id}", timeout=10).json()
    assert body["status"] == "COMPLETED" and body["stream"] == []  # each chunk is handed out once


def test_sigterm_stops_the_server_and_its_comfyui(comfy: ComfyTarget, tmp_path: Path) -> None:
    """The worker starts its own ComfyUI when given a folder; stopping the server stops it."""
    if not comfy.is_fake:
        pytest.skip("starts a ComfyUI of its own: the fake's stand-in is quick to start")
    from tests.fakes.comfyui import write_comfyui_dir

    comfy_dir = tmp_path / "ComfyUI"
    write_comfyui_dir(comfy_dir)
    port = free_port()
    env = {**worker_env(comfy, tmp_path / "work"), "DIFFBOX_COMFYUI_DIR": str(comfy_dir),
           "DIFFBOX_COMFYUI_PORT": str(port), "DIFFBOX_COMFYUI_PYTHON": sys.executable}
    env.pop("DIFFBOX_COMFYUI_URL")
    server = Served(env, tmp_path / "serve.log")
    done = server.post("runsync", {"input": TEST_INPUT["input"]})
    assert done["status"] == "COMPLETED", done
    assert server.stop() == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/queue", timeout=2)


def _make_run_argv(out: Path) -> list[str]:
    """The command of the Makefile's `run` recipe, with outputs going to `out`."""
    [line] = [line for line in (REPO / "Makefile").read_text().splitlines() if "python -m diffbox run" in line]
    args = line.split("python -m diffbox run", 1)[1].replace("$(RUN_OUT)", str(out)).split()
    return [*CLI, "run", *args]


def test_make_run_saves_the_outputs_and_prints_a_summary(comfy: ComfyTarget, tmp_path: Path) -> None:
    """`make run`'s job on a worker in the command's own process (`--endpoint local`)."""
    out = tmp_path / "out"
    log_path = tmp_path / "run.log"
    WORKER_LOGS.append(log_path)
    done = subprocess.run(_make_run_argv(out), cwd=REPO, env=worker_env(comfy, tmp_path / "work"),
                          capture_output=True, text=True, timeout=120)
    log_path.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr
    saved = sorted(out.iterdir())
    assert [p.suffix for p in saved] == [".mp4", ".png"]
    for path in saved:
        # Each file once in the summary, with its size; no base64 anywhere.
        assert done.stdout.count(path.name) == 1 and decimal(path.stat().st_size) in done.stdout
    assert f"saved in {out}" in done.stdout and "timings: inputs" in done.stdout and "total" in done.stdout
    assert TEST_INPUT["input"]["images"][0]["image"][:40] not in done.stdout + done.stderr
    assert len(done.stdout) < 2000, done.stdout


def test_make_run_on_a_terminal_prints_short_log_lines_above_the_bar(comfy: ComfyTarget, tmp_path: Path) -> None:
    """On a terminal the worker's log lines are for a person, and rich prints them above its
    live bar rather than through it; the same run without a terminal logs JSON (above)."""
    import re

    out = tmp_path / "out"
    env = {**worker_env(comfy, tmp_path / "work"), "TERM": "xterm-256color", "COLUMNS": "120"}
    term = Terminal(_make_run_argv(out), env)
    assert term.wait(120) == 0, term.text()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.text()).replace("\r", "\n")
    logged = [line for line in text.splitlines() if re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    assert any("job done" in line for line in logged), text
    assert not any(line.lstrip().startswith('{"ts"') for line in text.splitlines()), text
    # A log line written through the bar would share its line with the bar's drawing.
    assert not any("━" in line or "%" in line.split("  ")[0] for line in logged), logged
    assert "saved in" in text and sorted(p.suffix for p in out.iterdir()) == [".mp4", ".png"]
