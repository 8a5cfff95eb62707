"""The image test: Dockerfile.serverless built here, from a clean context, and run with its own
CMD on the CPU as RunPod runs it (`make image-test`, through tests/image/run.sh, which starts
Docker and makes the images that stand in for what this machine cannot pull).

1. A build whose weights layer fetches i2v's fast preset from a loopback Hub (tests/fakes/hf_hub.py,
   a few bytes a file): the files and /models/weights.lock.json are in the image.
2. The same build with that lock as WEIGHTS_LOCK against the Hub after it changed: refused.
3. A one-line change in diffbox/: only the layers after the weights and ComfyUI rebuild.
4. The runpod SDK's test mode on test_input.json; --rp_serve_api with /runsync, /run and
   /status; a network volume at /runpod-volume with the tests' tiny models and a job on them;
   a volume missing a file of i2v: the builder's command in the error, nothing queued.

Times and sizes are printed as figures, never asserted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import av
import requests
from PIL import Image

from diffbox.workflows import manifest
from tests.fakes.hf_hub import FakeHub, serve_fake_hub
from tests.jobkit import is_inversion_of, png_b64, sampler_graph

REPO = Path(__file__).resolve().parents[2]
DOCKER = os.environ.get("DOCKER", "docker")
LOCK_IN_CONTEXT = "workflows/locks/image-test.json"
VOLUME_TARGET = "/runpod-volume"
# The Hub's URL is a build argument, so part of the weights layer's cache key: a port of its own
# keeps that layer, and the ComfyUI layer after it, cached from one run to the next.
HUB_PORT = int(os.environ.get("IMAGE_TEST_HUB_PORT", "47391"))


class Failed(Exception):
    pass


def log(message: str) -> None:
    print(f"image-test: {message}", flush=True)


PASSED: list[str] = []


def passed(message: str) -> None:
    PASSED.append(message)
    log(message)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_context(dest: Path) -> None:
    """The files git knows (committed or not, less what .gitignore drops), as a clean clone has them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listed):
        source = REPO / os.fsdecode(name)
        if source.is_file():
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / os.fsdecode(name))


class Build:
    """One `docker build` of Dockerfile.serverless: its time, and which steps ran or came from cache."""

    def __init__(self, context: Path, tag: str, args: dict[str, str], log_dir: Path, name: str) -> None:
        argv = [DOCKER, "build", "--progress=plain", "--network", "host", "-f", "Dockerfile.serverless", "-t", tag,
                "--secret", f"id=ca-bundle,src={os.environ['IMAGE_TEST_CA_BUNDLE']}"]
        for key, value in args.items():
            argv += ["--build-arg", f"{key}={value}"]
        self.log_path = log_dir / f"build-{name}.log"
        start = time.monotonic()
        with self.log_path.open("w") as out:
            done = subprocess.run([*argv, "."], cwd=context, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=3600, check=False)
        self.seconds = time.monotonic() - start
        self.ok = done.returncode == 0
        self.text = self.log_path.read_text(errors="replace")

    def steps(self) -> dict[str, bool]:
        """Each Dockerfile step of the final stage -> whether it came from the cache."""
        names = dict(re.findall(r"^#(\d+) \[stage-\d+ +\d+/\d+\] (.*)$", self.text, re.M))
        cached = set(re.findall(r"^#(\d+) CACHED$", self.text, re.M))
        return {step: number in cached for number, step in names.items()}

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text.splitlines()[-lines:])


def hub_with_i2v_fast() -> tuple[FakeHub, dict[str, bytes]]:
    """A Hub holding every file of i2v's fast preset, a few distinct bytes each."""
    hub = FakeHub()
    contents = {}
    for f in manifest.load().required("i2v", "fast"):
        contents[f.key] = f"diffbox image test: {f.key}\n".encode()
        hub.add(f.repo, f.path, contents[f.key])
    return hub, contents


def build_args(extra: dict[str, str]) -> dict[str, str]:
    """What replaces the sources this machine cannot reach (run.sh names them), and `extra`."""
    return {"CUDA_IMAGE": os.environ["IMAGE_TEST_BASE"], "UV_IMAGE": os.environ["IMAGE_TEST_UV"],
            "UV_PYTHON_PREFERENCE": "only-system", "TORCH_INDEX": "default",
            "COMFYUI_SOURCES": os.environ["IMAGE_TEST_SOURCES"], **extra}


def read_from_image(image: str, path: str) -> str:
    done = docker("run", "--rm", "--network", "none", "--entrypoint", "cat", image, path, timeout=120)
    check(done.returncode == 0, f"{path} not in the image: {done.stderr.strip()}")
    return done.stdout


def build_and_check_weights(context: Path, tag: str, log_dir: Path) -> Build:
    hub, contents = hub_with_i2v_fast()
    weights = {"MODELS": "i2v", "PRESETS": "fast"}
    with serve_fake_hub(hub, HUB_PORT):
        log(f"building {tag} (cold unless the layer cache has it); weights from a loopback Hub")
        first = Build(context, tag, build_args({**weights, "HF_ENDPOINT": hub.url}), log_dir, "weights")
        check(first.ok, f"the build failed (log {first.log_path}):\n{first.tail()}")
        log(f"built in {first.seconds:.0f} s")
        lock = json.loads(read_from_image(tag, "/models/weights.lock.json"))
        required = manifest.load().required("i2v", "fast")
        check(set(lock["files"]) == {f.key for f in required}, f"the image's lock lists {sorted(lock['files'])}")
        for f in required:
            baked = read_from_image(tag, f"/models/{f.folder}/{f.name}")
            check(baked.encode() == contents[f.key], f"/models/{f.folder}/{f.name} is not what the Hub served")
        passed(f"the image holds the {len(required)} files of i2v:fast and weights.lock.json")

        # The Hub changes the bytes behind the locked commit of one file: the locked build refuses.
        (context / LOCK_IN_CONTEXT).write_text(json.dumps(lock))
        changed = required[0]
        commit = lock["files"][changed.key]["commit"]
        hub.repos[changed.repo].commits[commit][changed.path] = b"changed on the Hub\n"
        locked = Build(context, f"{tag}-locked", build_args({**weights, "HF_ENDPOINT": hub.url,
                                                              "WEIGHTS_LOCK": LOCK_IN_CONTEXT}), log_dir, "locked")
        (context / LOCK_IN_CONTEXT).unlink()
        check(not locked.ok, "the WEIGHTS_LOCK build succeeded against a Hub that changed")
        check("drift" in locked.text and changed.name in locked.text,
              f"the WEIGHTS_LOCK build failed, but not on the drift of {changed.name}:\n{locked.tail()}")
        passed(f"the WEIGHTS_LOCK build refused the changed Hub ({changed.name}: drift)")
    return first


def incremental_build(context: Path, tag: str, log_dir: Path) -> Build:
    """A one-line change in diffbox/ (a module the builder does not import): the weights and
    ComfyUI layers stay cached."""
    target = context / "diffbox" / "config.py"
    # A new line each run: the same change twice would come from the cache.
    target.write_text(target.read_text() + f"# image test {time.time_ns()}\n")
    before = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    with serve_fake_hub(hub_with_i2v_fast()[0], HUB_PORT) as hub:
        again = Build(context, tag, build_args({"MODELS": "i2v", "PRESETS": "fast", "HF_ENDPOINT": hub.url}),
                      log_dir, "incremental")
    check(again.ok, f"the rebuild failed (log {again.log_path}):\n{again.tail()}")
    docker("rmi", before)  # the image before the change, now untagged: its last layers go with it
    steps = again.steps()
    ran = [step for step, cached in steps.items() if not cached and not step.startswith("FROM ")]
    heavy = [step for step in steps if "builder download" in step or "builder comfyui" in step]
    check(len(heavy) == 2 and all(steps[step] for step in heavy), f"a heavy layer was rebuilt: {ran}")
    passed(f"rebuilt after a one-line change in {again.seconds:.0f} s; steps that ran: {ran}")
    return again


@contextmanager
def container(image: str, *args: str, env: dict[str, str], volume: Path | None = None,
              network: str = "host") -> Iterator[str]:
    argv = ["run", "-d", "--network", network]
    for key, value in {"DIFFBOX_COMFYUI_ARGS": "--cpu", **env}.items():
        argv += ["-e", f"{key}={value}"]
    if volume is not None:
        argv += ["-v", f"{volume}:{VOLUME_TARGET}"]
    started = docker(*argv, image, *args)
    check(started.returncode == 0, f"docker run failed: {started.stderr.strip()}")
    name = started.stdout.strip()
    try:
        yield name
    finally:
        logs = docker("logs", name)
        (Path(os.environ["IMAGE_TEST_LOGS"]) / f"container-{name[:12]}.log").write_text(logs.stdout + logs.stderr)
        docker("rm", "-f", name)


def output_files(output: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [f for f in output.get("images", []) if f.get("kind") == kind]


def source_image() -> str:
    image: str = json.loads((REPO / "test_input.json").read_text())["input"]["images"][0]["image"]
    return image


def check_test_input_output(output: dict[str, Any], what: str) -> str:
    """test_input.json's outputs, decoded: its image inverted, and an 8-frame video of it."""
    source = source_image()
    images, videos = output_files(output, "image"), output_files(output, "video")
    check(len(images) == 1 and len(videos) == 1, f"{what}: expected an image and a video: {json.dumps(output)[:600]}")
    check(is_inversion_of(images[0]["data"], source), f"{what}: the image is not the input inverted")
    with av.open(io.BytesIO(base64.b64decode(videos[0]["data"])), mode="r") as clip:
        frames = len(list(clip.decode(video=0)))
    check(frames == 8, f"{what}: the video has {frames} frames, not 8")
    return "the inverted image and the 8-frame video decoded"


def sdk_test_mode(image: str) -> None:
    """The image's CMD as it is: the SDK runs test_input.json once and exits."""
    start = time.monotonic()
    with container(image, env={}, network="none") as name:
        waited = docker("wait", name, timeout=900)
        logs = docker("logs", name)
    text = logs.stdout + logs.stderr
    check(waited.stdout.strip() == "0", f"the CMD exited {waited.stdout.strip()}:\n{text[-3000:]}")
    # The SDK prints the result on one log line cut to 4096 characters: the image comes first and
    # whole (its sha256 says so); the video is checked through the API in (b).
    found = re.search(r"^INFO +\| Job result: \{'output': \{'images': \[\{[^}]*'sha256': '([0-9a-f]{64})'"
                      r"[^}]*'kind': 'image'[^}]*'data': '([A-Za-z0-9+/=]+)'", text, re.M)
    check(found is not None, f"no image in the job result of the CMD's log:\n{text[-3000:]}")
    assert found is not None
    check(hashlib.sha256(base64.b64decode(found[2])).hexdigest() == found[1], "test mode: the image is cut short")
    check(is_inversion_of(found[2], source_image()), "test mode: the image is not the input inverted")
    passed(f"(a) test mode: exit 0, the inverted image decoded from the SDK's log, "
           f"{time.monotonic() - start:.0f} s from docker run")


def post(url: str, body: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    answer = requests.post(url, json=body, timeout=timeout)
    check(answer.status_code == 200, f"POST {url}: {answer.status_code} {answer.text[:500]}")
    result: dict[str, Any] = answer.json()
    return result


def wait_for_api(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise Failed(f"the API at {url} did not answer within {timeout_s:.0f} s")


def serve_api(image: str) -> None:
    """--rp_serve_api: /runsync, then /run with /status until it is done; outputs decoded."""
    job = json.loads((REPO / "test_input.json").read_text())
    api, comfy = free_port(), free_port()
    base = f"http://127.0.0.1:{api}"
    start = time.monotonic()
    with container(image, "python", "-u", "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
                   "--rp_api_port", str(api), env={"DIFFBOX_COMFYUI_PORT": str(comfy)}):
        wait_for_api(f"{base}/docs")
        first = post(f"{base}/runsync", job)
        first_done = time.monotonic() - start
        check(first.get("status") == "COMPLETED", f"/runsync: {json.dumps(first)[:800]}")
        decoded = check_test_input_output(first["output"], "/runsync")
        passed(f"(b) /runsync: {decoded}; figures: container start to first job done {first_done:.1f} s")

        queued = post(f"{base}/run", job)
        statuses = [queued.get("status")]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = post(f"{base}/status/{queued['id']}", {})
            statuses.append(status.get("status"))
            if status.get("status") not in ("IN_QUEUE", "IN_PROGRESS"):
                break
            time.sleep(0.2)
        check(status.get("status") == "COMPLETED", f"/status: {json.dumps(status)[:800]}")
        decoded = check_test_input_output(status["output"], "/run")
        passed(f"(b) /run + /status: {' -> '.join(dict.fromkeys(s for s in statuses if s))}; {decoded}")


def volume_jobs(image: str, tiny_models: Path, work: Path) -> None:
    """A network volume as RunPod mounts it: a job on the tests' tiny models, and i2v with a file missing."""
    volume = work / "volume"
    models = volume / "models"
    shutil.copytree(tiny_models, models, ignore=shutil.ignore_patterns(".*"))
    required = manifest.load().required("i2v", "fast")
    for f in required[:-1]:
        f.local_path(models).parent.mkdir(parents=True, exist_ok=True)
        f.local_path(models).write_bytes(b"w" * 8)
    gone = required[-1]
    api, comfy = free_port(), free_port()
    base = f"http://127.0.0.1:{api}"
    with container(image, "python", "-u", "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
                   "--rp_api_port", str(api), env={"DIFFBOX_COMFYUI_PORT": str(comfy)}, volume=volume):
        wait_for_api(f"{base}/docs")
        sampled = post(f"{base}/runsync", {"input": {"workflow": sampler_graph(4)}})
        check(sampled.get("status") == "COMPLETED", f"the tiny checkpoint's job: {json.dumps(sampled)[:800]}")
        images = output_files(sampled["output"], "image")
        check(len(images) == 1, f"the tiny checkpoint's job: {json.dumps(sampled)[:500]}")
        picture = Image.open(io.BytesIO(base64.b64decode(images[0]["data"])))
        check(picture.size == (64, 64), f"the tiny checkpoint's image is {picture.size}")
        passed("(c) a job on the volume's tiny checkpoint: a 64x64 image decoded")

        history = requests.get(f"http://127.0.0.1:{comfy}/history", timeout=10).json()
        missing = post(f"{base}/runsync", {"input": {"workflow": "i2v", "image": png_b64((200, 10, 10), (64, 64)),
                                                     "prompt": "x"}})
        error = json.dumps(missing.get("error", missing.get("output", "")))
        fetch = f"python -m builder download --workflows i2v --presets fast --dest {VOLUME_TARGET}/models"
        check(f"{gone.folder}/{gone.name} (missing)" in error and fetch in error,
              f"the missing file's error: {json.dumps(missing)[:1200]}")
        after = requests.get(f"http://127.0.0.1:{comfy}/history", timeout=10).json()
        check(len(after) == len(history), "the job with a missing file reached ComfyUI")
        passed(f"(d) a volume without {gone.name}: the error names it and `{fetch}`; nothing queued")


def layer_sizes(image: str) -> None:
    done = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", image)
    log("figures: image layers (docker history, newest first; what a user pulls, uncompressed):")
    for line in done.stdout.splitlines():
        size, _, created = line.partition("\t")
        if size not in ("0B", "0"):
            print(f"  {size:>9}  {created[:110]}", flush=True)
    total = docker("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()
    log(f"figures: image size {int(total) / 1e9:.2f} GB")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="diffbox-test/worker:image-test")
    parser.add_argument("--tiny-models", type=Path, required=True, help="the tests' tiny models (comfyui_env)")
    args = parser.parse_args(argv)
    log_dir = Path(os.environ["IMAGE_TEST_LOGS"])
    with tempfile.TemporaryDirectory(prefix="diffbox-image-test-") as tmp:
        work = Path(tmp)
        context = work / "context"
        make_context(context)
        try:
            first = build_and_check_weights(context, args.tag, log_dir)
            again = incremental_build(context, args.tag, log_dir)
            layer_sizes(args.tag)
            sdk_test_mode(args.tag)
            serve_api(args.tag)
            volume_jobs(args.tag, args.tiny_models, work)
        except Failed as exc:
            print(f"image-test: FAILED: {exc}", file=sys.stderr, flush=True)
            print(f"image-test: {len(PASSED)} passed, 1 failed", flush=True)
            return 1
    log(f"figures: build {first.seconds:.0f} s (cold when the layer cache was empty), "
        f"{again.seconds:.0f} s after a one-line change")
    print(f"image-test: {len(PASSED)} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
