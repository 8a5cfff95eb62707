"""Random-weight models that let a real ComfyUI sample on the CPU in milliseconds a step.

    COMFYUI_PYTHON make_tiny_models.py COMFYUI_DIR MODELS_DIR

Writes, in ComfyUI's folder layout under MODELS_DIR:
- checkpoints/tiny.safetensors: a UNet that ComfyUI's own detection takes for SD1.5
  (model_channels 320, context_dim 768, no linear transformer in/out) but with one level and
  one res block, a random CLIP-L text model, and TAESD as its VAE;
- vae_approx/taesd_encoder.safetensors, taesd_decoder.safetensors (`VAELoader` "taesd").
It loads the checkpoint back through ComfyUI to prove the detection. Runs in ComfyUI's venv
with ComfyUI's modules, so the shapes are the ones that ComfyUI builds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

SEED = 1234


def _randomize(module: Any) -> None:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # norm scales
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def main(comfy_dir: Path, models: Path) -> None:
    sys.path.insert(0, str(comfy_dir))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    # Without this, ComfyUI's modules ignore --cpu and look for a GPU driver on import.
    comfy.options.enable_args_parsing()
    import comfy.model_management  # reads --cpu
    import comfy.ops
    import comfy.sd
    import comfy.sd1_clip
    import safetensors.torch
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD

    ops = comfy.ops.disable_weight_init
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                     channel_mult=(1,), num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                     transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
                     use_linear_in_transformer=False, legacy=False, operations=ops)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    taesd = TAESD()
    for module in (unet, clip, taesd):
        _randomize(module)
    taesd_parts = {"encoder": taesd.taesd_encoder.state_dict(), "decoder": taesd.taesd_decoder.state_dict()}

    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    checkpoint |= {f"cond_stage_model.{k}": v for k, v in clip.state_dict().items()}
    for part, state in taesd_parts.items():
        checkpoint |= {f"first_stage_model.taesd_{part}.{k}": v for k, v in state.items()}
    # TAESD's latent scale for SD1.5, as nodes.VAELoader.load_taesd sets it.
    checkpoint |= {"first_stage_model.vae_scale": torch.tensor(0.18215),
                   "first_stage_model.vae_shift": torch.tensor(0.0)}
    for folder in ("checkpoints", "vae_approx"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    path = models / "checkpoints" / "tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous().half() for k, v in checkpoint.items()}, str(path))
    for part, state in taesd_parts.items():
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                                    str(models / "vae_approx" / f"taesd_{part}.safetensors"))

    model, clip_loaded, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    detected = type(model.model.model_config).__name__
    if detected != "SD15" or clip_loaded is None or vae is None:
        raise SystemExit(f"{path}: ComfyUI detects {detected}, clip {clip_loaded}, vae {vae}: not a usable SD1.5")
    print(f"{path}: detected as {detected}, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M UNet parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
