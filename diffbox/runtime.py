"""The worker's process-wide state: settings and backends, made once per container.

A container starts in two phases, so that Modal can take a memory snapshot between them:

- `prepare`: what every container may share. Settings without storage credentials, the
  backends' supervisors and clients (no process, no socket). Nothing here touches the GPU,
  which is absent while Modal takes a CPU memory snapshot. With `booted` (GPU memory
  snapshots, where the GPU is there before the snapshot) the backends are started and warmed
  up here too, and their pooled connections closed before the snapshot.
- `start`: what each container needs of its own, after every restore. Settings read again
  (credentials, storage client), `random` reseeded, the backends started (and warmed up)
  unless `prepare` did it.

RunPod has no snapshots: `service()` runs both phases at once, as soon as handler.py loads,
so ComfyUI (and vLLM) boot while the platform is still connecting.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import random
from collections.abc import Iterator, Mapping

from . import logs
from .config import Settings
from .service import Service

log = logs.get("runtime")
# Storage settings and credentials (config.py reads S3 from these): read after a restore only,
# so no snapshot holds a key, a session token or a client made from them.
_STORAGE_PREFIXES = ("DIFFBOX_S3_", "BUCKET_", "AWS_")


@functools.cache
def service() -> Service:
    """Both phases at once (RunPod, local runs): the backends started and warmed up."""
    instance = prepare()
    start(instance)
    return instance


def prepare(booted: bool = False) -> Service:
    """Phase one (Modal: `@modal.enter(snap=True)`); `booted` also starts and warms up the
    backends (only where a GPU memory snapshot keeps them)."""
    logs.setup()
    with contextlib.nullcontext() if booted else _no_gpu():
        instance = Service(Settings.from_env(without_storage(os.environ)))
    # The backends run in sessions of their own, so no signal to the worker reaches them:
    # stop them when it exits (vLLM would otherwise keep its memory and port).
    atexit.register(instance.stop)
    if booted and instance.comfy is not None:
        # The snapshot must hold ComfyUI with its nodes imported, not half-way through. vLLM
        # starts after the restore: a snapshot taken while it loads would hold it half-started.
        instance.comfy.supervisor.start()
        instance.comfy.supervisor.ensure_ready(instance.settings.startup_timeout_s)
        instance.warm_up()
        instance.drop_connections()
    logs.event(log, "start phase done", phase="prepare", booted=booted)
    return instance


def start(instance: Service, booted: bool = False) -> None:
    """Phase two (Modal: `@modal.enter()`, after every restore); `booted` as `prepare` had it."""
    # A restored container would otherwise replay the snapshot's sequence (botocore's retry
    # jitter, any library's choices) in step with every other container restored from it.
    random.seed()
    instance.restored(Settings.from_env())
    if booted and instance.comfy is not None:
        # Restored with the snapshot: probed again before a job trusts it.
        instance.comfy.supervisor.mark_unready()
    instance.start()  # what is not running yet (all of it, unless `prepare` booted ComfyUI)
    if not booted:
        instance.warm_up()  # before the platform hands this worker a job
    logs.event(log, "start phase done", phase="start", booted=booted)


@contextlib.contextmanager
def _no_gpu() -> Iterator[None]:
    """No GPU for anything this phase starts or loads: a CPU snapshot is taken without one, and
    CUDA initialised then would stay without it (or fail) after the restore."""
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if previous is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def without_storage(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the variables that configure storage or hold its credentials."""
    return {k: v for k, v in env.items() if not k.startswith(_STORAGE_PREFIXES)}
