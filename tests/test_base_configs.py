"""Offline base configs (configs/base/) for real SD 1.5 / SDXL single files: upstream files, real sizes.

Provenance: the shipped files are byte copies of the public diffusers repos' config files, taken from
GitHub mirrors that carry the Hugging Face git history:
- SD 1.5: ``runwayml/stable-diffusion-v1-5``, re-published as ``stable-diffusion-v1-5/stable-diffusion-v1-5``;
  mirror github.com/HDRJ-One/runwayml-stable-diffusion-v1-5
  at commit 5fa07f3d12dcbb53b244e22c30126d8b471f7e02;
- SDXL: ``stabilityai/stable-diffusion-xl-base-1.0``;
  mirror github.com/andrewcchoi/stabilityai-stable-diffusion-xl-base-1.0
  at commit bf714989e22c57ddc1c453bf74dab4521acb81d8.
``UPSTREAM_BLOBS`` holds each file's git blob id in those trees (``git rev-parse HEAD:<path>``).
Parameter counts: SD 1.5 UNet 859,520,964 (diffusers' ``ModelMixin.num_parameters`` docstring); SDXL UNet
2,567,463,684 and text encoders 817,720,320 together (published training logs; computed here too).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # huggingface_hub reads it once, at import: set before diffusers

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from studio.config import config_dir
from studio.draft.base_configs import MERGES_SHA256, VOCAB_SHA256, ensure_base_config
from studio.errors import ConfigError
from studio.models.tiny import diffusion as tiny_sd15
from studio.models.tiny import sdxl as tiny_sdxl

BASE = config_dir() / "base"
UPSTREAM_BLOBS = {
    "sd15": {
        "feature_extractor/preprocessor_config.json": "5294955ff7801083f720b34b55d0f1f51313c5c5",
        "model_index.json": "daf7e2e2dfc64fb437a2b44525667111b00cb9fc",
        "scheduler/scheduler_config.json": "82d05b0e688d7ea94675678646c427907419346e",
        "text_encoder/config.json": "4d3e873ab5086ad989f407abd50fdce66db8d657",
        "tokenizer/special_tokens_map.json": "2c2130b544c0c5a72d5d00da071ba130a9800fb2",
        "tokenizer/tokenizer_config.json": "5ba7bf706515bc60487ad0e1816b4929b82542d6",
        "unet/config.json": "1a02ee8abc93e840ffbcb2d68b66ccbcb74b3ab3",
        "vae/config.json": "55d78924fee13e4220f24320127c5f16284e13b9",
    },
    "sdxl": {
        "model_index.json": "6cc5138ddb67e9309c9b4e058e33e52087f1d215",
        "scheduler/scheduler_config.json": "e5bc8421e047838523be7acfb6720f167f7382f6",
        "text_encoder/config.json": "cde352ada4bb95fdad2fc503b8121257cef215a6",
        "text_encoder_2/config.json": "da1848b5ed17b676f021578838f12c4023b86379",
        "tokenizer/special_tokens_map.json": "2c2130b544c0c5a72d5d00da071ba130a9800fb2",
        "tokenizer/tokenizer_config.json": "2e8612a429492973fe60635b3f44a28b065cfac0",
        "tokenizer_2/special_tokens_map.json": "ae0c5be6f35217e51c4c000fd325d8de0294e99c",
        "tokenizer_2/tokenizer_config.json": "a8438e020c4497a429240d6b89e0bf9a6e2ffa92",
        "unet/config.json": "c8714c90f0e2409156da42781954416cb7df36af",
        "vae/config.json": "a66a171ba7c8efb1a8fc3bdc64e65318eade8e13",
    },
}
# tokenizer/vocab.json and merges.txt: the same blobs in both upstream repos (and in tokenizer_2/)
VOCAB_BLOB = "469be27c5c010538f845f518c4f5e8574c78f7c8"
MERGES_BLOB = "76e821f1b6f0a9709293c3b6b51ed90980b3166b"
PROMPTS = ["a photo of a cat", "A Portrait, of an old man; 35mm f/1.8!", "café (red hair:1.2) BREAK"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("base-configs")
    return {name: ensure_base_config(name, cache) for name in ("sd15", "sdxl")}


def _git_blob(data: bytes) -> str:
    """Git's object id for a file's bytes (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tokenizer_parts(name: str) -> tuple[str, ...]:
    return ("tokenizer", "tokenizer_2") if name == "sdxl" else ("tokenizer",)


# ---------------------------------------------------------------- the shipped files


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_shipped_files_are_the_upstream_configs(name: str) -> None:
    shipped = _files(BASE / name)
    assert {path: _git_blob(data) for path, data in shipped.items()} == UPSTREAM_BLOBS[name]
    assert all(json.loads(data) for data in shipped.values())  # every one parses


def test_the_values_that_matter() -> None:
    def load(name: str, part: str) -> dict:
        return json.loads((BASE / name / part).read_text())

    sd15, sdxl = load("sd15", "unet/config.json"), load("sdxl", "unet/config.json")
    assert sd15["cross_attention_dim"] == 768 and sd15["block_out_channels"] == [320, 640, 1280, 1280]
    assert sd15["attention_head_dim"] == 8 and sd15["sample_size"] == 64
    text_2 = load("sdxl", "text_encoder_2/config.json")
    assert sdxl["cross_attention_dim"] == 2048 == 768 + text_2["hidden_size"]
    assert sdxl["addition_time_embed_dim"] == 256 and sdxl["transformer_layers_per_block"] == [1, 2, 10]
    assert sdxl["projection_class_embeddings_input_dim"] == 2816 == 6 * 256 + 1280
    assert sdxl["block_out_channels"] == [320, 640, 1280] and sdxl["use_linear_projection"]
    assert "scaling_factor" not in load("sd15", "vae/config.json")  # upstream relies on the 0.18215 default
    vae_xl = load("sdxl", "vae/config.json")
    assert vae_xl["scaling_factor"] == 0.13025 and vae_xl["force_upcast"] is True
    assert load("sd15", "scheduler/scheduler_config.json")["_class_name"] == "PNDMScheduler"
    assert load("sdxl", "scheduler/scheduler_config.json")["_class_name"] == "EulerDiscreteScheduler"
    assert load("sdxl", "tokenizer_2/tokenizer_config.json")["pad_token"] == "!"
    assert load("sdxl", "tokenizer/tokenizer_config.json")["pad_token"] == "<|endoftext|>"
    assert text_2["hidden_act"] == "gelu" and text_2["num_hidden_layers"] == 32


@pytest.mark.parametrize(
    ("name", "unet", "vae", "text"),
    [
        ("sd15", 859_520_964, 83_653_863, [123_060_480]),
        ("sdxl", 2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),  # 817,720,320 text params
    ],
)
def test_models_build_on_meta_with_real_parameter_counts(
    name: str, unet: int, vae: int, text: list[int]
) -> None:
    folder = BASE / name
    with init_empty_weights():  # parameters on the meta device: no memory allocated
        models = [
            UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
            AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
        ]
        if name == "sdxl":
            config_2 = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
            models.append(CLIPTextModelWithProjection(config_2))
    assert all(p.is_meta for model in models for p in model.parameters())
    assert [_params(model) for model in models] == [unet, vae, *text]
    if name == "sd15":
        assert models[1].config.scaling_factor == 0.18215  # the default the upstream config relies on
    else:
        assert models[0].add_embedding.linear_1.weight.shape == (1280, 2816)  # label_emb.0.0 in SGM files
        assert len(models[0].mid_block.attentions[0].transformer_blocks) == 10


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_tiny_kits_keep_the_real_structure(name: str) -> None:
    """The tiny kits differ from the real models in widths and depths only, not in structure."""
    tiny = tiny_sd15 if name == "sd15" else tiny_sdxl
    real_unet = UNet2DConditionModel.load_config(BASE / name, subfolder="unet")
    with init_empty_weights():
        real = UNet2DConditionModel.from_config(real_unet).config
        small = UNet2DConditionModel.from_config(tiny.UNET_CONFIG).config
    for key in [
        "down_block_types",
        "up_block_types",
        "mid_block_type",
        "layers_per_block",
        "use_linear_projection",
        "addition_embed_type",
        "in_channels",
        "out_channels",
        "flip_sin_to_cos",
        "freq_shift",
    ]:
        assert small[key] == real[key], key
    depth = real["transformer_layers_per_block"]
    assert np.ndim(depth) == np.ndim(small["transformer_layers_per_block"])
    real_vae = AutoencoderKL.load_config(BASE / name, subfolder="vae")
    tiny_vae = tiny_sdxl.VAE_XL_CONFIG if name == "sdxl" else tiny_sd15.VAE_CONFIG
    assert len(tiny_vae["block_out_channels"]) == len(real_vae["block_out_channels"])  # x8 latents
    assert tiny_vae["scaling_factor"] == real_vae.get("scaling_factor", 0.18215)
    real_scheduler = json.loads((BASE / name / "scheduler" / "scheduler_config.json").read_text())
    for key, value in tiny.SCHEDULER_CONFIG.items():
        assert real_scheduler.get(key, value) == value, key


# ---------------------------------------------------------------- ensure_base_config


def test_built_folders_have_upstream_tokenizer_files(built: dict[str, Path]) -> None:
    for name, folder in built.items():
        files = _files(folder)
        expected = {**UPSTREAM_BLOBS[name]}
        for tokenizer in _tokenizer_parts(name):
            expected[f"{tokenizer}/vocab.json"] = VOCAB_BLOB
            expected[f"{tokenizer}/merges.txt"] = MERGES_BLOB
        got = {path: _git_blob(data) for path, data in files.items() if not path.startswith(".")}
        assert got == expected, name
        assert hashlib.sha256(files["tokenizer/vocab.json"]).hexdigest() == VOCAB_SHA256


def test_tokenizers_load_and_match_the_tiny_kit(built: dict[str, Path], tmp_path: Path) -> None:
    tiny_sd15.write_tokenizer(tmp_path / "tokenizer")
    tiny_sdxl.write_tokenizer_2(tmp_path / "tokenizer_2")
    for name, folder in built.items():
        for part in _tokenizer_parts(name):
            real = CLIPTokenizer.from_pretrained(folder / part, local_files_only=True)
            tiny = CLIPTokenizer.from_pretrained(tmp_path / part, local_files_only=True)
            assert len(real) == 49408 and real.model_max_length == 77
            assert (real.bos_token_id, real.eos_token_id) == (49406, 49407)
            assert real.pad_token == tiny.pad_token == ("!" if part == "tokenizer_2" else "<|endoftext|>")
            for text in PROMPTS:
                padded = {"padding": "max_length", "max_length": 77}
                assert real(text, **padded).input_ids == tiny(text, **padded).input_ids, (name, part, text)
    ids = CLIPTokenizer.from_pretrained(built["sd15"] / "tokenizer")("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_is_idempotent_and_rebuilds_when_stale(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    shutil.copytree(BASE / "sd15", shipped / "sd15")
    cache = tmp_path / "cache"
    folder = ensure_base_config("sd15", cache, shipped=shipped)
    vocab = folder / "tokenizer" / "vocab.json"
    stamp = vocab.stat().st_mtime_ns
    assert ensure_base_config("sd15", cache, shipped=shipped) == folder
    assert vocab.stat().st_mtime_ns == stamp  # nothing rewritten
    # a changed shipped config or a lost vocabulary file triggers a rebuild
    (shipped / "sd15" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}\n')
    ensure_base_config("sd15", cache, shipped=shipped)
    assert (folder / "unet" / "config.json").read_text() == '{"_class_name": "UNet2DConditionModel"}\n'
    (folder / "tokenizer" / "merges.txt").unlink()
    ensure_base_config("sd15", cache, shipped=shipped)
    assert hashlib.sha256((folder / "tokenizer" / "merges.txt").read_bytes()).hexdigest() == MERGES_SHA256
    assert sorted(p.name for p in cache.iterdir()) == ["sd15"]  # no staging or old folders left


def test_unknown_or_missing_configs_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected one of sd15, sdxl"):
        ensure_base_config("sd3", tmp_path)
    with pytest.raises(ConfigError, match=r"model_index\.json does not exist"):
        ensure_base_config("sdxl", tmp_path / "cache", shipped=tmp_path / "nowhere")
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- through from_single_file, offline


def test_sd15_single_file_pipeline_assembles_from_base_config(
    built: dict[str, Path], tiny_kit: Path, no_network: None
) -> None:
    """Weights from the tiny kit, everything else (scheduler, tokenizer, pipeline config) from the base."""
    folder = tiny_kit / "tiny-sd15"
    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    models = {k: getattr(reference, k) for k in ("unet", "vae", "text_encoder")}
    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_kit / "tiny-sd15.safetensors"),
        config=str(built["sd15"]),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        **models,
    )
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.tokenizer.model_max_length == 77
    assert pipe.feature_extractor is not None  # upstream's CLIPImageProcessor config
    _assert_same_pictures(pipe, reference)


def test_sdxl_single_file_pipeline_assembles_from_base_config(
    built: dict[str, Path], tiny_kit: Path, no_network: None
) -> None:
    folder = tiny_kit / "tiny-sdxl"
    reference = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    models = {k: getattr(reference, k) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(tiny_kit / "tiny-sdxl.safetensors"), config=str(built["sdxl"]), local_files_only=True, **models
    )
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.tokenizer_2.pad_token == "!"
    _assert_same_pictures(pipe, reference)


def _assert_same_pictures(pipe: StableDiffusionPipeline, reference: StableDiffusionPipeline) -> None:
    """The base config's scheduler and tokenizers behave exactly as the tiny kit's copies of them."""
    images = []
    for pipeline in (pipe, reference):
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(3)
        out = pipeline(PROMPTS[1], num_inference_steps=2, generator=generator, output_type="np")
        images.append(out.images[0])
    np.testing.assert_array_equal(images[0], images[1])
