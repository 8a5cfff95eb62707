"""diffbox.client and the `diffbox` CLI against running endpoints over the fake ComfyUI:

- the runpod SDK's local API server running handler.py (`rp_api`): what a RunPod endpoint runs;
- diffbox.api.http_api's app over `LocalJobs` (the Modal web endpoint's code, jobs on a Service in
  this process), served by uvicorn on loopback.

The local API server runs a /run job inside the /status request that first asks for it, so a
client sees no progress there, and it has no /cancel: progress and cancelling are tested on the
web app, and the local server's limits are tested as the limits they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from PIL import Image

from diffbox.api.http_api import LocalJobs, create_app
from diffbox.client import Client, InvalidRequest, JobCancelled, JobFailed, NotSupported, RunpodTransport
from diffbox.config import S3Settings, Settings
from diffbox.service import Service
from diffbox.workflows import manifest
from tests.conftest import REPO, TEST_INPUT, ComfyTarget, RunpodApi, free_port
from tests.e2e.test_job_lifecycle import sampler_graph
from tests.fakes.comfyui.faults import set_config
from tests.s3 import REGION, S3Server

CLI = [sys.executable, "-m", "diffbox"]
STEP_DELAY_S = 0.05
# Passes the client's checks (a well-formed graph); ComfyUI's validation refuses the width.
BAD_GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"width": 999999, "height": 8, "batch_size": 1, "color": 0}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}


@pytest.fixture(scope="module")
def comfy(fake_comfyui: ComfyTarget) -> Iterator[ComfyTarget]:
    """The fake with a placeholder for every weight (typed workflows) and a checkpoint for the
    sampler graph, whose steps take STEP_DELAY_S each."""
    assert fake_comfyui.base_dir is not None
    models = fake_comfyui.base_dir / "models"
    for f in manifest.load().files.values():
        f.local_path(models).parent.mkdir(parents=True, exist_ok=True)
        f.local_path(models).touch()
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    (models / "checkpoints" / "tiny.safetensors").touch()
    set_config(fake_comfyui.url, step_delay_s=STEP_DELAY_S)
    yield fake_comfyui
    set_config(fake_comfyui.url, step_delay_s=0.01)


class WebApi:
    """diffbox.api.http_api's app on loopback, jobs on a Service in this process."""

    def __init__(self, service: Service) -> None:
        self.config = uvicorn.Config(create_app(LocalJobs(service)), host="127.0.0.1", port=free_port(),
                                     log_level="warning")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.config.port}"

    def __enter__(self) -> WebApi:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the web API did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(requests.get(f"{self.url}/status/{job_id}", timeout=10).json())


def _service(comfy: ComfyTarget, work_dir: Path, s3: S3Settings | None = None) -> Service:
    assert comfy.base_dir is not None
    return Service(Settings(comfyui_url=comfy.url, comfyui_dir=comfy.base_dir, work_dir=work_dir,
                            models_dir=comfy.base_dir / "models", startup_timeout_s=30, s3=s3))


@pytest.fixture(scope="module")
def web(comfy: ComfyTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebApi]:
    with WebApi(_service(comfy, tmp_path_factory.mktemp("web") / "work")) as api:
        yield api


def png_file(path: Path, size: tuple[int, int] = (96, 64)) -> Path:
    Image.new("RGB", size, (30, 140, 200)).save(path, "PNG")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


# The Python API


def test_result_and_download_over_the_local_runpod_server(rp_api: RunpodApi, tmp_path: Path) -> None:
    job = Client(rp_api.url, poll_s=0.1).submit(TEST_INPUT["input"])
    # Documented limit: this server runs the job inside the one /status request that asks for
    # it, and shows progress only in its log; the client sees the job end.
    assert list(job.progress(timeout=60)) == []
    assert job.status == "COMPLETED"
    result = job.result()
    names = [i["filename"] for i in result["images"]]
    assert len(names) == 2 and names[0].endswith(".png") and names[1].endswith(".mp4")
    paths = job.download(tmp_path / "out")
    assert [p.name for p in paths] == names
    assert [sha256(p) for p in paths] == [i["sha256"] for i in result["images"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no .part left


def test_cancel_on_the_local_runpod_server_says_it_cannot(rp_api: RunpodApi) -> None:
    job = Client(rp_api.url).submit(TEST_INPUT["input"])
    with pytest.raises(NotSupported, match=r"no /cancel .*--rp_serve_api"):
        job.cancel()
    assert len(job.result(timeout=60)["images"]) == 2  # the job ran to its end


def test_worker_errors_raise_job_failed(rp_api: RunpodApi) -> None:
    with pytest.raises(JobFailed) as failed:
        Client(rp_api.url).run({"workflow": BAD_GRAPH}, timeout=60)
    assert failed.value.type == "validation" and "EmptyImage" in failed.value.message
    assert failed.value.details and failed.value.job_id


def test_bad_requests_are_refused_before_anything_is_sent() -> None:
    # Nothing listens there: a request that got as far as the network would fail otherwise.
    client = Client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(InvalidRequest, match="image") as refused:
        client.submit({"workflow": "i2v", "prompt": "a cat"})
    assert refused.value.type == "validation" and refused.value.details[0]["field"] == "image"


def test_progress_is_ordered_by_seq_over_the_web_api(web: WebApi, tmp_path: Path) -> None:
    job = Client(web.url, poll_s=0.05).submit({"workflow": sampler_graph(100)})
    updates = list(job.progress(timeout=60))
    seqs = [u["seq"] for u in updates]
    # About one update a second (the worker throttles them) over a job of at least 5 s.
    assert len(updates) >= 4 and seqs == sorted(set(seqs))
    assert [u["percent"] for u in updates] == sorted(u["percent"] for u in updates)
    assert any(u.get("node") == "KSampler" and u.get("steps") == 100 for u in updates)
    [path] = job.download(tmp_path)
    assert path.name == "sampled_00001_.png" and sha256(path) == job.result()["images"][0]["sha256"]


def test_cancel_over_the_web_api(web: WebApi) -> None:
    job = Client(web.url, poll_s=0.05).submit({"workflow": sampler_graph(400)})
    for update in job.progress(timeout=60):
        if update.get("step"):
            job.cancel()
            break
    with pytest.raises(JobCancelled):
        job.result(timeout=60)
    assert web.status(job.id)["status"] == "CANCELLED"


def test_runpod_sdk_transport(web: WebApi) -> None:
    """The RunPod transport (runpod.Endpoint's client underneath), pointed at the web API,
    which serves the routes under /{endpoint id}/ as RunPod does."""
    transport = RunpodTransport("some-endpoint", api_key="unused", base_url=web.url)
    assert transport.base_url == f"{web.url}/some-endpoint" and transport.read_method == "GET"
    job = Client(transport, poll_s=0.05).submit({"workflow": sampler_graph(12)})
    assert [u["seq"] for u in job.progress(timeout=60)]
    assert job.result()["images"][0]["filename"] == "sampled_00001_.png"
    cancelled = Client(transport, poll_s=0.05).submit({"workflow": sampler_graph(400)})
    cancelled.cancel()
    with pytest.raises(JobCancelled):
        cancelled.result(timeout=60)


def test_s3_inputs_and_outputs(comfy: ComfyTarget, s3_server: S3Server, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A local file goes to the bucket (an s3:// URI in the request), the worker's outputs come
    back as presigned URLs, and the client fetches and checks them."""
    bucket = s3_server.new_bucket()
    env = s3_server.env(bucket)
    settings = S3Settings(bucket=bucket, endpoint_url=s3_server.endpoint, region=REGION,
                          access_key_id=env["AWS_ACCESS_KEY_ID"], secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copy"}}}
    cat = png_file(tmp_path / "cat.png")
    with WebApi(_service(comfy, tmp_path / "work", settings)) as api:
        client = Client(api.url, poll_s=0.05)
        sent = client.prepare({"workflow": graph, "images": [{"name": "cat.png", "image": str(cat)}]})
        assert sent["images"][0]["image"].startswith(f"s3://{bucket}/inputs/")
        job = client.submit(sent)
        [entry] = job.result(timeout=60)["images"]
        assert entry["type"] == "s3_url" and entry["url"].startswith(s3_server.endpoint)
        [path] = job.download(tmp_path / "out")
        assert sha256(path) == entry["sha256"]
        with Image.open(path) as copy:
            assert copy.size == (96, 64)


# The CLI, as a subprocess


def test_cli_runs_a_request_file(rp_api: RunpodApi, tmp_path: Path) -> None:
    done = cli("run", "--input", "test_input.json", "--endpoint", rp_api.url, "--out", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "COMPLETED" and report["id"].startswith("test-")
    assert [Path(f).name for f in report["files"]] == [i["filename"] for i in report["result"]["images"]]
    assert all("data" not in i for i in report["result"]["images"])  # saved, not printed
    assert [sha256(Path(f)) for f in report["files"]] == [i["sha256"] for i in report["result"]["images"]]


def test_cli_runs_i2v_with_flags(comfy: ComfyTarget, rp_api: RunpodApi, tmp_path: Path) -> None:
    image = png_file(tmp_path / "cat.png", (416, 240))
    done = cli("run", "i2v", "--image", str(image), "--prompt", "a cat walks", "--preset", "fast",
               "--frames", "17", "--set", "seed=3", "--set", "output.store=inline",
               "--endpoint", rp_api.url, "--out", str(tmp_path / "out"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["result"]["seed"], report["result"]["frames"], report["result"]["preset"]) == (3, 17, "fast")
    [video] = report["files"]
    assert video.endswith(".mp4") and sha256(Path(video)) == report["result"]["outputs"][0]["sha256"]


def test_cli_refuses_a_bad_request_before_sending_it(tmp_path: Path) -> None:
    done = cli("run", "i2v", "--prompt", "a cat", "--endpoint", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2 and "image: " in done.stderr, done.stderr
    as_json = cli("run", "i2v", "--prompt", "a cat", "--set", "frames=6", "--json",
                  "--endpoint", f"http://127.0.0.1:{free_port()}")
    error = json.loads(as_json.stdout)["error"]
    assert as_json.returncode == 2 and error["type"] == "validation"
    assert {d["field"] for d in error["details"]} == {"image", "frames"}


def test_cli_reports_a_failed_job(rp_api: RunpodApi, tmp_path: Path) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(BAD_GRAPH))
    done = cli("run", "raw", "--input", str(graph), "--endpoint", rp_api.url, "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["status"] == "FAILED" and report["error"]["type"] == "validation"


# The CLI in a pseudo-terminal: the live display and Ctrl-C


class Terminal:
    """A command on a pseudo-terminal of its own (its controlling terminal, 120 columns)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.chdir(REPO)
            os.execvpe(argv[0], argv, env)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.output = b""

    def read_until(self, pattern: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while pattern not in self.output:
            assert time.monotonic() < deadline, f"{pattern!r} not seen in:\n{self.text()}"
            if not self._read(deadline - time.monotonic()):
                raise AssertionError(f"ended before {pattern!r}:\n{self.text()}")

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline - time.monotonic()):
            pass
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running:\n{self.text()}")

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def _read(self, timeout: float) -> bool:
        import select

        if timeout <= 0 or not select.select([self.fd], [], [], timeout)[0]:
            return timeout > 0
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.output += chunk
        return bool(chunk)


def _terminal_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("DIFFBOX_", "RUNPOD_"))},
            "TERM": "xterm-256color", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}


def test_cli_shows_live_progress_and_a_summary(web: WebApi, tmp_path: Path) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(sampler_graph(60)))
    term = Terminal([*CLI, "run", "--input", str(graph), "--endpoint", web.url, "--poll", "0.1",
                     "--out", str(tmp_path / "out")], _terminal_env())
    term.read_until(b"KSampler step ")
    assert term.wait() == 0, term.text()
    text = term.text()
    assert "running" in text and "/60" in text and "ETA" in text and "%" in text
    assert "COMPLETED" in text and "sampled_00001_.png" in text and "ok" in text  # the summary table
    assert (tmp_path / "out" / "sampled_00001_.png").is_file()


def test_ctrl_c_cancels_the_job(web: WebApi, tmp_path: Path) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(sampler_graph(600)))
    term = Terminal([*CLI, "run", "--input", str(graph), "--endpoint", web.url, "--poll", "0.1",
                     "--out", str(tmp_path / "out")], _terminal_env())
    term.read_until(b"submitted via http")
    job_id = term.text().split("job ", 1)[1].split()[0]
    term.read_until(b"KSampler step ")
    os.write(term.fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT
    assert term.wait() == 130, term.text()
    assert f"cancelling job {job_id}" in term.text() and "CANCELLED" in term.text()
    assert web.status(job_id)["status"] == "CANCELLED"
    assert not (tmp_path / "out").exists()


def test_cli_without_a_terminal_prints_plain_lines(web: WebApi, tmp_path: Path) -> None:
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(sampler_graph(20)))
    done = cli("run", "--input", str(graph), "--endpoint", web.url, "--poll", "0.05", "--out", str(tmp_path),
               env=_terminal_env())
    assert done.returncode == 0, done.stderr
    assert "running" in done.stderr and "\x1b[" not in done.stderr  # no cursor movement
    assert "sampled_00001_.png" in done.stdout

