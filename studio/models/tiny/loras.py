"""Tiny seeded style LoRAs for the tiny SD 1.5, in the two layouts found in the wild.

- kohya (sd-scripts / A1111 / civitai): ``lora_unet_<module_with_underscores>.lora_down.weight``
  [r, in(, 1, 1)], ``.lora_up.weight`` [out, r(, 1, 1)], ``.alpha`` (scalar; the delta is
  up @ down * alpha / r), text encoder under ``lora_te_text_model_...``; float16 like most published files.
- diffusers / peft: ``unet.<module>.lora_A.weight`` [r, in], ``unet.<module>.lora_B.weight`` [out, r],
  ``text_encoder.text_model.<module>...``; no alphas (scale 1), float32.

Module names and shapes come from the tiny architecture in ``diffusion.py`` (built on the meta device).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from studio.files import write_bytes_atomic
from studio.models.tiny.diffusion import TEXT_CONFIG, UNET_CONFIG
from studio.models.weights import safetensors_bytes

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]  # LoRA tensor name -> tensor (layouts in the module docstring)

RANK = 4
KOHYA_ALPHA = 2.0  # kohya's usual alpha = rank / 2
FILE_NAMES = {"kohya": "tiny-style-kohya.safetensors", "diffusers": "tiny-style-diffusers.safetensors"}
_UP_SCALE = 0.6  # std of lora_up relative to 1/sqrt(rank): visible change, no blow-up
# kohya's SD 1.x targets: UNet transformers' attention, MLP, proj_in/out (1x1 convs); CLIP attention + MLP
_KOHYA_UNET = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
_KOHYA_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# diffusers' train_text_to_image_lora targets
_DIFFUSERS_UNET = ("to_q", "to_k", "to_v", "to_out.0")
_DIFFUSERS_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj")


def write_loras(folder: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write two different seeded style LoRAs; returns {"kohya": path, "diffusers": path}."""
    folder = Path(folder)
    unet_modules, text_modules = _tiny_modules()
    paths = {style: folder / name for style, name in FILE_NAMES.items()}
    # 1. kohya layout, float16, with alphas and sd-scripts metadata
    generator = torch.Generator().manual_seed(seed)
    kohya = _kohya_state_dict(unet_modules, text_modules, generator)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(KOHYA_ALPHA),
        "ss_base_model_version": "sd_v1",
    }
    write_bytes_atomic(paths["kohya"], safetensors_bytes(kohya, metadata))
    # 2. diffusers layout from an independent seed, so the two styles differ
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    peft = _diffusers_state_dict(unet_modules, text_modules, generator)
    write_bytes_atomic(paths["diffusers"], safetensors_bytes(peft, {"format": "pt"}))
    logger.info("tiny LoRAs written to %s (seed %d)", folder, seed)
    return paths


def _tiny_modules() -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
    """Leaf Linear/Conv2d modules of the tiny UNet and text encoder, by name (built on meta: no weights)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNET_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    unet_modules = {name: m for name, m in unet.named_modules() if isinstance(m, layers)}
    text_modules = {
        n.removeprefix("text_model."): m for n, m in text.named_modules() if isinstance(m, layers)
    }
    return unet_modules, text_modules


def _select(modules: dict[str, torch.nn.Module], suffixes: tuple[str, ...], within: str) -> list[str]:
    """Sorted names inside a ``within`` container (e.g. "transformer_blocks") ending in a suffix."""
    return sorted(n for n in modules if within in n and n.endswith(tuple("." + s for s in suffixes)))


def _kohya_state_dict(
    unet: dict[str, torch.nn.Module], text: dict[str, torch.nn.Module], generator: torch.Generator
) -> StateDict:
    """kohya names: prefix + module path with "." -> "_"; down/up/alpha per module, float16."""
    state: StateDict = {}
    targets = [("lora_unet_", n, unet[n]) for n in _select(unet, _KOHYA_UNET, "attentions")]
    targets += [("lora_te_text_model_", n, text[n]) for n in _select(text, _KOHYA_TEXT, "encoder.layers")]
    for prefix, name, module in targets:
        down, up = _lora_pair(module, generator)
        key = prefix + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down.half()
        state[f"{key}.lora_up.weight"] = up.half()
        state[f"{key}.alpha"] = torch.tensor(KOHYA_ALPHA, dtype=torch.float16)
    return state


def _diffusers_state_dict(
    unet: dict[str, torch.nn.Module], text: dict[str, torch.nn.Module], generator: torch.Generator
) -> StateDict:
    """peft names: ``unet.<module>.lora_A.weight`` / ``lora_B``; the text encoder keeps ``text_model.``."""
    state: StateDict = {}
    targets = [("unet.", n, unet[n]) for n in _select(unet, _DIFFUSERS_UNET, "transformer_blocks")]
    targets += [
        ("text_encoder.text_model.", n, text[n]) for n in _select(text, _DIFFUSERS_TEXT, "encoder.layers")
    ]
    for prefix, name, module in targets:
        down, up = _lora_pair(module, generator)
        state[f"{prefix}{name}.lora_A.weight"] = down
        state[f"{prefix}{name}.lora_B.weight"] = up
    return state


def _lora_pair(module: torch.nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (down [r, in(,1,1)], up [out, r(,1,1)]); 1x1 convs keep their trailing kernel dims."""
    if isinstance(module, torch.nn.Conv2d):
        fan_in, fan_out, kernel = module.in_channels, module.out_channels, (1, 1)
    else:
        fan_in, fan_out, kernel = module.in_features, module.out_features, ()
    down = torch.randn((RANK, fan_in, *kernel), generator=generator) / fan_in**0.5
    up = torch.randn((fan_out, RANK, *kernel), generator=generator) * (_UP_SCALE / RANK**0.5)
    return down, up
