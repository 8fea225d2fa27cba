"""Tiny seeded Real-ESRGAN checkpoints in the real ``.pth`` format.

The file is what Real-ESRGAN releases: ``torch.save({"params_ema": state_dict})`` of basicsr's ``RRDBNet``,
loadable with ``torch.load(weights_only=True)``. Only the architecture numbers are tiny. The weights are
not pure noise: a seeded perturbation of a hand-set path that carries the RGB input straight through the
network, so the output looks like a nearest-neighbour upscale of the input (for x2, of the input
box-filtered to half size: RRDBNet x2 pixel-unshuffles, then upsamples x4).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from torch import nn

from studio.compat import import_realesrgan
from studio.files import write_bytes_atomic

logger = logging.getLogger(__name__)

TINY_ARCH: dict[str, int] = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}
_NOISE = 0.005  # std of the seeded perturbation on every weight
_RGB = 3


def write_esrgan(path: Path, *, scale: int, seed: int = 0) -> dict[str, int]:
    """Write a tiny seeded Real-ESRGAN ``.pth`` ({"params_ema": ...}); returns RRDBNet's arch kwargs."""
    if scale not in (2, 4):
        raise ValueError(f"Real-ESRGAN scale must be 2 or 4, got {scale}")
    arch = {**TINY_ARCH, "scale": scale}
    # 1. build the net (basicsr needs the torchvision shim first)
    import_realesrgan()
    from basicsr.archs.rrdbnet_arch import RRDBNet

    with torch.random.fork_rng(devices=[]):  # basicsr's own init must not touch the caller's RNG
        net = RRDBNet(num_in_ch=_RGB, num_out_ch=_RGB, **arch)
    # 2. seeded weights around an RGB pass-through path
    _perturb_(net, torch.Generator().manual_seed(seed))
    _pass_rgb_through_(net, scale)
    # 3. serialise exactly as the Real-ESRGAN releases (tensors only: weights_only loading works)
    buffer = io.BytesIO()
    torch.save({"params_ema": {k: v.contiguous() for k, v in net.state_dict().items()}}, buffer)
    write_bytes_atomic(Path(path), buffer.getvalue())
    logger.info("tiny Real-ESRGAN x%d written to %s (seed %d)", scale, path, seed)
    return arch


@torch.no_grad()
def _perturb_(net: nn.Module, generator: torch.Generator) -> None:
    """Replace every parameter with small seeded noise (conv weights [out, in, 3, 3], biases [out])."""
    for param in net.parameters():
        param.copy_(_NOISE * torch.randn(param.shape, generator=generator, dtype=torch.float32))


@torch.no_grad()
def _pass_rgb_through_(net: nn.Module, scale: int) -> None:
    """Route RGB through feature channels 0..2 with centre-tap identities (LeakyReLU keeps x >= 0)."""
    centre = 1  # 3x3 kernels: [out, in, ky, kx], the centre tap is [.., .., 1, 1]
    for channel in range(_RGB):
        if scale == 2:
            # pixel_unshuffle(x, 2) puts colour c's 2x2 sub-pixels in channels 4c..4c+3: average them
            for sub in range(4):
                net.conv_first.weight[channel, 4 * channel + sub, centre, centre] += 0.25
        else:
            net.conv_first.weight[channel, channel, centre, centre] += 1.0
        for conv in (net.conv_up1, net.conv_up2, net.conv_hr, net.conv_last):
            conv.weight[channel, channel, centre, centre] += 1.0
