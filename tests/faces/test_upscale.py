"""Real-ESRGAN crop upscaling: sizes, safe loading, and the upscaled refine path."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
import torch

from studio import geometry
from studio.compat import import_realesrgan
from studio.config import MaskConfig, RefineConfig
from studio.errors import InputError, ModelError, UnsafeFileError
from studio.faces.swap import identity_latent, refine_face
from studio.faces.upscale import Upscaler, load_upscaler
from studio.models.catalogue import ModelEntry, read_catalogue_file
from studio.models.runtime import load_insightface_model
from studio.types import Face

CPU = torch.device("cpu")


class Pickled:
    """Any Python object: weights_only loading must refuse to rebuild it."""


def _entry(tiny_kit: Path, name: str) -> ModelEntry:
    return next(e for e in read_catalogue_file(tiny_kit / "models.toml") if e.name == name)


def _load(tiny_kit: Path, name: str, tile: int = 0) -> Upscaler:
    entry = _entry(tiny_kit, name)
    assert entry.source.local is not None
    return load_upscaler(entry, entry.source.local, tile=tile, device=CPU, half=False)


@pytest.fixture(scope="module")
def upscaler_x2(tiny_kit: Path) -> Upscaler:
    return _load(tiny_kit, "tiny-realesrgan-x2")


@pytest.fixture(scope="module")
def identity_swapper(tiny_kit: Path) -> Any:
    return load_insightface_model(
        tiny_kit / "insightface" / "tiny_inswapper_identity.onnx", ["CPUExecutionProvider"]
    )


def _crop(size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)  # HxW row and column indices
    planes = [100 + 80 * np.sin(xx / 9), 120 + 60 * np.cos(yy / 11), 90 + 0.5 * xx]  # B, G, R
    return np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)  # 3 x HxW -> HxWx3


def _face(centre: tuple[float, float], size: float) -> Face:
    landmarks = (geometry.ARCFACE_TEMPLATE - 56.0) * (size / 112.0) + np.asarray(centre, np.float32)
    cx, cy = centre
    return Face(
        (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), landmarks.astype(np.float32), 0.9
    )


def _smooth_image(height: int = 512, width: int = 512) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # HxW row and column indices
    planes = [127 + 100 * np.sin(xx / 60) * np.cos(yy / 80), 127 + 90 * np.cos((xx + yy) / 90), 60 + 0.3 * xx]
    return np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)  # 3 x HxW -> HxWx3 BGR


@pytest.mark.parametrize(("name", "scale"), [("tiny-realesrgan-x2", 2), ("tiny-realesrgan-x4", 4)])
def test_upscaler_scales_a_128_crop(tiny_kit: Path, name: str, scale: int) -> None:
    upscaler = _load(tiny_kit, name)
    crop = _crop()
    big = upscaler.upscale(crop)
    assert upscaler.scale == scale
    assert big.shape == (128 * scale, 128 * scale, 3) and big.dtype == np.uint8
    # the tiny nets carry RGB through: the result looks like the crop, in the same channel order
    small = big.reshape(128, scale, 128, scale, 3).mean(axis=(1, 3))  # (sH)x(sW)x3 -> HxWx3 block means
    assert np.abs(small - crop).mean() < 12.0


def test_tiled_upscale_matches_whole_crop(tiny_kit: Path, upscaler_x2: Upscaler, capsys: Any) -> None:
    tiled = _load(tiny_kit, "tiny-realesrgan-x2", tile=64)
    crop = _crop()
    assert np.abs(tiled.upscale(crop).astype(np.int16) - upscaler_x2.upscale(crop)).max() <= 2
    assert capsys.readouterr().out == ""  # RealESRGANer's per-tile prints are kept off stdout


def test_upscaler_rejects_bad_crops(upscaler_x2: Upscaler) -> None:
    with pytest.raises(InputError, match="HxWx3 uint8"):
        upscaler_x2.upscale(np.zeros((64, 64), np.float32))


def test_loading_never_unpickles(tiny_kit: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real_load = torch.load

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    _load(tiny_kit, "tiny-realesrgan-x4")
    assert calls == [True]  # one load, ours, with weights_only; RealESRGANer's own load never runs


def test_a_pickled_object_is_refused(tiny_kit: Path, tmp_path: Path) -> None:
    entry = _entry(tiny_kit, "tiny-realesrgan-x2")
    weights = torch.load(entry.source.local, weights_only=True)
    buffer = io.BytesIO()
    torch.save({**weights, "extra": Pickled()}, buffer)
    path = tmp_path / "evil.pth"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_upscaler(entry, path, tile=0, device=CPU, half=False)


def test_runner_has_the_attributes_realesrganer_sets(tiny_kit: Path) -> None:
    fresh = _load(tiny_kit, "tiny-realesrgan-x2")  # before any enhance() adds per-call attributes
    entry = _entry(tiny_kit, "tiny-realesrgan-x2")
    realesrgan = import_realesrgan()
    from basicsr.archs.rrdbnet_arch import RRDBNet

    net = RRDBNet(num_in_ch=3, num_out_ch=3, **dict(entry.io))
    # the tiny kit's own file: safe to let RealESRGANer load it, to compare what its __init__ sets
    real = realesrgan.RealESRGANer(
        scale=2, model_path=str(entry.source.local), model=net, tile=0, tile_pad=10, pre_pad=0, device=CPU
    )
    ours = fresh._runner
    assert set(vars(ours)) == set(vars(real))
    for key in ("scale", "tile_size", "tile_pad", "pre_pad", "mod_scale", "half", "device"):
        assert getattr(ours, key) == getattr(real, key), key
    crop = _crop(64)
    np.testing.assert_array_equal(real.enhance(crop, outscale=2)[0], fresh.upscale(crop))


def test_catalogue_facts_are_required(tiny_kit: Path) -> None:
    entry = _entry(tiny_kit, "tiny-realesrgan-x2")
    assert entry.source.local is not None
    bad = dataclasses.replace(entry, io=MappingProxyType({"num_feat": 8, "scale": 2}))
    with pytest.raises(ModelError, match="num_block"):
        load_upscaler(bad, entry.source.local, tile=0, device=CPU, half=False)
    wrong = dataclasses.replace(entry, io=MappingProxyType({**entry.io, "num_feat": 16}))
    with pytest.raises(ModelError, match="does not fit"):
        load_upscaler(wrong, entry.source.local, tile=0, device=CPU, half=False)


# refine_face with an upscaler


@pytest.mark.parametrize(("size", "upscaled"), [(100.0, False), (128.0, False), (300.0, True)])
def test_auto_upscales_only_faces_larger_than_the_crop(
    identity_swapper: Any, upscaler_x2: Upscaler, size: float, upscaled: bool
) -> None:
    canvas = _smooth_image()
    latent = identity_latent(np.ones(512, np.float32), identity_swapper.emap)
    settings = RefineConfig(mask=MaskConfig(), colour_match=True, upscale="auto")
    face = _face((256, 256), size)
    _, stats = refine_face(canvas, face, latent, identity_swapper, settings, upscaler=upscaler_x2)
    assert stats.upscaled is upscaled
    assert stats.crop_size == (256 if upscaled else 128)
    assert (stats.timings["upscale"] > 0.0) is upscaled
    # without an upscaler auto never upscales; off never does
    _, stats = refine_face(canvas, face, latent, identity_swapper, settings)
    assert not stats.upscaled
    off = dataclasses.replace(settings, upscale="off")
    _, stats = refine_face(canvas, face, latent, identity_swapper, off, upscaler=upscaler_x2)
    assert not stats.upscaled


@pytest.mark.parametrize("colour_match", [False, True])
def test_upscaled_path_changes_nothing_outside_the_region(
    tiny_kit: Path, identity_swapper: Any, colour_match: bool
) -> None:
    upscaler = _load(tiny_kit, "tiny-realesrgan-x4")
    canvas = _smooth_image()
    face = _face((250, 260), 64)  # small: "on" upscales it anyway
    latent = identity_latent(np.ones(512, np.float32), identity_swapper.emap)
    settings = RefineConfig(mask=MaskConfig(), colour_match=colour_match, upscale="on")
    result, stats = refine_face(canvas, face, latent, identity_swapper, settings, upscaler=upscaler)
    assert stats.upscaled and stats.crop_size == 512
    affine = geometry.rescale_affine(geometry.estimate_alignment(face.landmarks, 128), 4.0)
    x0, y0, x1, y1 = geometry.crop_region(affine, 512, canvas.shape[:2])
    outside = np.ones(canvas.shape[:2], dtype=bool)  # HxW
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(result[outside], canvas[outside])
    # the upscaled identity crop lands where the face was: the region changes only a little on average
    assert np.abs(result[y0:y1, x0:x1].astype(np.int16) - canvas[y0:y1, x0:x1]).mean() < 4.0
