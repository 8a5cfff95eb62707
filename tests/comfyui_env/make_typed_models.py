"""Random-weight stand-ins for every file the typed workflows' presets name, so that a real
ComfyUI on the CPU runs `i2v`, `svi` and `qwen_edit` to their last node.

    COMFYUI_PYTHON make_typed_models.py COMFYUI_DIR MODELS_DIR MANIFEST

Writes MODELS_DIR/<folder>/<file name> for each file of `workflows/models.json` that a typed
preset lists. The tensors are named and shaped by ComfyUI's own classes (built on the meta
device, so nothing of full size is allocated twice), which is what ComfyUI's loaders check:
- ComfyUI fixes the shapes of the text encoders (umt5-xxl from its own config, Qwen2.5-VL 7B
  with its vision tower) and of the Wan 2.1 VAE (also Qwen-Image's), so those are full size;
- it reads the diffusion models' sizes from the file, so Wan's experts have one block of width
  128 and Qwen-Image-Edit's DiT one block of its fixed width;
- the `_fp8_scaled` files are in ComfyUI's scaled-fp8 layout (a `scaled_fp8` marker, linear
  weights in float8_e4m3fn with a float32 `scale_weight` each), so ComfyUI keeps those weights
  in fp8 in memory as it does with the published files; the other tensors are float32 (norms,
  which set the compute dtype) or bfloat16 (embeddings);
- the umt5 file carries its tokenizer (`spiece_model`, a tiny sentencepiece model trained here);
  Qwen's tokenizer ships inside ComfyUI;
- the LoRAs are rank 4 in the `<layer>.lora_down/lora_up.weight` + `.alpha` format that
  ComfyUI's LoRA loader maps onto these models, touching every linear layer of the blocks.
Files with the same architecture share their bytes (hard links). Fixed seeds: the same run
gives the same files.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SEED = 20
LORA_RANK = 4
# The Wan experts: ComfyUI reads dim, heads (dim / 128), ffn_dim, blocks and in_dim (36: noise
# plus the image conditioning of Wan 2.2 I2V) from the file.
WAN_DIT = {"model_type": "t2v", "in_dim": 36, "dim": 128, "ffn_dim": 256, "num_heads": 1, "num_layers": 1,
           "out_dim": 16, "text_dim": 4096, "freq_dim": 256, "text_len": 512}
# The Wan 2.1 VAE's fixed configuration, as comfy/sd.py builds it for this architecture.
WAN_VAE = {"dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
           "temperal_downsample": [False, True, True], "dropout": 0.0}
TOKENIZER_TEXT = [
    "a fox runs through the snow", "the camera pans slowly to the left", "make the sky blue",
    "a person walks, turns and sits down", "blurry, low quality, static, watermark",
]

Tensors = dict[str, Any]


def _generator(name: str) -> Any:
    import torch

    return torch.Generator().manual_seed(SEED + sum(name.encode()))


def _fp8(shape: tuple[int, ...], gen: Any) -> Any:
    """Random float8_e4m3fn values: random bytes with the exponent's top bit cleared, so no NaN
    and magnitudes of at most 1.875 (far quicker than drawing normals for billions of weights)."""
    import torch

    raw = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    raw.bitwise_and_(-65)  # 0b1011_1111
    return raw.view(torch.float8_e4m3fn)


_FP8_RMS: float | None = None


def _fp8_rms() -> float:
    global _FP8_RMS
    if _FP8_RMS is None:
        import torch

        sample = _fp8((1 << 20,), _generator("rms")).to(torch.float32)
        _FP8_RMS = float(sample.pow(2).mean().sqrt())
    return _FP8_RMS


def randomized(module: Any, name: str, fp8_linear: bool, scaled: bool, dense: Any) -> Tensors:
    """A state dict for `module` (built on the meta device): linear weights in fp8 (with a
    scale that keeps each layer's output at unit variance when `scaled`) or `dense`, other
    weights random, norm scales one, biases zero."""
    import torch

    gen = _generator(name)
    linears = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    embeddings = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Embedding)}
    out: Tensors = {}
    for key, param in module.state_dict(keep_vars=True).items():
        shape = tuple(param.shape)
        if key.endswith("scale_weight") or key.endswith("scale_input") or key == "scaled_fp8":
            continue
        if key in linears and fp8_linear:
            fan_in = shape[1]
            if scaled:
                out[key] = _fp8(shape, gen)
                out[key[:-len("weight")] + "scale_weight"] = torch.tensor(1.0 / (_fp8_rms() * math.sqrt(fan_in)))
            else:
                out[key] = (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(torch.float8_e4m3fn)
        elif key in embeddings:
            out[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        elif key.endswith("bias"):
            out[key] = torch.zeros(shape, dtype=torch.float32)
        elif len(shape) <= 1:
            out[key] = torch.ones(shape, dtype=torch.float32)
        else:
            fan_in = max(1, math.prod(shape[1:]))
            out[key] = (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dense)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def spiece_model() -> Any:
    """A tiny sentencepiece model's bytes as a uint8 tensor (how ComfyUI stores umt5's tokenizer)."""
    import sentencepiece
    import torch

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT), model_writer=buffer, vocab_size=40, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def umt5(comfy: Any) -> Tensors:
    import comfy.ops
    import comfy.text_encoders.t5
    import torch

    config_path = Path(comfy.text_encoders.t5.__file__).parent / "umt5_config_xxl.json"
    config = json.loads(config_path.read_text())
    with torch.device("meta"):
        model = comfy.text_encoders.t5.T5(config, torch.float32, "meta", comfy.ops.manual_cast)
    return randomized(model, "umt5", fp8_linear=True, scaled=True, dense=torch.bfloat16) | {
        "spiece_model": spiece_model()}


def qwen25_vl(comfy: Any) -> Tensors:
    import comfy.ops
    import comfy.text_encoders.llama
    import torch

    with torch.device("meta"):
        model = comfy.text_encoders.llama.Qwen25_7BVLI({}, torch.float32, "meta", comfy.ops.manual_cast)
    return randomized(model, "qwen25_vl", fp8_linear=True, scaled=True, dense=torch.bfloat16)


@functools.cache
def wan_dit(comfy: Any, name: str) -> Tensors:
    import comfy.ldm.wan.model
    import comfy.ops
    import torch

    with torch.device("meta"):
        model = comfy.ldm.wan.model.WanModel(**WAN_DIT, device="meta", dtype=torch.float32,
                                             operations=comfy.ops.manual_cast)
    return randomized(model, name, fp8_linear=True, scaled=True, dense=torch.float32)


def wan_vae(comfy: Any) -> Tensors:
    import comfy.ldm.wan.vae
    import torch

    with torch.device("meta"):
        model = comfy.ldm.wan.vae.WanVAE(**WAN_VAE)
    return randomized(model, "wan_vae", fp8_linear=False, scaled=False, dense=torch.float16)


@functools.cache
def qwen_dit(comfy: Any) -> Tensors:
    import comfy.ldm.qwen_image.model
    import comfy.ops
    import torch

    with torch.device("meta"):
        model = comfy.ldm.qwen_image.model.QwenImageTransformer2DModel(
            num_layers=1, device="meta", dtype=torch.float32, operations=comfy.ops.manual_cast)
    return randomized(model, "qwen_dit", fp8_linear=True, scaled=False, dense=torch.bfloat16)


def lora(model: Tensors, name: str, dtype: Any, prefix: str, blocks: str) -> Tensors:
    """A LoRA over every linear layer under `blocks` of `model`'s state dict, named as
    ComfyUI's key map names them (`prefix` + the layer's name)."""
    import torch

    gen = _generator(name)
    out: Tensors = {}
    for key, weight in model.items():
        if not (key.startswith(blocks) and key.endswith(".weight") and weight.dim() == 2
                and (key[:-len("weight")] + "scale_weight" in model or weight.dtype == torch.float8_e4m3fn)):
            continue
        layer = prefix + key[:-len(".weight")]
        features_out, features_in = weight.shape
        out[f"{layer}.lora_down.weight"] = (torch.randn(LORA_RANK, features_in, generator=gen)
                                            / math.sqrt(features_in)).to(dtype)
        out[f"{layer}.lora_up.weight"] = torch.randn(features_out, LORA_RANK, generator=gen).to(dtype)
        out[f"{layer}.alpha"] = torch.tensor(float(LORA_RANK))
    return out


def recipes(comfy: Any) -> dict[str, Callable[[], Tensors]]:
    """How each manifest key's stand-in is made (a manifest file without one is an error here)."""
    import torch

    wan = {"high": lambda: wan_dit(comfy, "wan_high"), "low": lambda: wan_dit(comfy, "wan_low")}

    def wan_lora(expert: str, name: str, dtype: Any) -> Callable[[], Tensors]:
        return lambda: lora(wan[expert](), name, dtype, "diffusion_model.", "blocks.")

    def qwen_lora(name: str) -> Callable[[], Tensors]:
        return lambda: lora(qwen_dit(comfy), name, torch.bfloat16, "", "transformer_blocks.")

    return {
        "wan22_i2v_high_fp8": wan["high"],
        "wan22_i2v_low_fp8": wan["low"],
        "wan22_i2v_lightx2v_high": wan_lora("high", "lightx2v_high", torch.bfloat16),
        "wan22_i2v_lightx2v_low": wan_lora("low", "lightx2v_low", torch.bfloat16),
        "wan21_vae": lambda: wan_vae(comfy),
        "umt5_xxl_fp8": lambda: umt5(comfy),
        "svi_pro_high": wan_lora("high", "svi_high", torch.float16),
        "svi_pro_low": wan_lora("low", "svi_low", torch.float16),
        "kj_wan22_i2v_lightx2v_high_v1030": wan_lora("high", "kj_high", torch.bfloat16),
        "kj_wan21_i2v_480p_lightx2v_distill": wan_lora("low", "kj_distill", torch.bfloat16),
        "qwen_edit_2511_fp8mixed": lambda: qwen_dit(comfy),
        "qwen_edit_2509_fp8": lambda: qwen_dit(comfy),
        "qwen_25_vl_7b_fp8": lambda: qwen25_vl(comfy),
        "qwen_image_vae": lambda: wan_vae(comfy),
        "qwen_edit_2511_lightning_4step": qwen_lora("qwen_lightning_2511"),
        "qwen_edit_2509_lightning_4step": qwen_lora("qwen_lightning_2509"),
    }


# Manifest keys whose stand-ins are the same bytes as another's (same architecture and seed).
SAME_AS = {"qwen_edit_2509_fp8": "qwen_edit_2511_fp8mixed", "qwen_image_vae": "wan21_vae"}


def typed_files(manifest: dict[str, Any]) -> Iterator[tuple[str, Path]]:
    """(key, folder/name) of every file a typed preset names, each once."""
    seen: set[str] = set()
    for presets in manifest["workflows"].values():
        for keys in presets.values():
            for key in keys:
                if key not in seen:
                    seen.add(key)
                    entry = manifest["files"][key]
                    yield key, Path(entry["folder"]) / Path(entry["path"]).name


def main(comfy_dir: Path, models: Path, manifest_path: Path) -> None:
    sys.path.insert(0, str(comfy_dir))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()  # or ComfyUI's modules ignore --cpu and look for a GPU
    import comfy.model_management  # (reads --cpu)
    import safetensors.torch

    manifest = json.loads(manifest_path.read_text())
    made = recipes(comfy)
    files = dict(typed_files(manifest))
    missing = sorted(set(files) - set(made))
    if missing:
        raise SystemExit(f"make_typed_models.py: no recipe for manifest file(s) {missing}")
    for key in sorted(files, key=lambda k: k in SAME_AS):
        path = models / files[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        if key in SAME_AS:
            os.link(models / files[SAME_AS[key]], path)
        else:
            tensors = made[key]()
            safetensors.torch.save_file(tensors, str(path))
            del tensors
        print(f"{files[key]}: {path.stat().st_size / 1e6:.1f} MB in {time.monotonic() - started:.1f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
