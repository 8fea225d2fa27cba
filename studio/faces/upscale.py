"""Real-ESRGAN face-crop upscaling: only the swapped face crop is upscaled, never the whole picture.

realesrgan and basicsr are imported only through :func:`studio.compat.import_realesrgan` (torchvision
shim). Weights are loaded with ``torch.load(weights_only=True)`` here, never by ``RealESRGANer`` itself:
see :func:`_prepare_runner` for why.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from studio.compat import import_realesrgan
from studio.errors import InputError, ModelError, UnsafeFileError
from studio.imageio import planes_to_bgr
from studio.models.catalogue import ModelEntry
from studio.types import ImageBGR

if TYPE_CHECKING:  # torch loads with the first upscaler (_load_state_dict)
    import torch

logger = logging.getLogger(__name__)

_ARCH_KEYS = ("num_feat", "num_block", "num_grow_ch")  # RRDBNet's size, from the catalogue entry's io
_SCALES = (1, 2, 4)  # the scales RRDBNet supports (pixel-unshuffle for 1 and 2)
_TILE_PAD = 10  # px of context around each tile, as Real-ESRGAN's own inference script
_RGB = 3


class Upscaler:
    """A loaded Real-ESRGAN network that upscales HxWx3 uint8 BGR crops by a fixed integer factor."""

    def __init__(self, runner: Any, scale: int, name: str) -> None:
        self._runner = runner  # realesrgan.RealESRGANer, weights already loaded
        self._scale = scale
        self._name = name
        self._lock = threading.Lock()  # RealESRGANer keeps per-call tensors on itself: one call at a time

    @property
    def scale(self) -> int:
        """The network's upscaling factor (2 or 4 for the released models)."""
        return self._scale

    @property
    def name(self) -> str:
        """The catalogue name of the loaded model."""
        return self._name

    def upscale(self, crop: ImageBGR) -> ImageBGR:
        """The crop ``scale`` times larger (HxWx3 uint8 BGR in, (sH)x(sW)x3 uint8 BGR out)."""
        _check_crop(crop)
        with self._lock:
            result = _forward_realesrgan(self._runner, crop, self._scale)
        return self._checked(crop, result)

    def upscale_many(self, crops: list[ImageBGR]) -> list[ImageBGR]:
        """Each crop ``scale`` times larger; crops of one size go through the network as one batch
        (untiled; a tiled upscaler takes them one by one). Same layout as :meth:`upscale`."""
        if self._runner.tile_size > 0 or len(crops) < 2:
            return [self.upscale(crop) for crop in crops]
        results: dict[int, ImageBGR] = {}
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, crop in enumerate(crops):
            _check_crop(crop)
            groups.setdefault(crop.shape, []).append(index)
        for indices in groups.values():
            with self._lock:
                batch = _forward_rrdbnet(self._runner, [crops[i] for i in indices])
            for index, image in zip(indices, batch, strict=True):
                results[index] = self._checked(crops[index], image)
        return [results[i] for i in range(len(crops))]

    def _checked(self, crop: ImageBGR, result: ImageBGR) -> ImageBGR:
        expected = (crop.shape[0] * self._scale, crop.shape[1] * self._scale, _RGB)
        if result.shape != expected or result.dtype != np.uint8:
            raise ModelError(
                f"{self._name}: upscaler returned {result.dtype} {result.shape}, expected uint8 {expected}.",
                fix="check the catalogue entry's io.scale against the model file.",
            )
        return result


def _check_crop(crop: ImageBGR) -> None:
    """Raise InputError unless ``crop`` is HxWx3 uint8."""
    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
        raise InputError(
            f"Crop to upscale is {getattr(crop, 'dtype', type(crop))} of shape {np.shape(crop)}.",
            fix="pass an HxWx3 uint8 BGR crop.",
        )


def load_upscaler(entry: ModelEntry, path: Path, *, tile: int, device: torch.device, half: bool) -> Upscaler:
    """A Real-ESRGAN upscaler for the catalogued ``entry`` whose weights file is ``path``."""
    # 1. check inputs: the architecture comes from the catalogue, never from the tensor shapes
    arch, scale = _architecture(entry)
    if tile < 0:
        raise InputError(f"Upscale tile {tile} received.", fix="use 0 (no tiling) or a tile size in px.")
    # 2. the network, with weights read without unpickling
    import_realesrgan()  # installs the torchvision shim basicsr needs
    from basicsr.archs.rrdbnet_arch import RRDBNet

    net = RRDBNet(num_in_ch=_RGB, num_out_ch=_RGB, scale=scale, **arch)
    try:
        net.load_state_dict(_load_state_dict(Path(path)), strict=True)
    except RuntimeError as err:
        raise ModelError(
            f"{entry.name}: {Path(path).name} does not fit RRDBNet({arch}, scale={scale}): {err}.",
            fix="check the catalogue entry's io facts (num_feat, num_block, num_grow_ch, scale).",
        ) from err
    # 3. the RealESRGANer runner around it
    runner = _prepare_runner(net, scale=scale, tile=tile, device=device, half=half)
    logger.info("upscaler %s loaded: x%d on %s%s", entry.name, scale, device, " (fp16)" if half else "")
    return Upscaler(runner, scale, entry.name)


def _architecture(entry: ModelEntry) -> tuple[dict[str, int], int]:
    """RRDBNet's keyword arguments (without scale) and the scale, from the entry's io facts."""
    if entry.kind != "upscaler":
        raise ModelError(f"{entry.name} is a {entry.kind}, not an upscaler.", fix="name an upscaler entry.")
    facts: Mapping[str, Any] = entry.io
    missing = [key for key in (*_ARCH_KEYS, "scale") if not isinstance(facts.get(key), int)]
    if missing or facts["scale"] not in _SCALES:
        raise ModelError(
            f"Catalogue entry {entry.name} has io {dict(facts)}: missing or bad {missing or ['scale']}.",
            fix=f"give integer io.{', io.'.join(_ARCH_KEYS)} and io.scale in {list(_SCALES)}.",
        )
    return {key: int(facts[key]) for key in _ARCH_KEYS}, int(facts["scale"])


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``params_ema`` (else ``params``) state dict of a Real-ESRGAN ``.pth``, read with weights_only."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(
            f"{path.name} holds Python objects besides tensors; loading it would run pickle code.",
            fix="use the released Real-ESRGAN .pth (tensors only) or a safetensors conversion.",
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        raise ModelError(
            f"{path} cannot be read as a torch checkpoint: {err}.", fix="re-download it."
        ) from err
    state = checkpoint.get("params_ema", checkpoint.get("params")) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            f"{path.name} has no 'params_ema' or 'params' state dict of tensors.",
            fix="use a Real-ESRGAN RRDBNet checkpoint.",
        )
    return state


def _prepare_runner(net: torch.nn.Module, *, scale: int, tile: int, device: torch.device, half: bool) -> Any:
    """A ``RealESRGANer`` around ``net`` (weights loaded), built without running ``RealESRGANer.__init__``.

    Why: ``RealESRGANer.__init__`` (realesrgan 0.3.0, utils.py) always calls ``torch.load(model_path)``
    without ``weights_only``. Passing a ready model does not stop that load; on torch < 2.6, or whenever
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set, it unpickles the file and can run code from it. So the
    weights are loaded above with ``weights_only=True`` and the runner gets exactly the attributes its
    ``__init__`` sets (a test compares them with a real one); ``enhance`` and tiling are used unchanged.
    """
    realesrgan = import_realesrgan()
    runner = realesrgan.RealESRGANer.__new__(realesrgan.RealESRGANer)
    runner.scale = scale
    runner.tile_size = tile
    runner.tile_pad = _TILE_PAD
    runner.pre_pad = 0  # no reflect padding: a face crop's border is never blended (the mask is 0 there)
    runner.mod_scale = None
    runner.half = half
    runner.device = device
    net.eval()
    runner.model = net.to(device)
    if half:
        runner.model = runner.model.half()
    return runner


def _forward_rrdbnet(runner: Any, crops: list[ImageBGR]) -> list[ImageBGR]:
    """One network call on same-size HxWx3 uint8 BGR crops, with ``RealESRGANer.enhance``'s arithmetic
    (x/255, RGB, NCHW; output clamped to [0, 1], x255 rounded); its reflect pre-pad only matters for odd
    sides at x2, which the swapper's even crops never have (``enhance`` still handles them)."""
    import torch

    if any(side % 2 for side in crops[0].shape[:2]):
        return [_forward_realesrgan(runner, crop, runner.scale) for crop in crops]
    stacked = np.stack(crops)[:, :, :, ::-1].astype(np.float32) / np.float32(255.0)  # NxHxWx3 BGR -> RGB
    tensor = torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))  # -> Nx3xHxW
    tensor = tensor.to(runner.device)
    if runner.half:
        tensor = tensor.half()
    with torch.inference_mode():
        output = runner.model(tensor).float().clamp_(0.0, 1.0).cpu().numpy()  # Nx3x(sH)x(sW) RGB
    return [planes_to_bgr(planes) for planes in output]  # each 3xHxW RGB -> HxWx3 uint8 BGR


def _forward_realesrgan(runner: Any, crop: ImageBGR, scale: int) -> ImageBGR:
    """One upscale: ``RealESRGANer.enhance`` takes and returns HxWx3 uint8 BGR (it swaps to RGB inside)."""
    if runner.tile_size > 0:
        # RealESRGANer.tile_process print()s a line per tile; keep that chatter off the user's terminal
        chatter = io.StringIO()
        with contextlib.redirect_stdout(chatter):
            output, _ = runner.enhance(crop, outscale=scale)
        logger.debug("realesrgan: %s", chatter.getvalue().strip().replace("\n", "; "))
        return np.asarray(output)
    output, _ = runner.enhance(crop, outscale=scale)
    return np.asarray(output)
