"""Perceiver resampler: face-encoder tokens plus the ArcFace embedding -> a few learned query tokens.

The recognizer's spatial tokens [B, T, C] are projected to the UNet's cross-attention width D; the
512-d embedding becomes one more token. Learned queries [Q, D] attend over [inputs; queries] in
``depth`` pre-LayerNorm layers (attention + feed-forward, both residual) and a final LayerNorm gives
[B, Q, D]. The spatial tokens get fixed sinusoidal positions (in their row-major h x w order) so the
queries can tell, say, an eye region from the mouth: attention alone is blind to token order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from studio.adapter.layers import MultiHeadAttention
from studio.errors import ModelError

_FF_MULT = 4


class _PerceiverLayer(nn.Module):
    """Queries attend over [inputs; queries], then a feed-forward; pre-LayerNorm, residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_inputs = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dim // heads)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, _FF_MULT * dim),
            nn.GELU(),
            nn.Linear(_FF_MULT * dim, dim),
        )

    def forward(self, queries: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Update ``queries`` [B, Q, D] from ``inputs`` [B, T+1, D]."""
        normed = self.norm_queries(queries)  # [B, Q, D]
        keys = torch.cat([self.norm_inputs(inputs), normed], dim=1)  # [B, T+1+Q, D]
        queries = queries + self.attn(normed, keys)  # [B, Q, D]
        return queries + self.ff(queries)  # [B, Q, D]


class Resampler(nn.Module):
    """Perceiver resampler: (tokens [B, T, C], embedding [B, E]) -> [B, Q, out_dim]."""

    def __init__(
        self,
        token_dim: int,
        embed_dim: int,
        out_dim: int,
        num_queries: int = 16,
        depth: int = 2,
        heads: int = 8,
    ) -> None:
        super().__init__()
        if heads < 1 or out_dim % heads:
            raise ModelError(
                f"Resampler width {out_dim} is not divisible by {heads} attention heads.",
                fix="choose a head count that divides the UNet's cross-attention width.",
            )
        self.token_proj = nn.Linear(token_dim, out_dim)  # face tokens C -> D
        self.embed_proj = nn.Linear(embed_dim, out_dim)  # ArcFace embedding E -> one token of D
        self.queries = nn.Parameter(torch.randn(num_queries, out_dim) / math.sqrt(out_dim))  # [Q, D]
        self.layers = nn.ModuleList(_PerceiverLayer(out_dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Resample face tokens [B, T, C] and embeddings [B, E] into [B, Q, out_dim]."""
        spatial = self.token_proj(tokens)  # [B, T, C] -> [B, T, D]
        spatial = spatial + _sinusoid(spatial.shape[1], spatial.shape[2], spatial)  # + [T, D]
        inputs = torch.cat([spatial, self.embed_proj(embedding)[:, None]], dim=1)  # [B, T+1, D]
        queries = self.queries.expand(tokens.shape[0], -1, -1)  # [Q, D] -> [B, Q, D]
        for layer in self.layers:
            queries = layer(queries, inputs)
        return self.norm_out(queries)  # [B, Q, D]


def _sinusoid(length: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed sinusoidal positions [length, dim] (sin half, cos half), on ``like``'s device and dtype."""
    half = dim // 2
    steps = torch.arange(half, device=like.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(10_000.0) * steps / max(half, 1))  # [half]
    angles = torch.arange(length, device=like.device, dtype=torch.float32)[:, None] * freqs  # [T, half]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)  # [T, 2*half]
    if dim % 2:
        table = torch.cat([table, table.new_zeros(length, 1)], dim=1)  # [T, dim]
    return table.to(like.dtype)
