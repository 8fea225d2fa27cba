"""FACT's FAIR loss: diffusion MSE plus a penalty on the adapter's increments outside the face.

Each fuser adds an increment [B, N, C] to its block's image tokens; N = h*w tokens in row-major order
(diffusers' Transformer2DModel flattens [B, C, h, w] to [B, h*w, C]). The face mask, given at latent
(or any) resolution [B, 1, H, W], is resized to every layer's h x w grid, and the penalty is the mean
over layers of mean((1 - mask) * increment²) over all of the layer's elements, so increments inside
the face are free and those outside cost their squared size, weighted by the area they cover.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from studio.errors import InputError


def fair_loss(
    noise_pred: torch.Tensor,
    target: torch.Tensor,
    increments: Sequence[torch.Tensor],
    face_mask: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, mse, penalty): total = MSE(noise_pred, target) + lam * mean outside-face increment²."""
    mse = F.mse_loss(noise_pred.float(), target.float())
    if face_mask.ndim != 4 or face_mask.shape[1] != 1:
        raise InputError(f"Face mask of shape {tuple(face_mask.shape)} received; expected [B, 1, H, W].")
    if not increments:
        penalty = mse.new_zeros(())
        return mse + lam * penalty, mse, penalty
    penalty = torch.stack([_layer_penalty(inc, face_mask) for inc in increments]).mean()
    return mse + lam * penalty, mse, penalty


def _layer_penalty(increment: torch.Tensor, face_mask: torch.Tensor) -> torch.Tensor:
    """mean((1 - mask) * increment²) for one layer's increment [B, N, C] on its own token grid."""
    batch, tokens, _ = increment.shape
    if face_mask.shape[0] != batch:
        raise InputError(
            f"Face mask batch {face_mask.shape[0]} does not match the increment batch {batch}.",
            fix="pass one mask per training image.",
        )
    h, w = _token_grid(tokens, face_mask.shape[2], face_mask.shape[3])
    mask = F.interpolate(face_mask.float(), size=(h, w), mode="area")  # [B, 1, H, W] -> [B, 1, h, w]
    outside = 1.0 - mask.permute(0, 2, 3, 1).reshape(batch, h * w, 1)  # [B, 1, h, w] -> [B, h*w, 1]
    return (outside * increment.float().pow(2)).mean()  # [B, N, C] -> ()


def _token_grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) with h*w = tokens whose aspect ratio is closest to height:width (the latent's)."""
    target = math.log(height / width)
    pairs = [(h, tokens // h) for h in range(1, tokens + 1) if tokens % h == 0]
    h, w = min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - target))
    if abs(math.log(h / w) - target) > math.log(1.5):
        raise InputError(
            f"No token grid for {tokens} tokens matches the mask's {height}x{width} aspect ratio "
            f"(closest {h}x{w}).",
            fix="pass the face mask at the latent's aspect ratio.",
        )
    return h, w
