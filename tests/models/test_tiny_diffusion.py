"""The tiny SD 1.5 kit loads through the same diffusers / realesrgan calls as real weights, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # huggingface_hub reads it once, at import: set before diffusers

import hashlib
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
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from transformers import CLIPTokenizer

from studio.compat import import_realesrgan
from studio.models.tiny.diffusion import (
    BOS_ID,
    EOS_ID,
    write_controlnet,
    write_sd15,
    write_tokenizer,
)
from studio.models.tiny.esrgan import write_esrgan
from studio.models.tiny.loras import write_loras

ImageRGBf = npt.NDArray[np.float32]  # HxWx3 float32 RGB in [0, 1] (diffusers output_type="np")
PROMPT = "a portrait photo of a cat"


@dataclass(frozen=True)
class Kit:
    root: Path
    seconds: float
    loras: dict[str, Path]
    esrgan: dict[int, dict[str, int]]

    @property
    def folder(self) -> Path:
        return self.root / "tiny-sd15"

    @property
    def single_file(self) -> Path:
        return self.root / "tiny-sd15.safetensors"

    @property
    def controlnet(self) -> Path:
        return self.root / "tiny-controlnet-openpose"


def _build(root: Path, seed: int) -> Kit:
    start = time.perf_counter()
    write_sd15(root / "tiny-sd15", root / "tiny-sd15.safetensors", seed=seed)
    write_controlnet(root / "tiny-controlnet-openpose", root / "tiny-sd15" / "unet", seed=seed + 1)
    loras = write_loras(root / "loras", seed=seed + 2)
    esrgan = {s: write_esrgan(root / f"tiny-x{s}.pth", scale=s, seed=seed + s) for s in (2, 4)}
    return Kit(root, time.perf_counter() - start, loras, esrgan)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    return _build(tmp_path_factory.mktemp("kit"), seed=0)


@pytest.fixture(scope="module")
def pipe(kit: Kit) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(kit.folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _render(pipeline: StableDiffusionPipeline, steps: int = 3, **kwargs: object) -> ImageRGBf:
    generator = torch.Generator().manual_seed(1234)
    result = pipeline(PROMPT, num_inference_steps=steps, generator=generator, output_type="np", **kwargs)
    return result.images[0]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_is_sd15_clip_and_matches_open_clip(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_ID, EOS_ID) == (49406, 49407)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.model_max_length == 77
    reference = SimpleTokenizer()
    for text in ["a photo of a cat", "A Portrait, of an old man; 35mm f/1.8!", "café (red hair:1.2) BREAK"]:
        assert tokenizer(text).input_ids == [BOS_ID, *reference.encode(text), EOS_ID], text
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == EOS_ID  # SD 1.5 pads with <|endoftext|>


# ---------------------------------------------------------------- SD 1.5: folder and single file


def test_folder_has_sd15_layout(kit: Kit) -> None:
    names = {str(p.relative_to(kit.folder)) for p in kit.folder.rglob("*") if p.is_file()}
    assert {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    } <= names
    assert not any(n.endswith((".bin", ".ckpt", ".pt")) for n in names)


def test_components_and_scheduler_are_sd15(pipe: StableDiffusionPipeline) -> None:
    scheduler = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    betas = (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end)
    assert betas == ("scaled_linear", 0.00085, 0.012)
    assert scheduler.num_train_timesteps == 1000 and scheduler.skip_prk_steps
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.vae.config.latent_channels == 4
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_single_file_has_original_ldm_layout(kit: Kit, pipe: StableDiffusionPipeline) -> None:
    checkpoint = safetensors.torch.load_file(kit.single_file)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in checkpoint)
    assert infer_diffusers_model_type(checkpoint) == "v1"
    for key in [
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",  # diffusers' SD 1.x marker
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # UpBlock2D upsampler
        "model.diffusion_model.output_blocks.5.2.conv.weight",  # CrossAttnUpBlock2D upsampler
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.time_embed.2.bias",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ]:
        assert key in checkpoint, key
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM: 1x1 conv [C, C, 1, 1]
    # diffusers' own LDM -> diffusers converters give back exactly our tensors
    for converted, model in [
        (convert_ldm_unet_checkpoint(checkpoint, pipe.unet.config), pipe.unet),
        (convert_ldm_vae_checkpoint(checkpoint, pipe.vae.config), pipe.vae),
    ]:
        state = model.state_dict()
        assert converted.keys() == state.keys()
        assert all(torch.equal(converted[k], state[k]) for k in state)


def test_single_file_loads_offline_and_matches_folder(
    kit: Kit, pipe: StableDiffusionPipeline, no_network: None
) -> None:
    single = StableDiffusionPipeline.from_single_file(
        str(kit.single_file), config=str(kit.folder), local_files_only=True
    )
    single.set_progress_bar_config(disable=True)
    expected, got = _render(pipe), _render(single)
    assert expected.shape == (64, 64, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.05  # not a flat picture
    assert ((expected > 0.0) & (expected < 1.0)).mean() > 0.5  # mostly unclamped


def test_renders_fast_and_seeded(pipe: StableDiffusionPipeline) -> None:
    _render(pipe, steps=2)  # warm-up
    start = time.perf_counter()
    first = _render(pipe, steps=3)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.5, f"64x64, 3 steps took {elapsed:.2f} s"
    np.testing.assert_array_equal(first, _render(pipe, steps=3))
    other = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="np")
    assert np.abs(other.images[0] - first).mean() > 0.01


# ---------------------------------------------------------------- ControlNet


def test_controlnet_pose_changes_the_picture(kit: Kit, pipe: StableDiffusionPipeline) -> None:
    controlnet = ControlNetModel.from_pretrained(kit.controlnet, local_files_only=True)
    assert controlnet.config.block_out_channels == pipe.unet.config.block_out_channels
    control = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    pose = np.zeros((64, 64, 3), np.uint8)  # HxWx3 RGB stick figure on black, openpose-style
    cv2.line(pose, (32, 12), (32, 40), (255, 0, 0), 2)
    cv2.line(pose, (18, 22), (46, 22), (0, 255, 0), 2)
    cv2.circle(pose, (32, 10), 4, (0, 0, 255), -1)
    posed = _render(control, image=Image.fromarray(pose))
    assert posed.shape == (64, 64, 3)
    assert np.abs(posed - _render(pipe)).mean() > 0.01
    weaker = _render(control, image=Image.fromarray(pose), controlnet_conditioning_scale=0.0)
    np.testing.assert_allclose(weaker, _render(pipe), atol=1e-5)  # scale 0 == no ControlNet


# ---------------------------------------------------------------- LoRAs


def test_lora_files_have_both_layouts(kit: Kit) -> None:
    kohya = safetensors.torch.load_file(kit.loras["kohya"])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in kohya
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    peft = safetensors.torch.load_file(kit.loras["diffusers"])
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in peft
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in peft
    assert all(v.abs().sum() > 0 for v in [*kohya.values(), *peft.values()])


def test_loras_load_change_combine_and_unload(kit: Kit, pipe: StableDiffusionPipeline) -> None:
    base = _render(pipe)
    try:
        pipe.load_lora_weights(str(kit.loras["kohya"]), adapter_name="kohya")
        pipe.load_lora_weights(str(kit.loras["diffusers"]), adapter_name="peft")
        assert set(pipe.get_list_adapters()["text_encoder"]) == {"kohya", "peft"}
        outputs = {}
        for name in ("kohya", "peft"):
            pipe.set_adapters([name])
            outputs[name] = _render(pipe)
            assert np.abs(outputs[name] - base).mean() > 0.01, name
        assert np.abs(outputs["kohya"] - outputs["peft"]).mean() > 0.01
        pipe.set_adapters(["kohya", "peft"], adapter_weights=[0.8, 0.5])
        both = _render(pipe)
        assert min(np.abs(both - o).mean() for o in [base, *outputs.values()]) > 0.005
        pipe.delete_adapters("peft")
        pipe.set_adapters(["kohya"])
        np.testing.assert_array_equal(_render(pipe), outputs["kohya"])
    finally:
        pipe.unload_lora_weights()
    np.testing.assert_array_equal(_render(pipe), base)


# ---------------------------------------------------------------- Real-ESRGAN


@pytest.mark.parametrize("scale", [2, 4])
def test_esrgan_loads_with_realesrganer(kit: Kit, scale: int) -> None:
    path = kit.root / f"tiny-x{scale}.pth"
    arch = kit.esrgan[scale]
    assert arch == {"num_feat": 8, "num_block": 1, "num_grow_ch": 4, "scale": scale}
    payload = torch.load(path, weights_only=True, map_location="cpu")
    assert list(payload) == ["params_ema"]
    realesrgan = import_realesrgan()
    from basicsr.archs.rrdbnet_arch import RRDBNet

    upsampler = realesrgan.RealESRGANer(
        scale=scale,
        model_path=str(path),
        model=RRDBNet(num_in_ch=3, num_out_ch=3, **arch),
        tile=0,
        half=False,
        device=torch.device("cpu"),
    )
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (32, 24), interpolation=cv2.INTER_CUBIC)  # 24x32x3 uint8 BGR
    output, mode = upsampler.enhance(image)
    assert mode == "RGB" and output.dtype == np.uint8 and output.shape == (24 * scale, 32 * scale, 3)
    nearest = cv2.resize(image, (32 * scale, 24 * scale), interpolation=cv2.INTER_NEAREST)
    similarity = np.corrcoef(output.ravel().astype(float), nearest.ravel().astype(float))[0, 1]
    assert 0.85 < similarity < 1.0  # an upscale of the input, with seeded noise


# ---------------------------------------------------------------- determinism and cost


def test_same_seed_is_byte_identical_and_seed_matters(kit: Kit, tmp_path: Path) -> None:
    again = _build(tmp_path / "again", seed=0)
    first, second = _tree_digest(kit.root), _tree_digest(again.root)
    assert first == second
    assert sum(name.endswith(".safetensors") for name in first) >= 6
    write_sd15(tmp_path / "other", tmp_path / "other.safetensors", seed=1)
    assert _tree_digest(tmp_path / "other") != _tree_digest(kit.folder)
    assert (tmp_path / "other.safetensors").read_bytes() != kit.single_file.read_bytes()


def test_build_takes_seconds(kit: Kit) -> None:
    assert kit.seconds < 20, f"tiny kit build took {kit.seconds:.1f} s"
