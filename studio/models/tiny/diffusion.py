"""Tiny, seeded Stable Diffusion 1.5 kit in the real file formats.

The components keep SD 1.5's *architecture* (block types, layer counts, LDM key layout, tokenizer,
scheduler) with tiny widths, so the loading code that serves real weights serves these unchanged:

- the real CLIP BPE tokenizer (49408 tokens), written by the production ``studio.models.tokenizer`` from
  the vocabulary that ships in the ``open_clip_torch`` wheel (re-exported here as ``write_tokenizer``);
- ``write_sd15``: a diffusers folder *and* an original-LDM single-file ``.safetensors`` checkpoint;
- ``write_controlnet``: a ControlNet for that UNet, standing in for ``control_v11p_sd15_openpose``.

The pictures these models draw are seeded noise, not portraits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import safetensors.torch
import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from studio.files import write_bytes_atomic, write_text_atomic
from studio.models.tokenizer import BOS_ID as BOS_ID  # re-exported: the kit's tokenizer facts
from studio.models.tokenizer import EOS_ID as EOS_ID
from studio.models.tokenizer import MAX_LENGTH, VOCAB_SIZE, write_tokenizer

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]  # parameter name -> tensor (layouts as in the owning module)
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

# SD 1.5's block structure (4 levels, 2 layers per block, cross-attention in the first three) at tiny widths.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,  # latent px; x8 VAE factor -> 64 px default images
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "attention_head_dim": 8,  # diffusers' legacy name: 8 heads, as SD 1.5
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
# Four levels keep SD's x8 latent factor (ControlNet's hint embedding also downsamples x8).
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
# Token ids in the config follow SD 1.5's text_encoder/config.json (eos 2 selects the argmax pooling path).
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# SD 1.5's scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
}
CONTROLNET_HINT_CHANNELS = (8, 16, 16, 32)  # 4 entries -> x8 downsampling of the pose image, as the real one
_UNET_PREFIX, _VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
_TEXT_PREFIX = "cond_stage_model.transformer.text_model."


# ---------------------------------------------------------------- SD 1.5 pipeline


def write_sd15(folder: Path, single_file: Path, *, seed: int = 0) -> None:
    """Write a tiny seeded SD 1.5 as a diffusers folder and as an original-LDM single-file checkpoint."""
    # 1. build the seeded components (each from its own generator stream)
    unet = _seeded(lambda: UNet2DConditionModel.from_config(UNET_CONFIG), seed)
    vae = _seeded(lambda: AutoencoderKL.from_config(VAE_CONFIG), seed + 1)
    text_encoder = _seeded(lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)), seed + 2)
    scheduler = PNDMScheduler.from_config(SCHEDULER_CONFIG)
    # 2. the diffusers folder, staged and swapped in whole
    with _staged_folder(Path(folder)) as stage:
        unet.save_pretrained(stage / "unet", safe_serialization=True)
        vae.save_pretrained(stage / "vae", safe_serialization=True)
        _save_text_encoder(text_encoder, stage / "text_encoder")
        scheduler.save_pretrained(stage / "scheduler")
        write_tokenizer(stage / "tokenizer")
        write_text_atomic(
            stage / "model_index.json", json.dumps(_model_index(), indent=2, sort_keys=True) + "\n"
        )
    # 3. the single file: the same tensors under the original LDM names
    checkpoint = diffusers_to_ldm(unet.state_dict(), vae.state_dict(), text_encoder.state_dict())
    data = safetensors.torch.save(checkpoint, metadata={"format": "pt"})
    write_bytes_atomic(Path(single_file), data)
    logger.info("tiny SD 1.5 written to %s and %s (seed %d)", folder, single_file, seed)


def _save_text_encoder(model: CLIPTextModel, folder: Path) -> None:
    """Save as SD 1.5's text_encoder/ does: ``text_model.``-prefixed keys (transformers 5 saves them flat)."""
    model.config.architectures = [type(model).__name__]
    model.config.dtype = torch.float32
    model.config.save_pretrained(folder)
    tensors = {
        f"text_model.{k.removeprefix('text_model.')}": v.contiguous() for k, v in model.state_dict().items()
    }
    write_bytes_atomic(
        folder / "model.safetensors", safetensors.torch.save(tensors, metadata={"format": "pt"})
    )


def _model_index() -> dict[str, Any]:
    """model_index.json of an SD 1.5 repo without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _seeded(build: Callable[[], ModuleT], seed: int) -> ModuleT:
    """Build a module (its own init kept off the caller's RNG), then overwrite its weights from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        module = build()
    _seeded_init_(module, torch.Generator().manual_seed(seed))
    return module.eval()


@torch.no_grad()
def _seeded_init_(module: torch.nn.Module, generator: torch.Generator, scale: float = 1.0) -> None:
    """Overwrite every parameter from ``generator``: fan-in scaled normals, norms near 1, small biases."""
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if param.ndim >= 2:  # Linear [out, in], Conv [out, in, kh, kw], Embedding [vocab, dim]
            fan_in = param[0].numel()
            param.copy_(noise * (scale / fan_in**0.5))
        elif name.endswith("weight"):  # GroupNorm / LayerNorm scales
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(0.02 * noise)


@contextlib.contextmanager
def _staged_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty sibling folder that replaces ``folder`` only when the block completes."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    stage.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary model folder
    try:
        yield stage
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(stage, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------- diffusers -> original LDM names


def diffusers_to_ldm(unet: StateDict, vae: StateDict, text_encoder: StateDict) -> StateDict:
    """Map diffusers/transformers state dicts to one original SD 1.x (CompVis LDM) checkpoint dict."""
    checkpoint: StateDict = {}
    unet_map = _unet_prefix_map(UNET_CONFIG)
    for key, tensor in unet.items():
        checkpoint[_UNET_PREFIX + _rename(key, unet_map, _resnet_unet_names)] = tensor
    vae_map = _vae_prefix_map(VAE_CONFIG)
    for key, tensor in vae.items():
        checkpoint[_VAE_PREFIX + _rename(key, vae_map, _vae_inner_names)] = _vae_tensor_to_ldm(key, tensor)
    for key, tensor in text_encoder.items():  # transformers >= 5.6 flattened CLIPTextModel (no "text_model.")
        checkpoint[_TEXT_PREFIX + key.removeprefix("text_model.")] = tensor
    expected = len(unet) + len(vae) + len(text_encoder)
    if len(checkpoint) != expected:
        raise ValueError(f"LDM key mapping collided: {expected} tensors in, {len(checkpoint)} names out")
    return {key: tensor.detach().contiguous().clone() for key, tensor in checkpoint.items()}


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str]) -> str:
    """Swap the longest matching module prefix, then the block-local module name where LDM differs."""
    match = max((p for p in prefixes if key.startswith(p)), key=len, default="")
    if not match:
        return key  # same name in both layouts (e.g. encoder.conv_in, quant_conv)
    local = key[len(match) :]
    for old, new in inner.items():
        if local.startswith(old + "."):
            local = new + local[len(old) :]
            break
    return prefixes[match] + local


# diffusers ResnetBlock2D -> LDM ResBlock (UNet)
_resnet_unet_names = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# diffusers VAE resnet / mid attention -> LDM ResnetBlock / AttnBlock
_vae_inner_names = {
    "conv_shortcut": "nin_shortcut",
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _unet_prefix_map(config: dict[str, Any]) -> dict[str, str]:
    """diffusers UNet module prefixes -> LDM ``input_blocks/middle_block/output_blocks`` prefixes."""
    per = config["layers_per_block"]
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for block, up_type in enumerate(config["up_block_types"]):
        first_in, first_out = 1 + block * (per + 1), block * (per + 1)
        for layer in range(per):
            prefixes[f"down_blocks.{block}.resnets.{layer}."] = f"input_blocks.{first_in + layer}.0."
            prefixes[f"down_blocks.{block}.attentions.{layer}."] = f"input_blocks.{first_in + layer}.1."
        prefixes[f"down_blocks.{block}.downsamplers.0.conv."] = f"input_blocks.{first_in + per}.0.op."
        for layer in range(per + 1):
            prefixes[f"up_blocks.{block}.resnets.{layer}."] = f"output_blocks.{first_out + layer}.0."
            prefixes[f"up_blocks.{block}.attentions.{layer}."] = f"output_blocks.{first_out + layer}.1."
        slot = 2 if up_type.startswith("CrossAttn") else 1  # upsampler follows [resnet, (attention)]
        prefixes[f"up_blocks.{block}.upsamplers.0.conv."] = f"output_blocks.{first_out + per}.{slot}.conv."
    return prefixes


def _vae_prefix_map(config: dict[str, Any]) -> dict[str, str]:
    """diffusers AutoencoderKL module prefixes -> LDM ``encoder.down / decoder.up`` (reversed) prefixes."""
    levels, per = len(config["block_out_channels"]), config["layers_per_block"]
    prefixes = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for level in range(levels):
        ldm_up = levels - 1 - level  # LDM numbers decoder levels from the full-resolution end
        for layer in range(per):
            prefixes[f"encoder.down_blocks.{level}.resnets.{layer}."] = f"encoder.down.{level}.block.{layer}."
        prefixes[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = (
            f"encoder.down.{level}.downsample.conv."
        )
        for layer in range(per + 1):
            prefixes[f"decoder.up_blocks.{level}.resnets.{layer}."] = f"decoder.up.{ldm_up}.block.{layer}."
        prefixes[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = f"decoder.up.{ldm_up}.upsample.conv."
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        prefixes[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    return prefixes


def _vae_tensor_to_ldm(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention uses 1x1 convs: Linear [C, C] -> Conv2d [C, C, 1, 1]."""
    is_attention_weight = ".attentions." in key and key.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    )
    return tensor[:, :, None, None] if is_attention_weight else tensor


# ---------------------------------------------------------------- ControlNet


def write_controlnet(folder: Path, unet_folder: Path, *, seed: int = 0) -> None:
    """Write a seeded tiny ControlNet (diffusers format) for the UNet in ``unet_folder``."""
    # 1. the UNet: accept the pipeline folder or its unet/ subfolder
    unet_folder = Path(unet_folder)
    if (unet_folder / "unet" / "config.json").is_file():
        unet_folder = unet_folder / "unet"
    unet = UNet2DConditionModel.from_pretrained(unet_folder, local_files_only=True)
    # 2. copy it into a ControlNet as the real ones start, then seed the zero-initialised parts
    with torch.random.fork_rng(devices=[]):
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=CONTROLNET_HINT_CHANNELS
        )
    generator = torch.Generator().manual_seed(seed)
    for part in (
        controlnet.controlnet_cond_embedding,
        controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ):
        _seeded_init_(part, generator, scale=0.5)
    # 3. save staged
    with _staged_folder(Path(folder)) as stage:
        controlnet.save_pretrained(stage, safe_serialization=True)
    logger.info("tiny ControlNet written to %s (seed %d)", folder, seed)
