"""FACT's serial adapter layers: a gated attention over [image tokens; face tokens] in every UNet block.

diffusers' ``BasicTransformerBlock`` already has the hook FACT needs: when ``cross_attention_kwargs``
holds ``{"gligen": {"objs": ...}}``, each block runs ``hidden_states = self.fuser(hidden_states, objs)``
after self-attention and before text cross-attention (GLIGEN's gated self-attention slot), and the UNet
first passes the objects through ``unet.position_net``. ``attach_fusers`` fills both slots: a
``FaceFuser`` in every block and a relay that hands the precomputed ``FaceContext`` through unchanged.
This is the one place the studio changes diffusers' UNet behaviour; ControlNet models are never touched
(their pipelines do not pass ``cross_attention_kwargs`` to them), so ControlNet never sees face tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import ModelError

if TYPE_CHECKING:
    from diffusers.models.attention import BasicTransformerBlock

_FUSER_ATTR = "fuser"  # the BasicTransformerBlock attribute its GLIGEN hook calls
_RELAY_ATTR = "position_net"  # the UNet attribute its GLIGEN hook calls once per forward


@dataclass(frozen=True, eq=False)
class FaceContext:
    """Face tokens for the UNet's fusers and the strength they are applied with."""

    tokens: torch.Tensor  # [B, Q, D] resampled face tokens, D = the UNet's cross-attention width
    scale: float  # 0 turns the adapter off exactly; 1 is the trained strength


class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries over keys/values (scaled dot product, no mask)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, kv_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.query = nn.Linear(query_dim, inner, bias=False)
        self.key_value = nn.Linear(kv_dim or query_dim, 2 * inner, bias=False)
        self.out = nn.Linear(inner, query_dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Attend ``queries`` [B, Nq, Dq] over ``keys`` [B, Nk, Dk]; returns [B, Nq, Dq]."""
        q = self.query(queries)  # [B, Nq, H*E]
        k, v = self.key_value(keys).chunk(2, dim=-1)  # 2 x [B, Nk, H*E]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, N, E]
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, H, Nq, E]
        return self.out(attended.transpose(1, 2).flatten(2))  # [B, H, Nq, E] -> [B, Nq, H*E] -> [B, Nq, Dq]


class FaceFuser(nn.Module):
    """Serial gated attention: x + scale * tanh(alpha) * Attn(LN([x; Linear(face)]))[:, :N], alpha init 0."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.query_dim = query_dim
        self.context_proj = nn.Linear(context_dim, query_dim)  # face tokens D -> this block's width
        self.norm = nn.LayerNorm(query_dim)
        self.attn = MultiHeadAttention(query_dim, heads, head_dim)
        self.alpha = nn.Parameter(torch.zeros(()))  # gate tanh(alpha): closed at initialisation
        self.recording = False  # keep the increment (with its graph) for the FAIR loss
        self.last_increment: torch.Tensor | None = None  # [B, N, query_dim], set only while recording

    def forward(self, x: torch.Tensor, objs: FaceContext) -> torch.Tensor:
        """Add the gated face increment to the image tokens ``x`` [B, N, query_dim]."""
        if not isinstance(objs, FaceContext):
            raise ModelError(
                f"The face fuser received {type(objs).__name__}; expected a FaceContext.",
                fix="pass cross_attention_kwargs=adapter.face_kwargs(...) to a UNet with the face adapter.",
            )
        if objs.scale == 0:
            if self.recording:
                self.last_increment = torch.zeros_like(x)
            return x
        weight = self.alpha
        context = _match_batch(objs.tokens, x.shape[0]).to(device=x.device, dtype=weight.dtype)  # [B, Q, D]
        gate = objs.scale * torch.tanh(weight)
        increment = (gate * self._forward_attention(x.to(weight.dtype), context)).to(x.dtype)  # [B, N, C]
        if self.recording:
            self.last_increment = increment
        return x + increment

    def _forward_attention(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attn(LN([x; proj(context)])) for the image rows only: [B, N, C]."""
        face = self.context_proj(context)  # [B, Q, D] -> [B, Q, C]
        normed = self.norm(torch.cat([x, face], dim=1))  # [B, N+Q, C]; LayerNorm is per token
        # only the first N outputs are kept, so only the image rows need to be queries
        return self.attn(normed[:, : x.shape[1]], normed)  # [B, N, C]


class FaceContextRelay(nn.Module):
    """Stands in the UNet's ``position_net`` slot: hands the precomputed FaceContext through unchanged."""

    def forward(self, objs: FaceContext) -> FaceContext:
        """Return ``objs`` as given (the resampler ran once, before the denoising loop)."""
        return objs


def _match_batch(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """Face tokens [b, Q, D] repeated to the image batch: each row for batch // b consecutive images.

    diffusers orders a CFG batch as [uncond x n; cond x n] (n images per prompt), so repeating each
    context row n times in place keeps uncond rows with uncond images.
    """
    rows = tokens.shape[0]
    if rows == batch:
        return tokens
    if rows == 0 or batch % rows:
        raise ModelError(
            f"Face context has {rows} row(s) but the UNet batch is {batch}; it must divide the batch.",
            fix="build the context with cfg=True when the pipeline uses classifier-free guidance.",
        )
    return tokens.repeat_interleave(batch // rows, dim=0)  # [b, Q, D] -> [batch, Q, D]


def _transformer_blocks(unet: nn.Module) -> list[BasicTransformerBlock]:
    """Every BasicTransformerBlock of the UNet in a fixed order: down blocks, mid block, up blocks."""
    from diffusers.models.attention import BasicTransformerBlock  # heavy import, only with a UNet at hand

    parts: list[nn.Module] = [
        *unet.down_blocks,
        *([unet.mid_block] if unet.mid_block else []),
        *unet.up_blocks,
    ]
    return [m for part in parts for m in part.modules() if isinstance(m, BasicTransformerBlock)]


def transformer_block_dims(unet: nn.Module) -> list[int]:
    """Each transformer block's hidden width, in UNet order (down, mid, up)."""
    return [int(block.dim) for block in _transformer_blocks(unet)]


def attach_fusers(unet: nn.Module, fusers: nn.ModuleList) -> None:
    """Set ``block.fuser`` on every transformer block (UNet order) and the context relay on the UNet."""
    blocks = _transformer_blocks(unet)
    if len(blocks) != len(fusers):
        raise ModelError(
            f"The adapter has {len(fusers)} fuser layers but this UNet has {len(blocks)} transformer blocks.",
            fix="use an adapter trained for this base model family.",
        )
    widths = [(int(b.dim), int(f.query_dim)) for b, f in zip(blocks, fusers, strict=True)]
    if any(block != fuser for block, fuser in widths):
        raise ModelError(
            f"Fuser widths {[f for _, f in widths]} do not match the UNet's block widths "
            f"{[b for b, _ in widths]}.",
            fix="use an adapter trained for this base model.",
        )
    _check_free(unet, blocks)
    for block, fuser in zip(blocks, fusers, strict=True):
        setattr(block, _FUSER_ATTR, fuser)
    setattr(unet, _RELAY_ATTR, FaceContextRelay())


def detach_fusers(unet: nn.Module) -> None:
    """Remove the face fusers and the context relay: the UNet is the base model again."""
    for block in _transformer_blocks(unet):
        if isinstance(getattr(block, _FUSER_ATTR, None), FaceFuser):
            delattr(block, _FUSER_ATTR)
    if isinstance(getattr(unet, _RELAY_ATTR, None), FaceContextRelay):
        delattr(unet, _RELAY_ATTR)


def _check_free(unet: nn.Module, blocks: list[BasicTransformerBlock]) -> None:
    """Refuse a UNet whose GLIGEN slots hold something other than the face adapter's own layers."""
    relay = getattr(unet, _RELAY_ATTR, None)
    fusers = [getattr(b, _FUSER_ATTR, None) for b in blocks]
    taken = [f for f in fusers if f is not None and not isinstance(f, FaceFuser)]
    if taken or not (relay is None or isinstance(relay, FaceContextRelay)):
        raise ModelError(
            "This UNet already uses its GLIGEN slots (a GLIGEN model); the face adapter needs them.",
            fix="use a plain SD 1.5 / SDXL base model with the face adapter.",
        )
