"""handler.py picks its kind and concurrency from the endpoint's settings at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

# Each configuration imports handler.py afresh in one interpreter (the import is what makes
# the worker's service); backends are attached by URL, so nothing is started.
PROBE = """
import importlib, json, os, sys
from diffbox import runtime
out = []
for env in json.loads(sys.argv[1]):
    for key in [k for k in os.environ if k.startswith("DIFFBOX_")]:
        del os.environ[key]
    os.environ.update(env)
    runtime.service.cache_clear()
    loaded = sys.modules.get("handler")
    handler = importlib.reload(loaded) if loaded else importlib.import_module("handler")
    config = handler.runpod_config()
    out.append([config["handler"].__name__, config["return_aggregate_stream"], config["concurrency_modifier"](1)])
print(json.dumps(out))
"""

COMFY = {"DIFFBOX_COMFYUI_URL": "http://127.0.0.1:9"}
VLLM = {"DIFFBOX_VLLM_URL": "http://127.0.0.1:9"}
CASES = [
    ({"DIFFBOX_BACKENDS": "comfyui", "DIFFBOX_CONCURRENCY": "8", **COMFY}, ["handler", True, 1]),
    ({"DIFFBOX_BACKENDS": "vllm", "DIFFBOX_CONCURRENCY": "8", **VLLM}, ["stream_handler", True, 8]),
    ({"DIFFBOX_BACKENDS": "vllm", **VLLM}, ["stream_handler", True, 1]),
    # ComfyUI runs one graph at a time: an endpoint serving it takes one job at a time.
    ({"DIFFBOX_BACKENDS": "comfyui,vllm", "DIFFBOX_CONCURRENCY": "8", **COMFY, **VLLM}, ["stream_handler", True, 1]),
    ({"DIFFBOX_BACKENDS": "comfyui,vllm", "DIFFBOX_WORKFLOWS": "i2v", **COMFY, **VLLM}, ["handler", True, 1]),
]


def test_generator_where_chat_is_served_and_concurrency_only_without_comfyui() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFBOX_", "RUNPOD_"))}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps([c for c, _ in CASES])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [expected for _, expected in CASES]
