"""The worker's process-wide state: settings and backends, made once per container.

A container starts in two phases, so that Modal can take a memory snapshot between them:

- `prepare`: what every container may share. Settings without storage credentials, the
  backends' supervisors and clients; no socket. For a CPU snapshot (taken with no GPU),
  the first half of ComfyUI's start: its process importing torch and the other packages that
  need no GPU, then waiting (comfyui_preload.py). For a GPU snapshot (the GPU is there
  before it), ComfyUI started, ready and warmed up, its connections closed.
- `start`: what each container needs of its own, after every restore. Settings read again
  (credentials, storage client), `random` reseeded, the weights the first job will need read
  into the page cache in the background (prefetch.py: a snapshot is of processes, and Modal
  does not say it holds the page cache), ComfyUI let finish its start, the rest started
  (vLLM) and warmed up.

RunPod has no snapshots: `service()` runs both phases at once, as soon as handler.py loads,
so ComfyUI (and vLLM) boot while the platform is still connecting.
"""

from __future__ import annotations

import atexit
import functools
import os
import random
import time
from collections.abc import Mapping
from typing import Literal

from . import logs
from .config import Settings
from .memory import release_free_memory
from .service import Service

log = logs.get("runtime")
# Storage settings and credentials (config.py reads S3 from these): read after a restore only,
# so no snapshot holds a key, a session token or a client made from them.
_STORAGE_PREFIXES = ("DIFFBOX_S3_", "BUCKET_", "AWS_")
# What the container is restored from: nothing, a CPU memory snapshot, or a GPU one.
Snapshot = Literal["none", "cpu", "gpu"]


@functools.cache
def service() -> Service:
    """Both phases at once (RunPod, local runs): the backends started and warmed up."""
    instance = prepare()
    start(instance)
    return instance


def prepare(snapshot: Snapshot = "none") -> Service:
    """Phase one (Modal: `@modal.enter(snap=True)`), for the kind of snapshot taken after it."""
    t0 = time.monotonic()
    logs.setup()
    instance = Service(Settings.from_env(without_storage(os.environ)))
    # The backends run in sessions of their own, so no signal to the worker reaches them:
    # stop them when it exits (vLLM would otherwise keep its memory and port).
    atexit.register(instance.stop)
    comfy = instance.comfy
    if snapshot == "cpu" and comfy is not None:
        comfy.preload(instance.settings.startup_timeout_s)
    elif snapshot == "gpu" and comfy is not None:
        # The snapshot must hold ComfyUI with its nodes imported, not half-way through. vLLM
        # starts after the restore: a snapshot taken while it loads would hold it half-started.
        comfy.supervisor.start()
        comfy.supervisor.ensure_ready(instance.settings.startup_timeout_s)
        instance.warm_up()
        instance.drop_connections()
    logs.event(log, "start phase done", phase="prepare", snapshot=snapshot, seconds=logs.since(t0))
    return instance


def start(instance: Service, snapshot: Snapshot = "none") -> None:
    """Phase two (Modal: `@modal.enter()`, after every restore), `snapshot` as `prepare` had it."""
    t0 = time.monotonic()
    # A restored container would otherwise replay the snapshot's sequence (botocore's retry
    # jitter, any library's choices) in step with every other container restored from it.
    random.seed()
    instance.restored(Settings.from_env())
    # A GPU snapshot holds the warm-up's weights loaded: those need no reading.
    instance.start_prefetch(warmed=snapshot == "gpu")
    comfy = instance.comfy
    if comfy is not None:
        comfy.release()
        if snapshot == "gpu":
            comfy.supervisor.mark_unready()  # restored with the snapshot: probed before trusted
    instance.start()  # what is not running yet
    if snapshot != "gpu":
        instance.warm_up()  # before the platform hands this worker a job
    release_free_memory()  # what start-up and warm-up freed
    logs.event(log, "start phase done", phase="start", snapshot=snapshot, seconds=logs.since(t0))


def without_storage(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the variables that configure storage or hold its credentials."""
    return {k: v for k, v in env.items() if not k.startswith(_STORAGE_PREFIXES)}
