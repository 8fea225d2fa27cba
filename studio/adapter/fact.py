"""FACT face adapter: face tokens -> Perceiver resampler -> serial gated attention in every UNet block.

The torch side of ``studio.adapter`` (re-exported there lazily, so importing the package stays light).

Usage (inference)::

    adapter = load_adapter(path, base_family="sd15", encoder_sha256=sha, unet=pipe.unet)  # weights.py
    attach(adapter, pipe.unet)
    kwargs = adapter.face_kwargs(tokens, embedding, scale=0.8, cfg=guidance_scale > 1)
    pipe(prompt, cross_attention_kwargs=kwargs)
    detach(pipe.unet)  # the UNet is the base model again

The face context travels through diffusers' GLIGEN hook (see ``layers.py``); strength is the
context's ``scale`` (0 = off exactly). With ``cfg=True`` the context batch is [uncond; cond], the
order diffusers builds its guidance batch in; "uncond" is the zero face condition (all-zero tokens and
embedding), the same condition training uses when it drops the face.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from studio.adapter.layers import (
    FaceContext,
    FaceFuser,
    attach_fusers,
    detach_fusers,
    transformer_block_dims,
)
from studio.adapter.resampler import Resampler
from studio.adapter.tokens import EMBEDDING_SIZE
from studio.errors import AdapterError, InputError, ModelError

BaseFamily = Literal["sd15", "sdxl"]
BASE_FAMILIES: tuple[BaseFamily, ...] = get_args(BaseFamily)


@dataclass(frozen=True, kw_only=True)
class AdapterSpec:
    """Everything that fixes an adapter's shapes and what it was trained with."""

    format_version: int = 1
    base_family: BaseFamily
    face_encoder: str  # catalogue name of the recognizer whose tokens it reads, e.g. "w600k_r50"
    encoder_sha256: str  # sha256 of that recognizer file: tokens of another encoder mean nothing
    token_shape: tuple[int, int]  # (T, C): face tokens per crop and their width, e.g. (49, 512)
    num_queries: int = 16
    cross_attention_dim: int  # the UNet's text width D: resampler output width
    block_dims: tuple[int, ...]  # each transformer block's width, UNet order (down, mid, up)
    heads: int = 8
    depth: int = 2

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise AdapterError(
                f"Invalid face-adapter description: {'; '.join(problems)}.",
                fix="rebuild the adapter with build_adapter() or re-export its file.",
            )


def _spec_problems(spec: AdapterSpec) -> list[str]:
    """Reasons ``spec`` is inconsistent (empty when it is fine)."""
    problems = []
    if spec.base_family not in BASE_FAMILIES:
        problems.append(f"base_family {spec.base_family!r} is not one of {BASE_FAMILIES}")
    if len(spec.token_shape) != 2 or min(spec.token_shape) < 1:
        problems.append(f"token_shape {spec.token_shape} is not (T, C) with T, C >= 1")
    positive = {"num_queries": spec.num_queries, "heads": spec.heads, "depth": spec.depth}
    problems += [f"{key} {value} < 1" for key, value in positive.items() if value < 1]
    if spec.heads >= 1 and spec.cross_attention_dim % spec.heads:
        problems.append(f"cross_attention_dim {spec.cross_attention_dim} not divisible by {spec.heads} heads")
    if not spec.block_dims or any(d < 1 or d % max(spec.heads, 1) for d in spec.block_dims):
        problems.append(f"block_dims {spec.block_dims} are not positive multiples of {spec.heads} heads")
    return problems


class FaceAdapter(nn.Module):
    """The trainable part of FACT: a resampler and one fuser per UNet transformer block."""

    def __init__(self, spec: AdapterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.resampler = Resampler(
            spec.token_shape[1],
            EMBEDDING_SIZE,
            spec.cross_attention_dim,
            spec.num_queries,
            spec.depth,
            spec.heads,
        )
        self.fusers = nn.ModuleList(
            FaceFuser(dim, spec.cross_attention_dim, spec.heads, dim // spec.heads) for dim in spec.block_dims
        )

    def context(self, tokens: Any, embedding: Any, *, scale: float, cfg: bool) -> FaceContext:
        """Resampled face context for face tokens [B, T, C] and embeddings [B, 512]; [uncond; cond] if cfg."""
        tokens, embedding = self._prepare_condition(tokens, embedding)
        scale = _checked_scale(scale)
        cond = self.resampler(tokens, embedding)  # [B, Q, D]
        if not cfg:
            return FaceContext(cond, scale)
        uncond = self.resampler(torch.zeros_like(tokens), torch.zeros_like(embedding))  # [B, Q, D]
        return FaceContext(torch.cat([uncond, cond]), scale)  # [2B, Q, D]: diffusers' CFG order

    def face_kwargs(self, tokens: Any, embedding: Any, *, scale: float, cfg: bool) -> dict[str, Any]:
        """``cross_attention_kwargs`` for a diffusers pipeline or UNet call: the GLIGEN hook's objects."""
        return {"gligen": {"objs": self.context(tokens, embedding, scale=scale, cfg=cfg)}}

    def _prepare_condition(self, tokens: Any, embedding: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, T, C] and embeddings [B, 512] as tensors on the adapter's device and dtype."""
        reference = self.resampler.queries
        tokens = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens)
        embedding = torch.as_tensor(np.asarray(embedding) if not torch.is_tensor(embedding) else embedding)
        wanted = tuple(self.spec.token_shape)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != wanted:
            raise AdapterError(
                f"Face tokens of shape {tuple(tokens.shape)} received; this adapter reads "
                f"[B, {wanted[0]}, {wanted[1]}] tokens of {self.spec.face_encoder}.",
                fix=f"compute the tokens with {self.spec.face_encoder} (re-enrol the identity with it).",
            )
        if embedding.shape != (tokens.shape[0], EMBEDDING_SIZE):
            raise InputError(
                f"Embeddings of shape {tuple(embedding.shape)} received; expected ({tokens.shape[0]}, "
                f"{EMBEDDING_SIZE}), one per token set.",
                fix="pass the embedding of the same crop as the tokens.",
            )
        like = {"device": reference.device, "dtype": reference.dtype}
        return tokens.to(**like), embedding.to(**like)


def _checked_scale(scale: float) -> float:
    """The adapter strength as a float: finite and >= 0."""
    value = float(scale)
    if not np.isfinite(value) or value < 0:
        raise InputError(f"Face adapter scale {scale!r} received; expected a number >= 0.", fix="use 0 to 1.")
    return value


def build_adapter(
    unet: nn.Module,
    *,
    base_family: BaseFamily,
    face_encoder: str,
    encoder_sha256: str,
    token_shape: tuple[int, int],
    num_queries: int = 16,
    heads: int = 8,
    depth: int = 2,
) -> FaceAdapter:
    """A fresh (untrained, gates closed) adapter sized for ``unet``, float32 on the UNet's device."""
    cross = unet.config.cross_attention_dim
    if not isinstance(cross, int):
        raise ModelError(
            f"This UNet has per-block cross-attention widths {cross}; the face adapter needs one width.",
            fix="use an SD 1.5 or SDXL UNet.",
        )
    spec = AdapterSpec(
        base_family=base_family,
        face_encoder=face_encoder,
        encoder_sha256=encoder_sha256,
        token_shape=(int(token_shape[0]), int(token_shape[1])),
        num_queries=num_queries,
        cross_attention_dim=cross,
        block_dims=tuple(transformer_block_dims(unet)),
        heads=heads,
        depth=depth,
    )
    return FaceAdapter(spec).to(device=unet.device, dtype=torch.float32)


def check_fits(spec: AdapterSpec, unet: nn.Module) -> None:
    """Raise AdapterError unless the adapter's widths match ``unet`` (cross-attention and block widths)."""
    cross, blocks = unet.config.cross_attention_dim, tuple(transformer_block_dims(unet))
    if spec.cross_attention_dim != cross:
        raise AdapterError(
            f"The face adapter was made for cross-attention width {spec.cross_attention_dim} "
            f"({spec.base_family}), but this UNet has {cross}.",
            fix="use an adapter trained for this base model family, or train one (train_adapter.py).",
        )
    if spec.block_dims != blocks:
        raise AdapterError(
            f"The face adapter was made for {len(spec.block_dims)} transformer blocks of widths "
            f"{list(spec.block_dims)}, but this UNet has {len(blocks)} of widths {list(blocks)}.",
            fix="use an adapter trained for this UNet architecture, or train one (train_adapter.py).",
        )


def attach(adapter: FaceAdapter, unet: nn.Module) -> None:
    """Put the adapter's fusers into ``unet`` (replacing a previously attached face adapter)."""
    check_fits(adapter.spec, unet)
    detach_fusers(unet)
    attach_fusers(unet, adapter.fusers)


def detach(unet: nn.Module) -> None:
    """Take any face adapter out of ``unet``: it is then exactly the base model."""
    detach_fusers(unet)


def set_recording(adapter: FaceAdapter, on: bool) -> None:
    """Start or stop recording each fuser's increment (with its graph) for the FAIR loss; clears old ones."""
    for fuser in _fusers(adapter):
        fuser.recording = on
        fuser.last_increment = None


def increments(adapter: FaceAdapter) -> list[torch.Tensor]:
    """Each fuser's increment [B, N, C] from the latest UNet forward, in UNet order (down, mid, up)."""
    recorded = [fuser.last_increment for fuser in _fusers(adapter)]
    missing = [i for i, inc in enumerate(recorded) if inc is None]
    if missing:
        raise ModelError(
            f"Fuser layers {missing} recorded no increment.",
            fix="call set_recording(adapter, True) and run the UNet with the face context first.",
        )
    return [inc for inc in recorded if inc is not None]


def _fusers(adapter: FaceAdapter) -> Sequence[FaceFuser]:
    """The adapter's fusers, typed."""
    return [fuser for fuser in adapter.fusers if isinstance(fuser, FaceFuser)]
