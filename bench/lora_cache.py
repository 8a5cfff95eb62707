"""What a request's LoRA costs the worker: a download (cache miss), then cache hits.

    uv run python bench/lora_cache.py [--mb 200]

Serves a random LoRA of about --mb MB from the loopback Hub (tests/fakes/hf_hub.py) and fetches
it through the worker's own path (diffbox/loras) into a temporary cache, printing the time of a
miss (download, safetensors check, sha256, rename), a hit at a branch (one HEAD to the Hub) and
a hit at a commit id (no request). Loopback has no network cost: a real download adds the
transfer time, which a hit never pays. The loopback Hub hashes the file to answer each HEAD
(about 1.5 s for 200 MB here): that part of the first two figures is the fake's, not the worker's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from diffbox.config import Settings
from diffbox.inputs.urls import UrlPolicy
from diffbox.loras.fetch import fetcher_for
from diffbox.loras.request import LoraEntry
from tests.fakes.hf_hub import serve_fake_hub
from tests.lorafiles import safetensors_bytes


def lora_of(megabytes: float) -> bytes:
    rank, features = 64, 2048  # one 2048-wide layer's up and down (F16) is 0.5 MB
    layers = max(1, int(megabytes * 2))
    zeros = b"\0" * (rank * features * 2)
    tensors = {}
    for i in range(layers):
        prefix = f"diffusion_model.blocks.{i}.self_attn.q"
        tensors[f"{prefix}.lora_down.weight"] = ("F16", [rank, features], zeros)
        tensors[f"{prefix}.lora_up.weight"] = ("F16", [features, rank], zeros)
    return safetensors_bytes(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mb", type=float, default=200.0, help="size of the LoRA (default 200 MB)")
    args = parser.parse_args()
    data = lora_of(args.mb)
    with tempfile.TemporaryDirectory() as tmp, serve_fake_hub() as hub:
        hub.add("bench/lora", "lora.safetensors", data)
        commit = hub.commit("bench/lora")
        settings = Settings(models_dir=Path(tmp), hf_endpoint=hub.url, max_lora_mb=args.mb * 2 + 1)
        fetcher = fetcher_for(settings, UrlPolicy(), None)
        print(f"LoRA: {len(data) / 1e6:.1f} MB")
        for label, source in [("miss (download)", "hf://bench/lora/lora.safetensors"),
                              ("hit at main (one HEAD)", "hf://bench/lora/lora.safetensors"),
                              ("hit at a commit (no request)", f"hf://bench/lora@{commit}/lora.safetensors")]:
            asked = len(hub.requests)
            t0 = time.perf_counter()
            job = fetcher.fetch([LoraEntry(source=source)], lambda done, total: None, lambda: False, lambda: 600.0)
            elapsed = time.perf_counter() - t0
            job.release()
            print(f"{label:<30} {elapsed * 1000:9.1f} ms  cache_hit={job.files[0].cache_hit}  "
                  f"requests={len(hub.requests) - asked}")


if __name__ == "__main__":
    main()
