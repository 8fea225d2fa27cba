"""FACT face adapter: serial fusers in the UNet, CFG context, save/load checks, FAIR loss, pipelines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention import BasicTransformerBlock
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from studio.adapter import (
    AdapterSpec,
    FaceAdapter,
    FaceContext,
    attach,
    build_adapter,
    detach,
    increments,
    set_recording,
)
from studio.adapter.layers import FaceFuser, attach_fusers, transformer_block_dims
from studio.adapter.loss import fair_loss
from studio.adapter.weights import load_adapter, read_adapter_spec, read_training_config, save_adapter
from studio.errors import AdapterError, ModelError

SHA = "cd" * 32
TOKENS = (49, 32)  # the tiny recognizer's 7x7 map of 32 channels
# tiny SD 1.5: 3 cross-attention down blocks x 2 layers, 1 mid, 3 up blocks x 3 layers
SD15_DIMS = [32] * 4 + [64] * 2 + [64] + [64] * 3 + [32] * 6


@pytest.fixture(scope="module")
def unet(tiny_kit: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_kit / "tiny-sd15", subfolder="unet").eval()


@pytest.fixture(scope="module")
def unet_xl(tiny_kit: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_kit / "tiny-sdxl", subfolder="unet").eval()


@pytest.fixture(autouse=True)
def clean_unets(request: pytest.FixtureRequest) -> Any:
    """Every test leaves the shared UNets as base models."""
    yield
    for name in ("unet", "unet_xl"):
        if name in request.fixturenames:
            detach(request.getfixturevalue(name))


def _adapter(unet: UNet2DConditionModel, family: str = "sd15", alpha: float | None = 0.5) -> FaceAdapter:
    torch.manual_seed(0)
    adapter = build_adapter(
        unet, base_family=family, face_encoder="tiny_arcface", encoder_sha256=SHA, token_shape=TOKENS
    )
    if alpha is not None:
        for fuser in adapter.fusers:
            fuser.alpha.data.fill_(alpha)
    return adapter.eval()


def _condition(batch: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, *TOKENS, generator=g)  # [B, T, C]
    embedding = F.normalize(torch.randn(batch, 512, generator=g), dim=-1)  # [B, 512]
    return tokens, embedding


def _unet_inputs(unet: UNet2DConditionModel, batch: int = 2) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, 16, 24, generator=g),  # [B, 4, h, w] latents, not square
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, 8, unet.config.cross_attention_dim, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        time_ids = unet.config.addition_time_embed_dim
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * time_ids
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return inputs


@torch.no_grad()
def _run(unet: UNet2DConditionModel, kwargs: dict[str, Any] | None = None, batch: int = 2) -> torch.Tensor:
    return unet(**_unet_inputs(unet, batch), cross_attention_kwargs=kwargs).sample


# --- fusers in the UNet -----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["unet", "unet_xl"])
def test_scale_zero_and_detach_give_exactly_the_base_model(
    which: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(which)
    keys = set(model.state_dict())
    base = _run(model)
    adapter = _adapter(model, "sd15" if which == "unet" else "sdxl")
    attach(adapter, model)
    assert len(adapter.fusers) == len(transformer_block_dims(model)) > 0
    off = _run(model, adapter.face_kwargs(*_condition(2), scale=0.0, cfg=False))
    on = _run(model, adapter.face_kwargs(*_condition(2), scale=1.0, cfg=False))
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-3  # the open gate (alpha 0.5) changes the prediction
    detach(model)
    assert set(model.state_dict()) == keys and not hasattr(model, "position_net")
    assert torch.equal(_run(model), base)


def test_a_fresh_adapter_has_its_gates_closed(unet: UNet2DConditionModel) -> None:
    base = _run(unet)
    adapter = _adapter(unet, alpha=None)
    assert all(float(f.alpha.detach()) == 0.0 for f in adapter.fusers)
    attach(adapter, unet)
    assert torch.equal(_run(unet, adapter.face_kwargs(*_condition(2), scale=1.0, cfg=False)), base)


def test_fusers_sit_in_every_block_in_unet_order(unet: UNet2DConditionModel) -> None:
    adapter = _adapter(unet)
    attach(adapter, unet)
    names = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    ordered = sorted(names, key=lambda n: ("down_blocks", "mid_block", "up_blocks").index(n.split(".")[0]))
    fused = [n for n, m in unet.named_modules() if isinstance(m, FaceFuser)]
    assert len(fused) == len(names) == 16
    by_fuser = {id(m): n for n, m in unet.named_modules() if isinstance(m, FaceFuser)}
    assert [by_fuser[id(f)] for f in adapter.fusers] == [f"{n}.fuser" for n in ordered]
    assert [f.query_dim for f in adapter.fusers] == transformer_block_dims(unet) == SD15_DIMS


def test_attach_refuses_a_wrong_number_of_fusers(unet: UNet2DConditionModel) -> None:
    fusers = torch.nn.ModuleList(FaceFuser(32, 32, 8, 4) for _ in range(2))
    with pytest.raises(ModelError, match="2 fuser layers but this UNet has"):
        attach_fusers(unet, fusers)
    xl_adapter = _adapter(unet, alpha=None)
    object.__setattr__(xl_adapter, "spec", _spec(block_dims=(64,) * 16))
    with pytest.raises(AdapterError, match="widths"):
        attach(xl_adapter, unet)


def _spec(**changes: Any) -> AdapterSpec:
    fields = {
        "base_family": "sd15",
        "face_encoder": "tiny_arcface",
        "encoder_sha256": SHA,
        "token_shape": TOKENS,
        "cross_attention_dim": 32,
        "block_dims": tuple(SD15_DIMS),
    }
    return AdapterSpec(**{**fields, **changes})


def test_fuser_is_gated_attention_over_image_and_face_tokens() -> None:
    torch.manual_seed(3)
    fuser = FaceFuser(query_dim=16, context_dim=8, heads=2, head_dim=8)
    fuser.alpha.data.fill_(0.7)
    x, face = torch.randn(2, 10, 16), torch.randn(2, 4, 8)  # [B, N, C], [B, Q, D]
    out = fuser(x, FaceContext(face, 0.5))
    # reference: full self-attention over the concatenation, keep the image rows
    seq = fuser.norm(torch.cat([x, fuser.context_proj(face)], dim=1))  # [B, N+Q, C]
    q = fuser.attn.query(seq).view(2, 14, 2, 8).transpose(1, 2)
    k, v = (t.view(2, 14, 2, 8).transpose(1, 2) for t in fuser.attn.key_value(seq).chunk(2, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(8), dim=-1)  # [B, H, N+Q, N+Q]
    attended = fuser.attn.out((weights @ v).transpose(1, 2).reshape(2, 14, 16))[:, :10]
    expected = x + 0.5 * np.tanh(0.7) * attended
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert fuser(x, FaceContext(face, 0.0)) is x


def test_context_rows_repeat_per_image_and_must_divide_the_batch() -> None:
    torch.manual_seed(4)
    fuser = FaceFuser(16, 8, 2, 8)
    fuser.alpha.data.fill_(0.5)
    x, face = torch.randn(4, 6, 16), torch.randn(2, 3, 8)  # 2 context rows, 4 images
    expanded = fuser(x, FaceContext(face.repeat_interleave(2, dim=0), 1.0))  # [u, u, c, c]
    torch.testing.assert_close(fuser(x, FaceContext(face, 1.0)), expanded)
    with pytest.raises(ModelError, match="must divide"):
        fuser(torch.randn(3, 6, 16), FaceContext(face, 1.0))


def test_cfg_context_is_zero_condition_then_condition(unet: UNet2DConditionModel) -> None:
    adapter = _adapter(unet)
    tokens, embedding = _condition(batch=2)
    with torch.no_grad():
        context = adapter.context(tokens, embedding, scale=0.8, cfg=True)
        zeros = adapter.resampler(torch.zeros(2, *TOKENS), torch.zeros(2, 512))
        cond = adapter.resampler(tokens, embedding)
        alone = adapter.context(tokens.numpy(), embedding.numpy(), scale=0.8, cfg=False)
    assert context.tokens.shape == (4, 16, 32) and context.scale == 0.8
    assert torch.equal(context.tokens[:2], zeros) and torch.equal(context.tokens[2:], cond)
    assert not torch.allclose(zeros, cond, atol=1e-3)
    assert torch.equal(alone.tokens, cond)
    with pytest.raises(AdapterError, match=r"\[B, 49, 32\]"):
        adapter.context(torch.zeros(1, 16, 32), torch.zeros(1, 512), scale=1.0, cfg=False)


def test_recorded_increments_carry_gradients_to_the_adapter(unet: UNet2DConditionModel) -> None:
    adapter = _adapter(unet).train()
    attach(adapter, unet)
    set_recording(adapter, True)
    inputs = _unet_inputs(unet, batch=1)
    kwargs = adapter.face_kwargs(*_condition(1), scale=1.0, cfg=False)
    pred = unet(**inputs, cross_attention_kwargs=kwargs).sample
    recorded = increments(adapter)
    assert [inc.shape[-1] for inc in recorded] == transformer_block_dims(unet)
    assert all(inc.grad_fn is not None for inc in recorded)
    total, _, penalty = fair_loss(pred, torch.zeros_like(pred), recorded, torch.zeros(1, 1, 16, 24), 1.0)
    assert penalty > 0
    total.backward()
    assert all(f.alpha.grad is not None and f.alpha.grad != 0 for f in adapter.fusers)
    set_recording(adapter, False)
    with pytest.raises(ModelError, match="recorded no increment"):
        increments(adapter)


# --- files ------------------------------------------------------------------------------------


def test_save_then_load_gives_identical_outputs(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    adapter = _adapter(unet)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "face.safetensors"
    save_adapter(adapter, path, training_config={"lr": 1e-4, "steps": 10})
    attach(adapter, unet)
    expected = _run(unet, adapter.face_kwargs(*_condition(1), scale=1.0, cfg=True), batch=2)
    loaded = load_adapter(path, base_family="sd15", encoder_sha256=SHA, unet=unet)
    assert loaded.spec == adapter.spec == read_adapter_spec(path)
    attach(loaded, unet)
    assert torch.equal(_run(unet, loaded.face_kwargs(*_condition(1), scale=1.0, cfg=True), batch=2), expected)
    assert read_training_config(path) == {"lr": 1e-4, "steps": 10}
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "portrait-studio-fact-adapter" and meta["format_version"] == "1"
    assert meta["token_shape"] == "49x32" and json.loads(meta["block_dims"]) == SD15_DIMS
    assert meta["cross_attention_dim"] == "32" and meta["base_family"] == "sd15"


def test_files_for_another_model_are_refused(
    unet: UNet2DConditionModel, unet_xl: UNet2DConditionModel, tmp_path: Path
) -> None:
    path = tmp_path / "sd15.safetensors"
    save_adapter(_adapter(unet), path)
    with pytest.raises(AdapterError, match="trained for sd15, but the base model is sdxl"):
        load_adapter(path, base_family="sdxl", encoder_sha256=SHA, unet=unet_xl)
    with pytest.raises(AdapterError, match=r"face encoder tiny_arcface .*sha256 cdcdcd"):
        load_adapter(path, base_family="sd15", encoder_sha256="ef" * 32, unet=unet)
    xl_path = tmp_path / "xl.safetensors"
    save_adapter(_adapter(unet_xl, "sdxl"), xl_path)
    with pytest.raises(AdapterError, match=r"cross-attention width 96 .* this UNet has 32"):
        load_adapter(xl_path, base_family="sdxl", encoder_sha256=SHA, unet=unet)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p.write_bytes(b"\x00garbage" * 100), "not a safetensors file"),
        (lambda p: save_file({"x": torch.zeros(1)}, str(p), metadata={"format": "other"}), "format 'other'"),
        (lambda p: _tampered(p, format_version="2"), "format version '2'"),
        (lambda p: _tampered(p, block_dims="[32, x]"), "malformed metadata"),
        (lambda p: _tampered(p, heads=None), "lacks 'heads'"),
        (lambda p: _tampered(p, drop_tensor=True), "tensors missing"),
    ],
)
def test_damaged_files_name_the_problem(
    unet: UNet2DConditionModel, tmp_path: Path, make: Any, problem: str
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"")
    save_adapter(_adapter(unet), path)
    make(path)
    with pytest.raises(AdapterError, match=problem):
        load_adapter(path, base_family="sd15", encoder_sha256=SHA, unet=unet)


def _tampered(path: Path, drop_tensor: bool = False, **meta: str | None) -> None:
    with safe_open(str(path), framework="pt") as handle:
        metadata = {**handle.metadata(), **meta}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    if drop_tensor:
        tensors.pop("fusers.0.alpha")
    save_file(tensors, str(path), metadata={k: v for k, v in metadata.items() if v is not None})


def test_pickles_are_never_opened(unet: UNet2DConditionModel, tmp_path: Path) -> None:
    path = tmp_path / "face.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(AdapterError, match="pickles are never loaded"):
        load_adapter(path, base_family="sd15", encoder_sha256=SHA, unet=unet)


# --- FAIR loss --------------------------------------------------------------------------------


def test_fair_loss_penalises_only_outside_the_face() -> None:
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 4, 8, 16, generator=g)
    layers = [torch.randn(2, 128, 8, generator=g), torch.randn(2, 32, 16, generator=g)]  # 8x16, 4x8 grids
    face = torch.ones(2, 1, 8, 16)
    total, mse, penalty = fair_loss(pred, target, layers, face, lam=0.3)
    assert penalty == 0 and torch.equal(mse, F.mse_loss(pred, target)) and torch.equal(total, mse)
    total, _, penalty = fair_loss(pred, target, layers, torch.zeros(2, 1, 8, 16), lam=0.3)
    expected = (layers[0].pow(2).mean() + layers[1].pow(2).mean()) / 2
    torch.testing.assert_close(penalty, expected)
    torch.testing.assert_close(total, mse + 0.3 * expected)


def test_fair_loss_reads_tokens_row_major_at_each_resolution() -> None:
    # a 4x8 token grid whose right half (x >= 4) has increment 1, left half 0; the face is the left half
    grid = torch.zeros(1, 4, 8)
    grid[:, :, 4:] = 1.0
    increment = grid.reshape(1, 32, 1).expand(1, 32, 3)  # [B, h*w, C], row-major
    face = torch.zeros(1, 1, 16, 32)
    face[..., :16] = 1.0  # left half, at 4x the grid's resolution
    _, _, penalty = fair_loss(torch.zeros(1), torch.zeros(1), [increment], face, lam=1.0)
    torch.testing.assert_close(penalty, torch.tensor(0.5))  # half the tokens, all outside the face
    face_right = 1.0 - face
    _, _, penalty = fair_loss(torch.zeros(1), torch.zeros(1), [increment], face_right, lam=1.0)
    assert penalty == 0


# --- pipelines --------------------------------------------------------------------------------


def _render(pipe: Any, kwargs: dict[str, Any] | None, **extra: Any) -> np.ndarray:
    return pipe(
        "a portrait",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
        cross_attention_kwargs=kwargs,
        **extra,
    ).images


def test_sd15_pipeline_renders_with_the_face_adapter(tiny_kit: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_kit / "tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    base = _render(pipe, None, num_images_per_prompt=2)
    adapter = _adapter(pipe.unet)
    attach(adapter, pipe.unet)
    off = _render(pipe, adapter.face_kwargs(*_condition(1), scale=0.0, cfg=True), num_images_per_prompt=2)
    on = _render(pipe, adapter.face_kwargs(*_condition(1), scale=1.0, cfg=True), num_images_per_prompt=2)
    assert np.array_equal(off, base) and on.shape == base.shape == (2, 64, 64, 3)
    assert np.abs(on - base).max() > 1e-3


def test_controlnet_pipeline_renders_and_controlnet_never_sees_face_tokens(tiny_kit: Path) -> None:
    controlnet = ControlNetModel.from_pretrained(tiny_kit / "tiny-controlnet-openpose")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_kit / "tiny-sd15", controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    seen: list[Any] = []
    controlnet.register_forward_pre_hook(
        lambda _, args, kw: seen.append(kw.get("cross_attention_kwargs")), with_kwargs=True
    )
    pose = np.zeros((64, 64, 3), np.uint8)
    pose[20:44, 30:34] = 255  # a stick figure's spine
    adapter = _adapter(pipe.unet)
    attach(adapter, pipe.unet)
    off = _render(pipe, adapter.face_kwargs(*_condition(1), scale=0.0, cfg=True), image=Image.fromarray(pose))
    on = _render(pipe, adapter.face_kwargs(*_condition(1), scale=1.0, cfg=True), image=Image.fromarray(pose))
    assert np.abs(on - off).max() > 1e-3
    assert seen and all(kwargs is None for kwargs in seen)
    assert not any(isinstance(m, FaceFuser) for m in controlnet.modules())
