"""Tiny, seeded Stable Diffusion XL kit in the real file formats.

The components keep SDXL base 1.0's *architecture* with tiny widths, so the loading code that serves
``sd_xl_base_1.0.safetensors`` serves these unchanged:

- UNet: three levels (``DownBlock2D`` then two cross-attention levels, no attention at full resolution),
  a transformer depth that grows with depth (real ``[1, 2, 10]``, here ``[1, 2, 3]``), linear projections,
  and the ``text_time`` added conditioning (pooled text embedding + six size/crop numbers);
- two text encoders: a CLIP-L-shaped ``CLIPTextModel`` and an OpenCLIP-bigG-shaped
  ``CLIPTextModelWithProjection`` (GELU, MLP ratio 4, >= 10 layers so diffusers recognises the file);
  their hidden sizes add up to the UNet's cross-attention width, as 768 + 1280 = 2048;
- ``write_sdxl``: a diffusers folder *and* an original (Stability "SGM") single-file ``.safetensors``;
- ``write_controlnet_sdxl``: a ControlNet for that UNet, standing in for an SDXL openpose ControlNet.

The pictures these models draw are seeded noise, not portraits.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import diffusers
import safetensors.torch
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.files import write_bytes_atomic, write_text_atomic
from studio.models.tiny.diffusion import (
    TEXT_CONFIG,
    VAE_CONFIG,
    StateDict,
    _rename,
    _resnet_unet_names,
    _save_text_encoder,
    _seeded,
    _staged_folder,
    _unet_prefix_map,
    _vae_inner_names,
    _vae_prefix_map,
    _vae_tensor_to_ldm,
    write_controlnet,
)
from studio.models.tokenizer import MAX_LENGTH, VOCAB_SIZE, write_tokenizer

logger = logging.getLogger(__name__)

TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)
TEXT_2_CONFIG: dict[str, Any] = {  # OpenCLIP ViT-bigG-14's text tower at tiny width (real: 1280 x 32 layers)
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 256,  # MLP ratio 4, as OpenCLIP
    "num_hidden_layers": 10,  # diffusers detects SDXL by ``...resblocks.9.mlp.c_proj.bias``
    "num_attention_heads": 8,
    "max_position_embeddings": MAX_LENGTH,
    "hidden_act": "gelu",  # bigG uses exact GELU; CLIP-L uses quick_gelu
    "projection_dim": 64,
    "bos_token_id": 0,  # as SDXL's text_encoder_2/config.json (eos 2 selects the argmax pooling path)
    "eos_token_id": 2,
    "pad_token_id": 1,
}
ADD_TIME_DIM = 8  # real: 256
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,  # latent px; x8 VAE factor -> 64 px default images
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 3],
    "attention_head_dim": [4, 8, 8],  # diffusers' legacy name for the head count: 8-wide heads
    "use_linear_projection": True,
    # both encoders' penultimate hidden states, concatenated per token (real: 768 + 1280 = 2048)
    "cross_attention_dim": TEXT_CONFIG["hidden_size"] + TEXT_2_CONFIG["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": ADD_TIME_DIM,
    "projection_class_embeddings_input_dim": TIME_IDS * ADD_TIME_DIM + TEXT_2_CONFIG["projection_dim"],
    "norm_num_groups": 8,
}
VAE_XL_CONFIG: dict[str, Any] = {**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
# SDXL base 1.0's scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
TOKENIZER_2_PAD = "!"  # SDXL's tokenizer_2 pads with "!" (id 0), as OpenCLIP's tokenizer pads with 0
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIX = "conditioner.embedders.0.transformer."  # + HF CLIP names (text_model.*)
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # + OpenCLIP names (transformer.resblocks.N.*)
_LOGIT_SCALE = math.log(1 / 0.07)  # OpenCLIP's initial CLIP temperature; SGM keeps the key, nothing reads it

# diffusers SDXL UNet's added-condition MLP -> SGM's label_emb (Sequential: Linear, SiLU, Linear)
_ADD_EMBEDDING_NAMES = {
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
# transformers CLIP text layer names -> OpenCLIP ResidualAttentionBlock names (q/k/v are fused separately)
_OPEN_CLIP_LAYER_NAMES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_OPEN_CLIP_TOP_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_LAYER_PREFIX = "text_model.encoder.layers."


# ---------------------------------------------------------------- SDXL pipeline


def write_sdxl(folder: Path, single_file: Path, *, seed: int = 0) -> None:
    """Write a tiny seeded SDXL as a diffusers folder and as an original (SGM) single-file checkpoint."""
    # 1. build the seeded components (each from its own generator stream)
    unet = _seeded(lambda: UNet2DConditionModel.from_config(UNET_CONFIG), seed)
    vae = _seeded(lambda: AutoencoderKL.from_config(VAE_XL_CONFIG), seed + 1)
    text_encoder = _seeded(lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)), seed + 2)
    text_encoder_2 = _seeded(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2_CONFIG)), seed + 3)
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    # 2. the diffusers folder, staged and swapped in whole
    with _staged_folder(Path(folder)) as stage:
        unet.save_pretrained(stage / "unet", safe_serialization=True)
        vae.save_pretrained(stage / "vae", safe_serialization=True)
        _save_text_encoder(text_encoder, stage / "text_encoder")
        _save_text_encoder_2(text_encoder_2, stage / "text_encoder_2")
        scheduler.save_pretrained(stage / "scheduler")
        write_tokenizer(stage / "tokenizer")
        write_tokenizer_2(stage / "tokenizer_2")
        write_text_atomic(
            stage / "model_index.json", json.dumps(_model_index(), indent=2, sort_keys=True) + "\n"
        )
    # 3. the single file: the same tensors under the original SGM names
    checkpoint = diffusers_to_sgm(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), text_encoder_2.state_dict()
    )
    data = safetensors.torch.save(checkpoint, metadata={"format": "pt"})
    write_bytes_atomic(Path(single_file), data)
    logger.info("tiny SDXL written to %s and %s (seed %d)", folder, single_file, seed)


def write_tokenizer_2(folder: Path) -> None:
    """Write SDXL's ``tokenizer_2``: the same CLIP BPE files as ``tokenizer``, padding with ``"!"``."""
    folder = Path(folder)
    write_tokenizer(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((folder / name).read_text(encoding="utf-8"))
        config["pad_token"] = TOKENIZER_2_PAD
        write_text_atomic(folder / name, json.dumps(config, indent=2) + "\n")


def _save_text_encoder_2(model: CLIPTextModelWithProjection, folder: Path) -> None:
    """Save as SDXL's text_encoder_2/ does: ``text_model.*`` and ``text_projection.weight`` keys."""
    model.config.architectures = [type(model).__name__]
    model.config.dtype = torch.float32
    model.config.save_pretrained(folder)
    tensors = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    write_bytes_atomic(
        folder / "model.safetensors", safetensors.torch.save(tensors, metadata={"format": "pt"})
    )


def _model_index() -> dict[str, Any]:
    """model_index.json of SDXL base 1.0 (no watermarker: ``add_watermarker`` null, as upstream)."""
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "add_watermarker": None,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


# ---------------------------------------------------------------- diffusers -> original SGM names


def diffusers_to_sgm(
    unet: StateDict, vae: StateDict, text_encoder: StateDict, text_encoder_2: StateDict
) -> StateDict:
    """Map diffusers/transformers state dicts to one original SDXL (Stability generative-models) dict."""
    unet_map = {**_unet_prefix_map(UNET_CONFIG), **_ADD_EMBEDDING_NAMES}
    vae_map = _vae_prefix_map(VAE_XL_CONFIG)
    vae_names = {k: VAE_PREFIX + _rename(k, vae_map, _vae_inner_names) for k in vae}
    parts: list[StateDict] = [
        {UNET_PREFIX + _rename(k, unet_map, _resnet_unet_names): t for k, t in unet.items()},
        {vae_names[k]: _vae_tensor_to_ldm(k, t) for k, t in vae.items()},
        # transformers >= 5.6 flattened CLIPTextModel (no "text_model."); SGM keeps the HF names under it
        {f"{TEXT_PREFIX}text_model.{k.removeprefix('text_model.')}": t for k, t in text_encoder.items()},
        {OPEN_CLIP_PREFIX + k: t for k, t in clip_to_open_clip(text_encoder_2).items()},
        _sgm_extras(),
    ]
    checkpoint = {key: tensor for part in parts for key, tensor in part.items()}
    if len(checkpoint) != sum(len(part) for part in parts):
        raise ValueError(f"SGM key mapping collided: {sum(map(len, parts))} names in, {len(checkpoint)} out")
    return {key: tensor.detach().contiguous().clone() for key, tensor in checkpoint.items()}


def _sgm_extras() -> StateDict:
    """Tensors real SDXL files carry that no diffusers module holds (the loaders skip them)."""
    return {
        f"{TEXT_PREFIX}text_model.embeddings.position_ids": torch.arange(MAX_LENGTH)[None],  # [1, 77] int64
        f"{OPEN_CLIP_PREFIX}logit_scale": torch.tensor(_LOGIT_SCALE),  # scalar
    }


def clip_to_open_clip(state: StateDict) -> StateDict:
    """A transformers ``CLIPTextModelWithProjection`` state dict under OpenCLIP ``TextTransformer`` names."""
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # "transformer.resblocks.N.attn.in_proj_weight" -> q/k/v
    for key, tensor in state.items():
        if key in _OPEN_CLIP_TOP_NAMES:
            out[_OPEN_CLIP_TOP_NAMES[key]] = tensor
        elif key == "text_projection.weight":
            # Linear weight [proj, width] -> OpenCLIP parameter [width, proj], applied as x @ P
            out["text_projection"] = tensor.T
        elif key.startswith(_LAYER_PREFIX):
            layer, local = key[len(_LAYER_PREFIX) :].split(".", 1)
            block = f"transformer.resblocks.{layer}."
            if local.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                _, proj, kind = local.split(".")
                qkv.setdefault(f"{block}attn.in_proj_{kind}", {})[proj[0]] = tensor
            else:
                out[block + _rename_open_clip_layer(key, local)] = tensor
        elif key != "text_model.embeddings.position_ids":
            raise ValueError(f"no OpenCLIP name for text encoder tensor {key!r}")
    for key, parts in qkv.items():
        # OpenCLIP's nn.MultiheadAttention packs rows q | k | v: [3*width, width] weights, [3*width] biases
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _rename_open_clip_layer(key: str, local: str) -> str:
    """One transformer layer's module name, transformers -> OpenCLIP."""
    for old, new in _OPEN_CLIP_LAYER_NAMES.items():
        if local.startswith(old):
            return new + local[len(old) :]
    raise ValueError(f"no OpenCLIP name for text encoder tensor {key!r}")


# ---------------------------------------------------------------- ControlNet


def write_controlnet_sdxl(folder: Path, unet_folder: Path, *, seed: int = 0) -> None:
    """Write a seeded tiny SDXL ControlNet (diffusers format) for the SDXL UNet in ``unet_folder``."""
    unet_folder = Path(unet_folder)
    config_file = unet_folder / "unet" / "config.json"
    if not config_file.is_file():
        config_file = unet_folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("addition_embed_type") != "text_time":
        raise ValueError(
            f"{config_file} is not an SDXL UNet (addition_embed_type {config.get('addition_embed_type')!r}, "
            "expected 'text_time'); use write_controlnet for SD 1.5"
        )
    # ControlNetModel.from_unet copies SDXL's added conditioning and per-level transformer depths as is
    write_controlnet(folder, unet_folder, seed=seed)
