"""The tiny SDXL kit loads through the same diffusers calls as ``sd_xl_base_1.0.safetensors``, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # huggingface_hub reads it once, at import: set before diffusers

import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import safetensors.torch
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from open_clip.transformer import TextTransformer
from PIL import Image

from studio.files import tree_sha256
from studio.models.tiny.sdxl import (
    OPEN_CLIP_PREFIX,
    write_controlnet_sdxl,
    write_sdxl,
)

ImageRGBf = npt.NDArray[np.float32]  # HxWx3 float32 RGB in [0, 1] (diffusers output_type="np")
PROMPT = "a portrait photo of a cat"


@dataclass(frozen=True)
class Kit:
    root: Path
    seconds: float

    @property
    def folder(self) -> Path:
        return self.root / "tiny-sdxl"

    @property
    def single_file(self) -> Path:
        return self.root / "tiny-sdxl.safetensors"

    @property
    def controlnet(self) -> Path:
        return self.root / "tiny-controlnet-openpose-sdxl"


def _build(root: Path, seed: int) -> Kit:
    start = time.perf_counter()
    write_sdxl(root / "tiny-sdxl", root / "tiny-sdxl.safetensors", seed=seed)
    write_controlnet_sdxl(root / "tiny-controlnet-openpose-sdxl", root / "tiny-sdxl", seed=seed + 1)
    return Kit(root, time.perf_counter() - start)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return _build(tmp_path_factory.mktemp("kit-sdxl"), seed=0)


@pytest.fixture(scope="module")
def pipe(kit: Kit) -> StableDiffusionXLPipeline:
    pipeline = StableDiffusionXLPipeline.from_pretrained(kit.folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def checkpoint(kit: Kit) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(kit.single_file)


def _render(pipeline: StableDiffusionXLPipeline, steps: int = 2, **kwargs: object) -> ImageRGBf:
    generator = torch.Generator().manual_seed(1234)
    result = pipeline(PROMPT, num_inference_steps=steps, generator=generator, output_type="np", **kwargs)
    return result.images[0]


# ---------------------------------------------------------------- diffusers folder


def test_folder_has_sdxl_layout(kit: Kit) -> None:
    names = {str(p.relative_to(kit.folder)) for p in kit.folder.rglob("*") if p.is_file()}
    assert {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    } <= names
    assert not any(n.endswith((".bin", ".ckpt", ".pt")) for n in names)
    index = json.loads((kit.folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    text_2 = set(safetensors.torch.load_file(kit.folder / "text_encoder_2" / "model.safetensors"))
    assert "text_projection.weight" in text_2  # as SDXL's text_encoder_2/model.safetensors
    assert "text_model.encoder.layers.9.mlp.fc2.bias" in text_2


def test_components_are_sdxl_shaped(pipe: StableDiffusionXLPipeline) -> None:
    unet, text_1, text_2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert list(unet.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert list(unet.up_block_types) == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert list(unet.transformer_layers_per_block) == [1, 2, 3] and unet.use_linear_projection
    assert unet.addition_embed_type == "text_time" and unet.layers_per_block == 2
    assert unet.cross_attention_dim == text_1.hidden_size + text_2.hidden_size == 32 + 64
    added = 6 * unet.addition_time_embed_dim + text_2.projection_dim  # 6 size/crop numbers + pooled text
    assert unet.projection_class_embeddings_input_dim == added
    assert (text_1.hidden_act, text_2.hidden_act) == ("quick_gelu", "gelu")
    assert text_2.num_hidden_layers == 10 and text_2.intermediate_size == 4 * text_2.hidden_size
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert pipe.vae_scale_factor == 8 and pipe.default_sample_size * pipe.vae_scale_factor == 64
    scheduler = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    betas = (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end)
    assert betas == ("scaled_linear", 0.00085, 0.012)
    spacing = (scheduler.timestep_spacing, scheduler.steps_offset, scheduler.use_karras_sigmas)
    assert spacing == ("leading", 1, False)


def test_tokenizer_2_pads_with_exclamation_mark(pipe: StableDiffusionXLPipeline) -> None:
    one = pipe.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    two = pipe.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    assert one[:4] == two[:4] == [49406, 320, 2368, 49407]
    assert set(one[4:]) == {49407} and set(two[4:]) == {0}  # "<|endoftext|>" vs "!" (id 0), as SDXL
    assert pipe.tokenizer_2.pad_token == "!" and len(pipe.tokenizer_2) == 49408


# ---------------------------------------------------------------- single file (SGM layout)


def test_single_file_has_sgm_layout(checkpoint: dict[str, torch.Tensor]) -> None:
    text_1 = "conditioner.embedders.0.transformer.text_model."
    prefixes = ("model.diffusion_model.", "first_stage_model.", text_1)
    assert all(k.startswith((*prefixes, OPEN_CLIP_PREFIX)) for k in checkpoint)
    assert infer_diffusers_model_type(checkpoint) == "xl_base"
    unet = "model.diffusion_model."
    for key in [
        f"{unet}label_emb.0.0.weight",  # text_time added conditioning
        f"{unet}label_emb.0.2.bias",
        f"{unet}input_blocks.3.0.op.weight",
        f"{unet}input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",  # level 1: depth 2
        f"{unet}input_blocks.7.1.transformer_blocks.2.ff.net.2.weight",  # level 2: depth 3
        f"{unet}middle_block.1.transformer_blocks.2.attn1.to_q.weight",
        f"{unet}output_blocks.2.2.conv.weight",  # CrossAttnUpBlock2D upsampler
        f"{unet}output_blocks.8.0.skip_connection.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",  # carried by real files
        f"{OPEN_CLIP_PREFIX}token_embedding.weight",
        f"{OPEN_CLIP_PREFIX}ln_final.bias",
        f"{OPEN_CLIP_PREFIX}transformer.resblocks.9.mlp.c_proj.bias",  # diffusers' SDXL marker
        f"{OPEN_CLIP_PREFIX}logit_scale",
    ]:
        assert key in checkpoint, key
    assert not any(k.startswith(f"{unet}input_blocks.1.1.") for k in checkpoint)  # no attention at level 0
    assert checkpoint[f"{unet}input_blocks.4.1.proj_in.weight"].ndim == 2  # linear projection, as SDXL
    assert checkpoint[f"{OPEN_CLIP_PREFIX}positional_embedding"].shape == (77, 64)
    assert checkpoint[f"{OPEN_CLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert checkpoint[f"{OPEN_CLIP_PREFIX}transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * 64,)
    assert checkpoint[f"{OPEN_CLIP_PREFIX}text_projection"].shape == (64, 64)


def test_diffusers_converters_give_back_the_folder_tensors(
    checkpoint: dict[str, torch.Tensor], pipe: StableDiffusionXLPipeline
) -> None:
    text_2 = convert_open_clip_checkpoint(pipe.text_encoder_2, checkpoint, prefix=OPEN_CLIP_PREFIX)
    for converted, model in [
        (convert_ldm_unet_checkpoint(checkpoint, pipe.unet.config), pipe.unet),
        (convert_ldm_vae_checkpoint(checkpoint, pipe.vae.config), pipe.vae),
        (text_2, pipe.text_encoder_2),
    ]:
        state = model.state_dict()
        assert converted.keys() == state.keys()
        assert all(torch.equal(converted[k], state[k]) for k in state)
    projection = checkpoint[f"{OPEN_CLIP_PREFIX}text_projection"]
    assert torch.equal(projection, pipe.text_encoder_2.text_projection.weight.T)  # OpenCLIP: x @ P


def test_open_clip_half_loads_into_open_clip_and_agrees(
    checkpoint: dict[str, torch.Tensor], pipe: StableDiffusionXLPipeline
) -> None:
    """The embedders.1 tensors are a genuine OpenCLIP text tower: open_clip itself runs them."""
    tower = TextTransformer(width=64, heads=8, layers=10, output_dim=64, act_layer=torch.nn.GELU)
    state = {
        k.removeprefix(OPEN_CLIP_PREFIX): v
        for k, v in checkpoint.items()
        if k.startswith(OPEN_CLIP_PREFIX) and not k.endswith("logit_scale")
    }
    tower.load_state_dict(state, strict=True)
    ids = pipe.tokenizer_2([PROMPT, "a red car"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = pipe.text_encoder_2(ids.input_ids).text_embeds  # pooled at the eos token, projected
        got = tower.eval()(ids.input_ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_single_file_loads_offline_and_matches_folder(
    kit: Kit, pipe: StableDiffusionXLPipeline, no_network: None
) -> None:
    single = StableDiffusionXLPipeline.from_single_file(
        str(kit.single_file), config=str(kit.folder), local_files_only=True
    )
    single.set_progress_bar_config(disable=True)
    assert type(single.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert single.tokenizer_2.pad_token == "!"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(single, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    expected, got = _render(pipe), _render(single)
    assert expected.shape == (64, 64, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.05  # not a flat picture
    assert ((expected > 0.0) & (expected < 1.0)).mean() > 0.5  # mostly unclamped


def test_renders_fast_and_seeded(pipe: StableDiffusionXLPipeline) -> None:
    _render(pipe)  # warm-up
    start = time.perf_counter()
    first = _render(pipe, steps=2)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"64x64, 2 steps took {elapsed:.2f} s"
    np.testing.assert_array_equal(first, _render(pipe, steps=2))
    other = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np")
    assert np.abs(other.images[0] - first).mean() > 0.01
    resized = _render(pipe, original_size=(1024, 1024), target_size=(1024, 1024))
    assert np.abs(resized - first).mean() > 1e-3  # the size/crop conditioning reaches the UNet


# ---------------------------------------------------------------- ControlNet


def test_controlnet_pose_changes_the_picture(kit: Kit, pipe: StableDiffusionXLPipeline) -> None:
    controlnet = ControlNetModel.from_pretrained(kit.controlnet, local_files_only=True)
    assert controlnet.config.addition_embed_type == "text_time"
    assert list(controlnet.config.transformer_layers_per_block) == [1, 2, 3]
    assert controlnet.config.block_out_channels == pipe.unet.config.block_out_channels
    control = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    pose = np.zeros((64, 64, 3), np.uint8)  # HxWx3 RGB stick figure on black, openpose-style
    cv2.line(pose, (32, 12), (32, 40), (255, 0, 0), 2)
    cv2.line(pose, (18, 22), (46, 22), (0, 255, 0), 2)
    cv2.circle(pose, (32, 10), 4, (0, 0, 255), -1)
    base = _render(pipe)
    posed = _render(control, image=Image.fromarray(pose))
    assert posed.shape == (64, 64, 3)
    assert np.abs(posed - base).mean() > 0.01
    off = _render(control, image=Image.fromarray(pose), controlnet_conditioning_scale=0.0)
    np.testing.assert_allclose(off, base, atol=1e-5)  # scale 0 == no ControlNet


def test_controlnet_sdxl_refuses_an_sd15_unet(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": None}))
    with pytest.raises(ValueError, match="not an SDXL UNet"):
        write_controlnet_sdxl(tmp_path / "cn", tmp_path, seed=0)
    assert not (tmp_path / "cn").exists()


# ---------------------------------------------------------------- determinism and cost


def test_same_seed_is_byte_identical_and_seed_matters(kit: Kit, tmp_path: Path) -> None:
    again = _build(tmp_path / "again", seed=0)
    assert tree_sha256(kit.root) == tree_sha256(again.root)
    write_sdxl(tmp_path / "other", tmp_path / "other.safetensors", seed=1)
    assert (tmp_path / "other.safetensors").read_bytes() != kit.single_file.read_bytes()
    assert (tmp_path / "other" / "unet").is_dir() and not list(tmp_path.glob(".*"))  # no staging left


def test_build_takes_seconds(kit: Kit) -> None:
    assert kit.seconds < 20, f"tiny SDXL build took {kit.seconds:.1f} s"


# ---------------------------------------------------------------- in the assembled kit


def test_kit_catalogue_loads_sdxl_single_file_with_local_config(tiny_kit: Path) -> None:
    from studio.models.catalogue import read_catalogue_file

    kit = {entry.name: entry for entry in read_catalogue_file(tiny_kit / "models.toml")}
    entry, folder = kit["tiny-sdxl"], kit["tiny-sdxl-diffusers"]
    controlnet_entry = kit["tiny-controlnet-openpose-sdxl"]
    assert (entry.kind, folder.kind, controlnet_entry.kind) == ("sdxl", "sdxl", "controlnet")
    single = StableDiffusionXLPipeline.from_single_file(
        str(entry.source.local), config=entry.config, local_files_only=True
    )
    reference = StableDiffusionXLPipeline.from_pretrained(folder.source.local, local_files_only=True)
    a, b = single.unet.state_dict(), reference.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    controlnet = ControlNetModel.from_pretrained(controlnet_entry.source.local)
    assert controlnet.config.addition_embed_type == "text_time"
