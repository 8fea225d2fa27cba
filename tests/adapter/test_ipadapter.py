"""IP-Adapter-FaceID: weights-only conversion of the public .bin, attach/detach on SD 1.5, embeds layout."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from studio.adapter.ipadapter import (
    FACEID_LORA,
    SOURCE_SHA_KEY,
    convert_faceid_weights,
    ensure_converted,
    faceid_adapter_weights,
    faceid_embeds,
    faceid_loaded,
    load_faceid,
    set_faceid_scale,
    unload_faceid,
)
from studio.errors import AdapterError, InputError, UnsafeFileError
from studio.files import sha256_file
from studio.models.tiny.ipadapter import write_tiny_faceid

ImageRGBf = npt.NDArray[np.float32]  # HxWx3 float32 RGB in [0, 1] (diffusers output_type="np")
PROMPT = "a portrait photo of a cat"
# scale 0 multiplies the IP branch by exactly 0.0 (measured max difference on CPU: 0.0); the bound
# leaves room for backends whose attention kernels differ with the processor, far below the 0.05
# mean change an identity makes
SCALE0_ATOL = 1e-5


class Payload:
    """Pickles as a call to open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def unet_folder(tiny_kit: Path) -> Path:
    return tiny_kit / "tiny-sd15" / "unet"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faceid")


@pytest.fixture(scope="module")
def faceid_bin(work: Path, unet_folder: Path) -> Path:
    path = work / "src" / "tiny-ip-adapter-faceid.bin"
    write_tiny_faceid(path, unet_folder, seed=0)
    return path


@pytest.fixture(scope="module")
def weights(faceid_bin: Path, work: Path) -> Path:
    return ensure_converted(faceid_bin, work / "cache")


@pytest.fixture(scope="module")
def pipe(tiny_kit: Path) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_kit / "tiny-sd15", local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def clean_pipe(pipe: StableDiffusionPipeline) -> Iterator[StableDiffusionPipeline]:
    """The module's pipeline, guaranteed back to the base model after the test."""
    yield pipe
    unload_faceid(pipe)
    pipe.unload_lora_weights()


def _embedding(seed: int) -> npt.NDArray[np.float32]:
    vector = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _render(pipeline: StableDiffusionPipeline, embedding: npt.NDArray[np.float32] | None = None) -> ImageRGBf:
    kwargs = {}
    if embedding is not None:
        embeds = faceid_embeds(embedding, batch=1, cfg=True, dtype=pipeline.unet.dtype, device="cpu")
        kwargs["ip_adapter_image_embeds"] = embeds
    generator = torch.Generator().manual_seed(1234)
    result = pipeline(
        PROMPT, num_inference_steps=3, guidance_scale=7.5, generator=generator, output_type="np", **kwargs
    )
    return result.images[0]


def _style_lora(kit: Path) -> str:
    return str(kit / "loras" / "tiny-style-kohya.safetensors")


def _strip_lora(src: Path, dst: Path) -> Path:
    state = torch.load(src, map_location="cpu", weights_only=True)
    state["ip_adapter"] = {k: v for k, v in state["ip_adapter"].items() if "_lora." not in k}
    torch.save(state, dst)
    return dst


# ---------------------------------------------------------------- tiny file and conversion


def test_tiny_file_has_the_public_layout(faceid_bin: Path, pipe: StableDiffusionPipeline) -> None:
    state = torch.load(faceid_bin, map_location="cpu", weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter"}
    proj = state["image_proj"]
    assert {k: tuple(v.shape) for k, v in proj.items()} == {
        "proj.0.weight": (1024, 512),
        "proj.0.bias": (1024,),
        "proj.2.weight": (4 * 32, 1024),
        "proj.2.bias": (4 * 32,),
        "norm.weight": (32,),
        "norm.bias": (32,),
    }
    names = list(pipe.unet.attn_processors)
    cross = {i for i, n in enumerate(names) if n.endswith("attn2.processor")}
    assert cross == set(range(1, len(names), 2))  # diffusers numbers to_k_ip 1, 3, 5, ...
    layers = state["ip_adapter"]
    assert {int(k.split(".")[0]) for k in layers if "_ip." in k} == cross
    assert {int(k.split(".")[0]) for k in layers if "_lora." in k} == set(range(len(names)))
    assert len(layers) == 2 * len(cross) + 8 * len(names)
    assert all(v.dtype == torch.float16 and v.abs().sum() > 0 for v in [*proj.values(), *layers.values()])


def test_tiny_file_is_seeded(faceid_bin: Path, unet_folder: Path, tmp_path: Path) -> None:
    write_tiny_faceid(tmp_path / "same.bin", unet_folder, seed=0)
    write_tiny_faceid(tmp_path / "other.bin", unet_folder, seed=1)
    ref = torch.load(faceid_bin, weights_only=True)["image_proj"]["proj.2.weight"]
    same = torch.load(tmp_path / "same.bin", weights_only=True)["image_proj"]["proj.2.weight"]
    other = torch.load(tmp_path / "other.bin", weights_only=True)["image_proj"]["proj.2.weight"]
    assert torch.equal(ref, same)
    assert not torch.equal(ref, other)


def test_conversion_keeps_every_tensor_under_diffusers_prefixes(faceid_bin: Path, tmp_path: Path) -> None:
    dst = convert_faceid_weights(faceid_bin, tmp_path / "out.safetensors")
    source = torch.load(faceid_bin, map_location="cpu", weights_only=True)
    converted = safetensors.torch.load_file(dst)
    expected = {f"{group}.{key}": value for group in source for key, value in source[group].items()}
    assert set(converted) == set(expected)
    assert "image_proj.norm.weight" in converted and "ip_adapter.1.to_k_ip.weight" in converted
    assert all(torch.equal(converted[k], v) for k, v in expected.items())
    with safe_open(str(dst), framework="pt") as handle:
        assert handle.metadata()[SOURCE_SHA_KEY] == sha256_file(faceid_bin)


def test_pickle_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    proj = {"norm.weight": torch.ones(4)}
    torch.save({"image_proj": proj, "ip_adapter": {}, "x": Payload(marker)}, evil)
    with pytest.raises(UnsafeFileError, match="not unpickled"):
        convert_faceid_weights(evil, tmp_path / "evil.safetensors")
    with pytest.raises(UnsafeFileError):
        ensure_converted(evil, tmp_path / "cache")
    assert not marker.exists()
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path / "cache").exists()


def test_payload_control_really_runs_code_when_fully_unpickled(tmp_path: Path) -> None:
    """Control for the test above: the same payload creates its marker under plain unpickling."""
    marker = tmp_path / "ran"
    torch.save({"x": Payload(marker)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)  # our own file: proves the payload is live
    assert marker.exists()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"image_proj": {}}, "top-level"),
        ({"image_proj": {"norm.weight": 1}, "ip_adapter": {}}, "not a dict of tensors"),
        ({"image_proj": {"perceiver_resampler.proj_in.weight": torch.ones(2, 2)}, "ip_adapter": {}}, "Plus"),
    ],
)
def test_conversion_refuses_other_layouts(state: dict, message: str, tmp_path: Path) -> None:
    src = tmp_path / "other.bin"
    torch.save(state, src)
    with pytest.raises(AdapterError, match=message):
        convert_faceid_weights(src, tmp_path / "other.safetensors")


def test_conversion_refuses_non_finite_and_mismatched_widths(faceid_bin: Path, tmp_path: Path) -> None:
    state = torch.load(faceid_bin, weights_only=True)
    state["image_proj"]["norm.bias"] = state["image_proj"]["norm.bias"].clone()
    state["image_proj"]["norm.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.bin")
    with pytest.raises(AdapterError, match="finite"):
        convert_faceid_weights(tmp_path / "nan.bin", tmp_path / "nan.safetensors")
    state = torch.load(faceid_bin, weights_only=True)
    state["ip_adapter"]["1.to_k_ip.weight"] = torch.ones(32, 16, dtype=torch.float16)
    torch.save(state, tmp_path / "width.bin")
    with pytest.raises(AdapterError, match="to_k_ip reads widths"):
        convert_faceid_weights(tmp_path / "width.bin", tmp_path / "width.safetensors")


def test_ensure_converted_is_idempotent_and_follows_the_source(unet_folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "ip-adapter-faceid_sd15.bin"
    write_tiny_faceid(src, unet_folder, seed=3)
    first = ensure_converted(src, tmp_path / "cache")
    assert first == tmp_path / "cache" / "ip-adapter-faceid_sd15.safetensors"
    stamp = first.stat().st_mtime_ns
    os.utime(first, ns=(stamp - 10**9, stamp - 10**9))  # an old stamp: any rewrite would show
    assert ensure_converted(src, tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == stamp - 10**9
    before = safetensors.torch.load_file(first)["image_proj.proj.2.weight"]
    write_tiny_faceid(src, unet_folder, seed=4)  # the source changes: same name, new content
    assert ensure_converted(src, tmp_path / "cache") == first
    assert first.stat().st_mtime_ns != stamp - 10**9
    after = safetensors.torch.load_file(first)["image_proj.proj.2.weight"]
    assert not torch.equal(before, after)
    with safe_open(str(first), framework="pt") as handle:
        assert handle.metadata()[SOURCE_SHA_KEY] == sha256_file(src)


# ---------------------------------------------------------------- embeds


def test_embeds_layout_with_and_without_cfg() -> None:
    embedding = _embedding(0)
    (with_cfg,) = faceid_embeds(embedding, batch=3, cfg=True, dtype=torch.float16, device="cpu")
    assert with_cfg.shape == (6, 1, 512) and with_cfg.dtype == torch.float16
    negative, positive = with_cfg.chunk(2)  # what diffusers' prepare_ip_adapter_image_embeds does
    assert torch.count_nonzero(negative) == 0
    expected = torch.from_numpy(embedding).half().expand(3, 1, 512)
    assert torch.equal(positive, expected)
    (plain,) = faceid_embeds(embedding, batch=2, cfg=False, dtype=torch.float32, device="cpu")
    assert plain.shape == (2, 1, 512)
    assert torch.equal(plain[1, 0], torch.from_numpy(embedding))


@pytest.mark.parametrize(
    "bad",
    [
        np.ones(512, np.float32),
        np.zeros(128, np.float32),
        np.full(512, np.nan, np.float32),
        np.ones(512, int),
    ],
)
def test_embeds_refuse_what_is_not_a_normed_512_embedding(bad: npt.NDArray[np.float32]) -> None:
    with pytest.raises(InputError):
        faceid_embeds(bad, batch=1, cfg=True, dtype=torch.float32, device="cpu")


def test_embeds_refuse_bad_batch() -> None:
    with pytest.raises(InputError):
        faceid_embeds(_embedding(0), batch=0, cfg=True, dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------- on the pipeline


def test_identity_changes_the_picture_and_unload_restores_the_base(
    clean_pipe: StableDiffusionPipeline, weights: Path
) -> None:
    base = _render(clean_pipe)
    load_faceid(clean_pipe, weights, scale=1.0)
    assert faceid_loaded(clean_pipe) and faceid_adapter_weights(clean_pipe) == {FACEID_LORA: 1.0}
    first = _render(clean_pipe, _embedding(1))
    np.testing.assert_array_equal(_render(clean_pipe, _embedding(1)), first)  # deterministic
    second = _render(clean_pipe, _embedding(2))
    assert np.abs(first - base).mean() > 0.05  # measured 0.13
    assert np.abs(first - second).mean() > 0.05  # measured 0.15
    unload_faceid(clean_pipe)
    assert not faceid_loaded(clean_pipe) and faceid_adapter_weights(clean_pipe) == {}
    np.testing.assert_array_equal(_render(clean_pipe), base)


def test_scale_zero_removes_the_identity(clean_pipe: StableDiffusionPipeline, weights: Path) -> None:
    base = _render(clean_pipe)
    load_faceid(clean_pipe, weights, scale=0.0)
    a, b = _render(clean_pipe, _embedding(1)), _render(clean_pipe, _embedding(2))
    np.testing.assert_allclose(a, b, atol=SCALE0_ATOL, rtol=0)  # identity has no effect
    # the file's LoRA stays on at weight 1.0, as the public model runs (measured 0.08)
    assert np.abs(a - base).mean() > 0.02
    clean_pipe.disable_lora()
    np.testing.assert_allclose(_render(clean_pipe, _embedding(1)), base, atol=SCALE0_ATOL, rtol=0)
    clean_pipe.enable_lora()
    set_faceid_scale(clean_pipe, 1.0)
    assert np.abs(_render(clean_pipe, _embedding(1)) - a).mean() > 0.01
    with pytest.raises(InputError):
        set_faceid_scale(clean_pipe, float("nan"))


def test_scale_zero_without_lora_equals_the_base(
    clean_pipe: StableDiffusionPipeline, faceid_bin: Path, tmp_path: Path
) -> None:
    base = _render(clean_pipe)
    plain = ensure_converted(_strip_lora(faceid_bin, tmp_path / "no-lora.bin"), tmp_path)
    load_faceid(clean_pipe, plain, scale=0.0)
    assert faceid_adapter_weights(clean_pipe) == {}
    np.testing.assert_allclose(_render(clean_pipe, _embedding(1)), base, atol=SCALE0_ATOL, rtol=0)
    set_faceid_scale(clean_pipe, 1.0)
    assert np.abs(_render(clean_pipe, _embedding(1)) - base).mean() > 0.02


def test_style_loras_keep_their_state_across_load_and_unload(
    clean_pipe: StableDiffusionPipeline, weights: Path, tiny_kit: Path
) -> None:
    clean_pipe.load_lora_weights(_style_lora(tiny_kit), adapter_name="style")
    clean_pipe.set_adapters(["style"], adapter_weights=[0.5])
    styled = _render(clean_pipe)
    load_faceid(clean_pipe, weights, scale=1.0)
    assert clean_pipe.unet.active_adapters() == ["style", FACEID_LORA]
    text_layer = next(m for m in clean_pipe.text_encoder.modules() if isinstance(m, BaseTunerLayer))
    assert text_layer.active_adapters == ["style"]
    both = _render(clean_pipe, _embedding(1))
    assert np.abs(both - styled).mean() > 0.02
    unload_faceid(clean_pipe)
    np.testing.assert_array_equal(_render(clean_pipe), styled)  # weight 0.5 kept, text encoder included


def test_disabled_style_loras_stay_off_under_faceid(
    clean_pipe: StableDiffusionPipeline, weights: Path, tiny_kit: Path
) -> None:
    base = _render(clean_pipe)
    load_faceid(clean_pipe, weights, scale=1.0)
    faceid_only = _render(clean_pipe, _embedding(1))
    unload_faceid(clean_pipe)
    clean_pipe.load_lora_weights(_style_lora(tiny_kit), adapter_name="style")
    clean_pipe.disable_lora()  # what a request without style LoRAs leaves behind
    load_faceid(clean_pipe, weights, scale=1.0)
    # the FaceID LoRA is on in every layer, the style LoRA in none
    np.testing.assert_array_equal(_render(clean_pipe, _embedding(1)), faceid_only)
    unload_faceid(clean_pipe)
    np.testing.assert_array_equal(_render(clean_pipe), base)  # and style still off


def test_loading_another_file_replaces_the_first(
    clean_pipe: StableDiffusionPipeline, weights: Path, unet_folder: Path, tmp_path: Path
) -> None:
    write_tiny_faceid(tmp_path / "second.bin", unet_folder, seed=7)
    second = ensure_converted(tmp_path / "second.bin", tmp_path)
    load_faceid(clean_pipe, second, scale=1.0)
    expected = _render(clean_pipe, _embedding(1))
    unload_faceid(clean_pipe)
    load_faceid(clean_pipe, weights, scale=1.0)
    assert np.abs(_render(clean_pipe, _embedding(1)) - expected).mean() > 0.01
    load_faceid(clean_pipe, second, scale=1.0)  # no unload in between: nothing of the first file may stay
    np.testing.assert_array_equal(_render(clean_pipe, _embedding(1)), expected)


def test_batched_prompts_and_images_per_prompt(clean_pipe: StableDiffusionPipeline, weights: Path) -> None:
    load_faceid(clean_pipe, weights, scale=1.0)
    embeds = faceid_embeds(_embedding(1), batch=2, cfg=True, dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(1)
    out = clean_pipe(
        [PROMPT, "a dog"],
        num_images_per_prompt=2,
        num_inference_steps=2,
        generator=generator,
        output_type="np",
        ip_adapter_image_embeds=embeds,
    ).images
    assert out.shape == (4, 64, 64, 3) and np.isfinite(out).all()
    single = faceid_embeds(_embedding(1), batch=1, cfg=False, dtype=torch.float32, device="cpu")
    out = clean_pipe(
        PROMPT, num_inference_steps=2, guidance_scale=1.0, output_type="np", ip_adapter_image_embeds=single
    ).images
    assert out.shape == (1, 64, 64, 3)


def test_load_refuses_pickles_and_files_for_another_unet(
    clean_pipe: StableDiffusionPipeline, faceid_bin: Path, tiny_kit: Path, tmp_path: Path
) -> None:
    with pytest.raises(UnsafeFileError):
        load_faceid(clean_pipe, faceid_bin, scale=1.0)
    write_tiny_faceid(tmp_path / "xl.bin", tiny_kit / "tiny-sdxl" / "unet", seed=0)
    xl = ensure_converted(tmp_path / "xl.bin", tmp_path)
    with pytest.raises(AdapterError, match="this UNet has 16 of width 32"):
        load_faceid(clean_pipe, xl, scale=1.0)
    assert not faceid_loaded(clean_pipe)
    with pytest.raises(InputError):
        load_faceid(clean_pipe, xl, scale=-1.0)


def test_a_failed_attach_leaves_the_base_model(
    clean_pipe: StableDiffusionPipeline, weights: Path, tmp_path: Path
) -> None:
    base = _render(clean_pipe)
    tensors = safetensors.torch.load_file(weights)
    tensors["ip_adapter.0.to_q_lora.down.weight"] = torch.ones(4, 7, dtype=torch.float16)  # wrong in-width
    broken = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(tensors, broken)
    with pytest.raises(AdapterError, match="could not be attached"):
        load_faceid(clean_pipe, broken, scale=1.0)
    assert not faceid_loaded(clean_pipe) and faceid_adapter_weights(clean_pipe) == {}
    np.testing.assert_array_equal(_render(clean_pipe), base)
