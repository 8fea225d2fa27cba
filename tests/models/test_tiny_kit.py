"""The assembled tiny kit: its catalogue is complete and honest, and every file loads through the
real library entry points using only what the catalogue says."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.compat import import_realesrgan
from studio.config import ModelsConfig
from studio.models import ensure_tiny_kit, kit_is_current
from studio.models.catalogue import KIT_VERSION, KIT_VERSION_FILE, read_catalogue_file
from studio.models.runtime import load_insightface_model
from studio.models.store import check
from studio.models.tiny import make_tiny_kit
from studio.types import MODEL_KINDS

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def kit(tiny_kit: Path) -> dict:
    return {entry.name: entry for entry in read_catalogue_file(tiny_kit / "models.toml")}


def test_every_kind_is_present_and_verified(kit: dict, tmp_path: Path) -> None:
    models = ModelsConfig(dir=tmp_path)
    assert {e.kind for e in kit.values()} == set(MODEL_KINDS) - {"annotator", "safety"}  # real weights only
    for entry in kit.values():
        assert check(entry, models, recheck=True).status == "present", entry.name
        assert "not portraits" in entry.description and entry.commercial
    assert kit["tiny-det"].is_fixture and "one face" in kit["tiny-det"].fixture


def test_existing_kit_is_kept_and_force_rebuilds_identically(tiny_kit: Path, tmp_path: Path) -> None:
    before = (tiny_kit / "models.toml").read_text()
    assert make_tiny_kit(tiny_kit) == tiny_kit
    copy = make_tiny_kit(tmp_path / "again")
    assert (copy / "models.toml").read_text().replace(str(copy), "") == before.replace(str(tiny_kit), "")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_kit_from_an_older_release_is_rebuilt_on_use(tiny_kit: Path, tmp_path: Path) -> None:
    old = tmp_path / "old-kit"
    shutil.copytree(tiny_kit, old)
    (old / KIT_VERSION_FILE).unlink()  # kits before version 2 had no version file, nor the processor twins
    (old / "facefusion" / "tiny_xseg.onnx").unlink()
    assert not kit_is_current(old)
    assert ensure_tiny_kit(old) == old
    assert kit_is_current(old) and (old / "facefusion" / "tiny_xseg.onnx").is_file()
    assert (old / KIT_VERSION_FILE).read_text().strip() == KIT_VERSION


def test_sd_single_file_loads_offline_with_local_config(kit: dict) -> None:
    from diffusers import StableDiffusionPipeline

    entry = kit["tiny-sd15"]
    pipe = StableDiffusionPipeline.from_single_file(
        str(entry.source.local), config=entry.config, local_files_only=True, safety_checker=None
    )
    folder = StableDiffusionPipeline.from_pretrained(
        kit["tiny-sd15-diffusers"].source.local, safety_checker=None
    )
    assert pipe.tokenizer.vocab_size == 49408 and pipe.tokenizer.model_max_length == 77
    a, b = pipe.unet.state_dict(), folder.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_controlnet_and_loras_load(kit: dict) -> None:
    from diffusers import ControlNetModel, StableDiffusionPipeline

    controlnet = ControlNetModel.from_pretrained(kit["tiny-controlnet-openpose"].source.local)
    assert controlnet.config.cross_attention_dim == 32 or controlnet.config.cross_attention_dim > 0
    pipe = StableDiffusionPipeline.from_pretrained(
        kit["tiny-sd15-diffusers"].source.local, safety_checker=None
    )
    for name in ("tiny-style-kohya", "tiny-style-diffusers"):
        pipe.load_lora_weights(str(kit[name].source.local), adapter_name=name.replace("-", "_"))
    loaded = pipe.get_list_adapters()  # component -> adapter names: both layouts reach UNet and text encoder
    for component in ("unet", "text_encoder"):
        assert set(loaded[component]) == {"tiny_style_kohya", "tiny_style_diffusers"}, component


def test_face_models_route_through_insightface(kit: dict) -> None:
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.inswapper import INSwapper
    from insightface.model_zoo.scrfd import SCRFD

    expected = {
        "tiny-det": SCRFD,
        "tiny-arcface": ArcFaceONNX,
        "tiny-inswapper": INSwapper,
        "tiny-inswapper-identity": INSwapper,
    }
    for name, cls in expected.items():
        assert isinstance(load_insightface_model(kit[name].source.local, CPU), cls), name


@pytest.mark.parametrize("name", ["tiny-realesrgan-x2", "tiny-realesrgan-x4"])
def test_upscaler_loads_with_catalogued_arch(kit: dict, name: str) -> None:
    realesrgan = import_realesrgan()
    from basicsr.archs.rrdbnet_arch import RRDBNet

    io = dict(kit[name].io)
    model = RRDBNet(num_in_ch=3, num_out_ch=3, **io)
    upsampler = realesrgan.RealESRGANer(
        scale=io["scale"],
        model_path=str(kit[name].source.local),
        model=model,
        tile=0,
        half=False,
        device=torch.device("cpu"),
    )
    image = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    out, _ = upsampler.enhance(image, outscale=io["scale"])
    assert out.shape == (12 * io["scale"], 16 * io["scale"], 3)


def test_facefusion_processor_twins_are_catalogued_and_verify(kit: dict, tmp_path: Path) -> None:
    models = ModelsConfig(dir=tmp_path)
    real = {e.name: e for e in read_catalogue_file(Path(__file__).parents[2] / "configs" / "models.toml")}
    twins = {"tiny-xseg": "xseg_1", "tiny-bisenet": "bisenet_resnet_34"}
    twins |= {"tiny-gfpgan": "gfpgan_1_4", "tiny-codeformer": "codeformer"}
    for name, real_name in twins.items():
        entry = kit[name]
        assert check(entry, models, recheck=True).status == "present", name
        assert entry.kind == real[real_name].kind and dict(entry.io) == dict(real[real_name].io), name
    assert kit["tiny-xseg"].is_fixture and kit["tiny-bisenet"].is_fixture
