"""A tiny seeded IP-Adapter-FaceID for the tiny SD 1.5, in the original public ``.bin`` format.

``h94/IP-Adapter-FaceID/ip-adapter-faceid_sd15.bin`` is ``torch.save`` of a dict of two state dicts
(tensors only, float16):

- ``image_proj`` (the original ``MLPProjModel``): ``proj.0`` Linear(512 -> 1024), GELU, ``proj.2``
  Linear(1024 -> tokens * cross_dim), ``norm`` LayerNorm(cross_dim); 4 tokens, cross_dim 768 in SD 1.5.
- ``ip_adapter``: one entry per UNet attention processor, numbered ``0..N-1`` in the order of
  ``unet.attn_processors`` (attn1, attn2 alternate in every transformer block). Every processor carries a
  LoRA ``{i}.to_{q,k,v,out}_lora.{down,up}.weight`` (down [rank, in], up [out, rank]; rank 128 in the
  public file); the cross-attention ones (odd ``i``) also carry ``{i}.to_k_ip.weight`` and
  ``{i}.to_v_ip.weight`` [hidden, cross_dim].

The tiny file keeps every name and the 512-d identity input; widths follow the tiny UNet and the LoRA
rank is 4. Weights are seeded noise scaled to change the picture visibly: not a face model.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from studio.files import write_bytes_atomic

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]  # original IP-Adapter key -> float16 tensor (layouts in the docstring)

ID_EMBED_DIM = 512  # insightface ArcFace normed_embedding
NUM_TOKENS = 4  # image tokens added to every cross-attention (as the public SD 1.5 file)
PROJ_MULT = 2  # proj.0 widens 512 -> 1024 (as the public file)
LORA_RANK = 4  # 128 in the public file
_LORA_UP_SCALE = 0.3  # std of lora up relative to 1/sqrt(rank): a visible, bounded change
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")


def write_tiny_faceid(path: Path, unet_folder: Path, *, seed: int = 0) -> None:
    """Write a tiny seeded ``ip-adapter-faceid``-format ``.bin`` that fits the UNet in ``unet_folder``."""
    generator = torch.Generator().manual_seed(seed)
    # 1. the attention layout of the target UNet (built on meta: shapes only, no weights)
    config = UNet2DConditionModel.load_config(Path(unet_folder))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    cross_dim = int(unet.config.cross_attention_dim)
    # 2. the two state dicts of the public file
    state = {
        "image_proj": _half(_image_proj(cross_dim, generator)),
        "ip_adapter": _half(_ip_layers(unet, cross_dim, generator)),
    }
    # 3. torch.save of tensors only, as the public release (loads with torch.load(weights_only=True))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(Path(path), buffer.getvalue())
    logger.info("tiny IP-Adapter-FaceID written to %s (seed %d)", path, seed)


def _image_proj(cross_dim: int, generator: torch.Generator) -> StateDict:
    """MLPProjModel weights: Linear [out, in] + bias, LayerNorm weight/bias [cross_dim]."""
    hidden = ID_EMBED_DIM * PROJ_MULT
    out = cross_dim * NUM_TOKENS
    return {
        "proj.0.weight": _randn((hidden, ID_EMBED_DIM), generator) * ID_EMBED_DIM**-0.5 * 4.0,
        "proj.0.bias": _randn((hidden,), generator) * 0.1,
        "proj.2.weight": _randn((out, hidden), generator) * hidden**-0.5,
        "proj.2.bias": _randn((out,), generator) * 0.1,
        "norm.weight": 1.0 + _randn((cross_dim,), generator) * 0.1,
        "norm.bias": _randn((cross_dim,), generator) * 0.1,
    }


def _ip_layers(unet: UNet2DConditionModel, cross_dim: int, generator: torch.Generator) -> StateDict:
    """LoRA for every attention processor; to_k_ip / to_v_ip for the cross-attention ones (odd index)."""
    state: StateDict = {}
    for index, name in enumerate(unet.attn_processors):
        attention = unet.get_submodule(name.removesuffix(".processor"))
        hidden = attention.to_q.in_features  # the block's width: query_dim == inner dim in SD 1.5
        context = cross_dim if name.endswith("attn2.processor") else hidden
        fan_in = {"to_q": hidden, "to_k": context, "to_v": context, "to_out": hidden}
        for target in _LORA_TARGETS:
            state[f"{index}.{target}_lora.down.weight"] = (
                _randn((LORA_RANK, fan_in[target]), generator) * fan_in[target] ** -0.5
            )
            state[f"{index}.{target}_lora.up.weight"] = (
                _randn((hidden, LORA_RANK), generator) * _LORA_UP_SCALE * LORA_RANK**-0.5
            )
        if name.endswith("attn2.processor"):
            state[f"{index}.to_k_ip.weight"] = _randn((hidden, cross_dim), generator) * cross_dim**-0.5
            state[f"{index}.to_v_ip.weight"] = _randn((hidden, cross_dim), generator) * cross_dim**-0.5
    return state


def _half(state: StateDict) -> StateDict:
    """float16 and contiguous, as the public file."""
    return {key: value.half().contiguous() for key, value in state.items()}


def _randn(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)
