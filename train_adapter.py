"""Train the FACT face adapter (FaceChain FACT) on a folder of people. nanoGPT-shaped: one file, top down.

Run (from the repository root):

    uv run python train_adapter.py configs/train_tiny.toml                      # CPU, seconds, tiny kit
    accelerate launch --multi_gpu train_adapter.py configs/train_sd15.toml      # SD 1.5 on all GPUs
    uv run python train_adapter.py configs/train_sd15.toml --resume             # = --resume latest
    uv run python train_adapter.py configs/train_sd15.toml --resume outputs/fact-sd15/ckpt/step_2000
    uv run python train_adapter.py configs/train_tiny.toml --set lr=3e-4 --set max_steps=50

Dataset: ``DATASET/<person>/<photo>.png|jpg|jpeg|webp``, one sub-folder per identity; a ``<photo>.txt``
beside a photo is its caption (otherwise ``caption`` from the config). Photos without exactly one usable
face are skipped with a log line. With validation on, one identity (``val_identity``, default the last
folder) is held out of training and its face steers the validation pictures.

What happens: 1. config, Accelerator, seeds; 2. frozen VAE / text encoder / UNet, trainable adapter;
3. preprocessing cached per photo sha256 (latents, face tokens + embedding, face mask, caption embedding);
4. ID-shuffle sampling (condition = another photo of the same person) with condition drop; 5. the loop:
FAIR loss = diffusion MSE + lam x adapter increment outside the face; 6. validation pictures;
7. checkpoints (adapter, optimizer, LR schedule, step, every RNG, config) that ``--resume`` continues
exactly. Outputs in ``out_dir``: ``cache/``, ``val/step_N.png``, ``ckpt/step_N/``, ``adapter.safetensors``
(copy it to ``adapters/<name>.safetensors`` to use it). The tiny kit's models have random weights and a
fixture detector: its pictures are not portraits.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import tomllib
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tomli_w
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from studio.adapter import FaceAdapter, attach, build_adapter, increments, set_recording
from studio.adapter.loss import fair_loss
from studio.adapter.tokens import FaceTokenEncoder
from studio.adapter.weights import read_adapter_spec, save_adapter
from studio.errors import ConfigError, InputError, StudioError
from studio.files import sha256_file, write_bytes_atomic, write_text_atomic
from studio.imageio import format_parameters, from_pil, read_image, to_pil, write_image

logger = logging.getLogger("train_adapter")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CKPT_FORMAT = "portrait-studio-fact-train-checkpoint"
VAE_FACTOR = 8  # SD latents are 1/8 of the picture side
# keys a resumed run may change: where things go, how often it reports, and how long it runs
RESUME_MAY_CHANGE = frozenset(
    {"out_dir", "cache_dir", "kit", "max_steps", "eval_every", "save_every", "log_every"}
    | {"num_val_images", "val_steps", "val_cfg", "num_workers"}
)


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run (configs/train_*.toml, flat keys; --set key=value overrides)."""

    # models: a diffusers folder or Hugging Face repo id; ONNX paths or catalogue / tiny-kit names
    base_model: str
    detector: str
    recognizer: str  # the face encoder: ArcFace ResNet whose 7x7 map gives the face tokens
    dataset: Path
    out_dir: Path
    name: str = "face-adapter"
    kit: str = ""  # tiny kit folder (built if missing); model names above may be its catalogue names
    base_family: Literal["sd15"] = "sd15"
    onnx_providers: Literal["auto", "cpu", "cuda"] = "auto"
    # data
    cache_dir: str = ""  # "" = out_dir/cache
    caption: str = "a photo of a person"
    resolution: int = 512
    det_size: int = 640
    det_threshold: float = 0.5
    min_face: int = 32
    val_identity: str = ""  # "" = the last identity folder (sorted) is held out
    synthetic_people: int = 0  # > 0: fill an empty dataset folder with textured test images (tiny runs)
    num_workers: int = 0
    # adapter
    num_queries: int = 16
    heads: int = 8
    depth: int = 2
    gate_init: float = 0.0  # FACT: tanh(alpha) gates start closed (alpha = 0)
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    max_steps: int = 1000
    lam: float = 0.1  # FAIR: weight of the increment outside the face
    cond_drop: float = 0.1  # probability of the zero face condition (classifier-free guidance)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 1337
    overfit_one_batch: bool = False  # debug: the first batch, its noise and timesteps, every step
    # reporting
    log_every: int = 10
    eval_every: int = 500  # 0 = no validation pictures
    num_val_images: int = 4
    val_steps: int = 30
    val_cfg: float = 5.0
    save_every: int = 1000  # checkpoints; one is always written at the end

    def __post_init__(self) -> None:
        checks = {
            "resolution": self.resolution >= 64 and self.resolution % 64 == 0,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "max_steps": self.max_steps >= 1,
            "lr": self.lr > 0,
            "lam": self.lam >= 0,
            "cond_drop": 0.0 <= self.cond_drop <= 1.0,
            "num_queries": self.num_queries >= 1,
            "warmup_steps": 0 <= self.warmup_steps < self.max_steps,
            "log_every": self.log_every >= 1,
            "save_every": self.save_every >= 1,
            "eval_every": self.eval_every >= 0,
            "num_val_images": self.num_val_images >= 0,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "Training config value(s) out of range: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                + ".",
                fix="resolution: a multiple of 64; counts >= 1; lr > 0; lam >= 0; 0 <= cond_drop <= 1; "
                "warmup_steps < max_steps.",
            )


def load_train_config(path: Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a flat train_*.toml, apply ``key=value`` overrides, validate into a TrainConfig."""
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(
            f"Cannot read training config {path}: {err}.", fix="check the path and syntax."
        ) from err
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"Override {item!r} is not key=value.", fix="e.g. --set lr=3e-4.")
        try:
            table[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            table[key.strip()] = raw.strip()  # a bare word is a string: --set name=anna
    return config_from_dict(table)


def config_from_dict(table: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from plain values; unknown keys, missing keys and wrong types name the key."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(table) - set(fields))
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in table]
    if unknown or missing:
        raise ConfigError(
            f"Training config: unknown key(s) {unknown}, missing key(s) {missing}.",
            fix=f"known keys: {', '.join(fields)}.",
        )
    return TrainConfig(**{key: _coerce(key, value, hints[key]) for key, value in table.items()})


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field's type (Literal, bool, int, float, Path, str)."""
    if typing.get_origin(hint) is Literal:
        ok = value in typing.get_args(hint)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str if hint is Path else hint) and not (
            hint is int and isinstance(value, bool)
        )
    if not ok:
        raise ConfigError(
            f"Training config key {key} = {value!r} is not a valid {hint}.", fix=f"--set {key}=..."
        )
    if hint is Path:
        return Path(os.path.expandvars(value)).expanduser()
    return float(value) if hint is float else value


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain TOML/JSON values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Photo:
    """One usable training photo and its preprocessing cache file."""

    person: str
    path: Path
    cache: Path


class FaceDataset(torch.utils.data.Dataset):
    """Cached photos; item (target, condition, drop) -> target latents / mask / caption + condition's face."""

    def __init__(self, photos: Sequence[Photo]) -> None:
        self.photos = list(photos)

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, item: tuple[int, int, bool]) -> dict[str, torch.Tensor]:
        target, condition, drop = item
        data = _read_cache(self.photos[target].cache)
        face = data if condition == target else _read_cache(self.photos[condition].cache)
        tokens, embedding = face["tokens"], face["embedding"]  # [T, C], [512]
        if drop:  # the zero face condition: what classifier-free guidance uses as "uncond"
            tokens, embedding = torch.zeros_like(tokens), torch.zeros_like(embedding)
        keep = ("latents", "mask", "text")  # [4, h, w], [1, h, w], [77, D]
        return {**{k: data[k] for k in keep}, "tokens": tokens, "embedding": embedding}


class IdShuffleSampler(torch.utils.data.Sampler):
    """Endless (target, condition, drop) draws. Draw k is a pure function of (seed, k): resuming = skipping.

    Each epoch visits every photo once in a seeded order; the condition is a *different* photo of the
    same person whenever that person has two or more (FACT's ID shuffle); with probability ``cond_drop``
    the face condition is dropped. Process ``rank`` of ``world`` takes every world-th draw.
    """

    def __init__(
        self,
        people: Sequence[str],
        *,
        seed: int,
        cond_drop: float,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
    ) -> None:
        self.people, self.seed, self.cond_drop = list(people), seed, cond_drop
        self.rank, self.world, self.start = rank, world, start
        self.members: dict[str, list[int]] = {}
        for index, person in enumerate(self.people):
            self.members.setdefault(person, []).append(index)
        self._order: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def draw(self, k: int) -> tuple[int, int, bool]:
        """The k-th draw of the whole (all-process) stream."""
        epoch, offset = divmod(k, len(self.people))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.people)))
        target = int(self._order[1][offset])
        rng = np.random.default_rng([self.seed, epoch, offset, 1])
        others = [i for i in self.members[self.people[target]] if i != target]
        condition = others[int(rng.integers(len(others)))] if others else target
        return target, condition, bool(rng.random() < self.cond_drop)

    def __iter__(self) -> Iterator[tuple[int, int, bool]]:
        k = self.start
        while True:
            yield self.draw(k * self.world + self.rank)
            k += 1


def make_synthetic_dataset(folder: Path, people: int, *, size: int, seed: int) -> None:
    """Fill ``folder`` with ``people`` x 2 textured pictures (seeded noise + smooth shapes); tiny runs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size  # [H, W] in 0..1
    for p in range(people):
        base = rng.uniform(40, 215, 3)  # a per-person colour, BGR
        for k in range(2):
            cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]  # [H, W, 1]
            image = base + 60 * blob * rng.uniform(-1, 1, 3) + rng.normal(0, 12, (size, size, 3))
            write_image(folder / f"person_{p}" / f"photo_{k}.png", np.clip(image, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- train
@dataclass
class TrainResult:
    """What a run produced: the final adapter file, the adapter itself, per-step losses."""

    path: Path
    adapter: FaceAdapter
    step: int
    history: list[dict[str, float]] = field(default_factory=list)


class Denoiser(nn.Module):
    """The frozen UNet (adapter fusers attached) and the adapter as one module for accelerate / DDP."""

    def __init__(self, unet: nn.Module, adapter: FaceAdapter) -> None:
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        tokens: torch.Tensor,
        embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Noise prediction [B, 4, h, w] and each fuser's increment [B, N, C] for the FAIR loss."""
        set_recording(self.adapter, True)
        kwargs = self.adapter.face_kwargs(tokens, embedding, scale=1.0, cfg=False)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
        found = increments(self.adapter)
        set_recording(self.adapter, False)  # the list above keeps what the loss needs
        return pred, found


@dataclass
class _Run:
    """The live state of a run: what checkpoints save and --resume restores."""

    config: TrainConfig
    accelerator: Any
    denoiser: nn.Module
    adapter: FaceAdapter
    optimizer: Any
    scheduler: Any
    noise_gen: torch.Generator
    step: int = 0
    samples: int = 0  # draws this process has consumed


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Train the face adapter; ``resume`` is a checkpoint folder or "latest". Returns the final adapter."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    # 1. config, Accelerator, seeds (identical on every process, so the adapter starts identical)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum
    )
    set_seed(config.seed)
    out = config.out_dir
    ckpt_dir = _find_checkpoint(out, resume) if resume else None
    if ckpt_dir is not None:
        _check_resume_config(config, ckpt_dir)
    # 2. models: VAE, text encoder, UNet frozen; only the adapter trains (main process first: it may
    #    download the base model or build the tiny kit; the others then find it)
    with accelerator.main_process_first():
        models = _prepare_models(config, accelerator)
    adapter = models["adapter"]
    denoiser = Denoiser(models["unet"], adapter)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    if {id(p) for p in trainable} != {id(p) for p in adapter.parameters()}:
        raise RuntimeError("only the face adapter's parameters may train")  # a bug here, not a user error
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _make_lr_schedule(config, optimizer)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    logger.info("adapter: %.2fM trainable parameters", sum(p.numel() for p in trainable) / 1e6)
    # 3. dataset: preprocess once per photo (main process first, the others read its cache)
    with accelerator.main_process_first():
        photos = _prepare_dataset(config, models, accelerator.device)
    train_photos, val_photo = _split_validation(config, photos)
    # 4. ID-shuffle sampling with condition drop; noise from a per-process generator
    noise_gen = torch.Generator().manual_seed(config.seed + 1_000_003 * (accelerator.process_index + 1))
    run = _Run(config, accelerator, denoiser, adapter, optimizer, scheduler, noise_gen)
    if ckpt_dir is not None:
        _load_checkpoint(run, ckpt_dir)
    sampler = IdShuffleSampler(
        [p.person for p in train_photos],
        seed=config.seed,
        cond_drop=config.cond_drop,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        start=run.samples,
    )
    loader = torch.utils.data.DataLoader(
        FaceDataset(train_photos),
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    noise_scheduler = models["noise_scheduler"]
    batches = _batches(loader, run, noise_scheduler.config.num_train_timesteps)
    # 5. the loop: FAIR loss, accumulation, clipping, optimizer + LR schedule steps
    history: list[dict[str, float]] = []
    bar = tqdm(
        total=config.max_steps, initial=run.step, desc="train", disable=not accelerator.is_main_process
    )
    start = time.perf_counter()
    while run.step < config.max_steps:
        stats = _train_step(run, batches, noise_scheduler)
        run.step += 1
        history.append({"step": run.step, **stats})
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", mse=f"{stats['mse']:.4f}", pen=f"{stats['penalty']:.2e}")
        if run.step % config.log_every == 0 or run.step == config.max_steps:
            rate = (time.perf_counter() - start) / max(len(history), 1)
            logger.info(
                "step %d %s (%.2f s/step)", run.step, " ".join(f"{k} {v:.4g}" for k, v in stats.items()), rate
            )
        # 6. validation pictures for the held-out identity (and at the end)
        if val_photo is not None and (run.step % config.eval_every == 0 or run.step == config.max_steps):
            _validate(run, models, val_photo)
        # 7. checkpoints (always one at the end)
        if run.step % config.save_every == 0 or run.step == config.max_steps:
            _save_checkpoint(run)
    bar.close()
    final = out / "adapter.safetensors"
    if accelerator.is_main_process:
        save_adapter(adapter, final, training_config={**config_to_dict(config), "step": run.step})
    accelerator.wait_for_everyone()
    logger.info(
        "final adapter: %s (step %d); use it: cp it to adapters/%s.safetensors", final, run.step, config.name
    )
    return TrainResult(final, accelerator.unwrap_model(denoiser).adapter, run.step, history)


# --- 2. models ----------------------------------------------------------------------------------------
def _prepare_models(config: TrainConfig, accelerator: Any) -> dict[str, Any]:
    """Frozen VAE / text encoder / UNet on the device, face models, a fresh adapter attached to the UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from studio.models.runtime import load_insightface_model, onnx_providers

    # 1. locate everything (building the tiny kit if the config names one that is not there)
    base = _resolve_model(config, config.base_model, folder=True)
    detector_path, recognizer_path = (
        _resolve_model(config, ref) for ref in (config.detector, config.recognizer)
    )
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        config.mixed_precision
    ]
    device = accelerator.device
    # 2. the base model's parts, frozen. Only the UNet runs in the mixed-precision dtype: the VAE and the
    #    text encoder only preprocess (their cached outputs then do not depend on the precision setting)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=weight_dtype)
    unet.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    text_encoder.to(device).eval()
    vae.to(device).eval()
    unet.to(device)
    if config.kit:
        from studio.models.tiny import NOT_A_PORTRAIT

        logger.warning("%s: the adapter learns nothing real, validation pictures are noise", NOT_A_PORTRAIT)
    # 3. face models (ONNX), then the adapter: float32, attached after the UNet was frozen and cast
    providers = onnx_providers(config.onnx_providers)
    detector = load_insightface_model(detector_path, providers)
    encoder = FaceTokenEncoder(recognizer_path, providers)
    adapter = build_adapter(
        unet,
        base_family=config.base_family,
        face_encoder=Path(config.recognizer).stem,
        encoder_sha256=sha256_file(recognizer_path),
        token_shape=encoder.token_shape,
        num_queries=config.num_queries,
        heads=config.heads,
        depth=config.depth,
    )
    with torch.no_grad():
        for fuser in adapter.fusers:
            fuser.alpha.fill_(config.gate_init)
    attach(adapter, unet)
    adapter.train()
    return {
        "base": base,
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "unet": unet,
        "noise_scheduler": noise_scheduler,
        "detector": detector,
        "encoder": encoder,
        "adapter": adapter,
        "model_ids": [base, sha256_file(detector_path), adapter.spec.encoder_sha256],
    }


def _resolve_model(config: TrainConfig, ref: str, *, folder: bool = False) -> str:
    """A path for ``ref``: an existing path, a tiny-kit or catalogue name, or (base model) a repo id."""
    from studio.models.catalogue import KIT_CATALOGUE, read_catalogue_file

    path = Path(os.path.expandvars(ref)).expanduser()
    if path.exists():
        if folder and not (path / "model_index.json").is_file():
            raise ConfigError(
                f"Base model {path} is not a diffusers folder.", fix="use a diffusers folder or repo id."
            )
        return str(path)
    if config.kit:
        kit = Path(os.path.expandvars(config.kit)).expanduser()
        if not (kit / KIT_CATALOGUE).is_file():
            from studio.models.tiny import make_tiny_kit

            make_tiny_kit(kit)
        entries = {e.name: e for e in read_catalogue_file(kit / KIT_CATALOGUE)}
        if ref in entries and entries[ref].source.local is not None:
            return str(kit / entries[ref].source.local)
    if folder and ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return ref  # a Hugging Face repo id (works offline from the HF cache with HF_HUB_OFFLINE=1)
    return str(_catalogue_model(ref))


def _catalogue_model(name: str) -> Path:
    """A verified file of the studio's model catalogue (configs/models.toml, models.dir)."""
    from studio.config import load_config
    from studio.models.catalogue import load_catalogue
    from studio.models.store import require_verified

    models = load_config("default").models
    return require_verified(load_catalogue(models).entry(name), models)


def _make_lr_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """Linear warm-up, then constant / cosine / linear decay over ``max_steps`` optimizer steps."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if config.lr_schedule == "constant" else config.lr_schedule
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps
    )


# --- 3. dataset preprocessing ------------------------------------------------------------------------
def _prepare_dataset(config: TrainConfig, models: dict[str, Any], device: torch.device) -> list[Photo]:
    """Every usable photo of the dataset, preprocessed into the cache (cached photos are not recomputed)."""
    if config.synthetic_people and not any(config.dataset.rglob("*.png")):
        make_synthetic_dataset(
            config.dataset, config.synthetic_people, size=2 * config.resolution, seed=config.seed
        )
    people = sorted(p for p in config.dataset.iterdir() if p.is_dir()) if config.dataset.is_dir() else []
    if not people:
        raise InputError(
            f"Dataset {config.dataset} has no person folders.",
            fix="lay it out as DATASET/<person>/<photo>.png (one folder per identity).",
        )
    settings = [
        config.resolution,
        config.det_size,
        config.det_threshold,
        config.min_face,
        *models["model_ids"],
    ]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    cache = Path(config.cache_dir or config.out_dir / "cache") / key
    photos = []
    for person in people:
        for path in sorted(p for p in person.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = _caption(path, config.caption)
            target = cache / f"{sha256_file(path)}.safetensors"
            cached = target.is_file() and _cached_caption(target) == caption
            if not cached and not _preprocess(path, caption, target, config, models, device):
                continue
            photos.append(Photo(person.name, path, target))
    logger.info("dataset: %d usable photos of %d people (cache %s)", len(photos), len(people), cache)
    if not photos:
        raise InputError(f"No usable photos in {config.dataset}.", fix="add photos with one clear face each.")
    counts = collections.Counter(p.person for p in photos)
    single = sorted(person for person, n in counts.items() if n == 1)
    if single:
        logger.warning(
            "%d people have one usable photo (no ID shuffle for them): %s", len(single), single[:5]
        )
    return photos


def _preprocess(
    path: Path, caption: str, target: Path, config: TrainConfig, models: dict[str, Any], device: torch.device
) -> bool:
    """Cache one photo's latents, face tokens + embedding, face mask, caption embedding; False = skipped."""
    from studio.faces.detect import DetectSettings, align_crops, detect_faces

    # 1. exactly one usable face
    image = read_image(path)  # HxWx3 uint8 BGR
    settings = DetectSettings(
        threshold=config.det_threshold, det_size=config.det_size, min_face=config.min_face
    )
    faces = detect_faces(image, models["detector"], settings)
    if len(faces) != 1:
        logger.info("skipping %s: %d usable faces (need exactly 1)", path, len(faces))
        return False
    tokens, embedding = models["encoder"].encode(align_crops(image, faces))  # (1, T, C), (1, 512)
    # 2. the training picture: centre square, resized; the face box mapped onto the latent grid
    picture, mask = _square_picture(image, faces[0].box, config.resolution)
    if mask.sum() == 0:
        logger.info("skipping %s: the face is outside the centre square", path)
        return False
    # 3. VAE latents (scaled) and the caption's text embedding
    with torch.no_grad():
        rgb = (
            torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float() / 127.5 - 1
        )  # HWC -> [1, 3, H, W]
        vae = models["vae"]
        latents = vae.encode(rgb.to(device)).latent_dist.mode() * vae.config.scaling_factor  # [1, 4, h, w]
        text = _encode_text(models, caption, device)  # [77, D]
    tensors = {
        "latents": latents[0].float().cpu(),
        "mask": mask,
        "text": text.float().cpu(),
        "tokens": torch.from_numpy(tokens[0]),
        "embedding": torch.from_numpy(embedding[0]),
    }
    write_bytes_atomic(target, save_tensors(tensors, metadata={"caption": caption, "source": str(path)}))
    return True


def _square_picture(image: np.ndarray, box: tuple[float, ...], size: int) -> tuple[Image.Image, torch.Tensor]:
    """The centre square of ``image`` at ``size`` px (RGB PIL) and the face mask [1, size/8, size/8]."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    picture = _centre_square(image, size)
    grid = size // VAE_FACTOR
    k = grid / side
    x1, x2 = (
        int(np.clip(f((v - left) * k), 0, grid)) for f, v in ((math.floor, box[0]), (math.ceil, box[2]))
    )
    y1, y2 = (int(np.clip(f((v - top) * k), 0, grid)) for f, v in ((math.floor, box[1]), (math.ceil, box[3])))
    mask = torch.zeros(1, grid, grid)  # [1, h, w]: 1 on latent cells the face box touches
    mask[:, y1:y2, x1:x2] = 1.0
    return picture, mask


def _centre_square(image: np.ndarray, size: int) -> Image.Image:
    """The centre square of a BGR picture, resized to ``size`` px, as an RGB PIL image."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return to_pil(image[top : top + side, left : left + side]).resize((size, size), Image.Resampling.LANCZOS)


def _encode_text(models: dict[str, Any], caption: str, device: torch.device) -> torch.Tensor:
    """The text encoder's last hidden state [77, D] for ``caption`` (SD 1.5's conditioning)."""
    tokenizer = models["tokenizer"]
    ids = tokenizer(
        caption,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # [1, 77]
    return models["text_encoder"](ids.to(device))[0][0]


def _caption(path: Path, default: str) -> str:
    """The caption file beside a photo (``photo.txt``), or the default prompt."""
    side = path.with_suffix(".txt")
    text = side.read_text(encoding="utf-8").strip() if side.is_file() else ""
    return text or default


def _cached_caption(path: Path) -> str | None:
    """The caption a cache file was made with (None if unreadable)."""
    try:
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        return header.get("__metadata__", {}).get("caption")
    except (OSError, ValueError):
        return None


def _read_cache(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path.read_bytes())


def _split_validation(config: TrainConfig, photos: list[Photo]) -> tuple[list[Photo], Photo | None]:
    """(training photos, the held-out identity's first photo) ; nothing is held out without validation."""
    people = sorted({p.person for p in photos})
    if not config.eval_every or not config.num_val_images:
        return photos, None
    held = config.val_identity or (people[-1] if len(people) > 1 else "")
    if held and held not in people:
        raise ConfigError(f"val_identity {held!r} has no usable photos.", fix=f"use one of {people}.")
    train_photos = [p for p in photos if p.person != held] or photos
    if not held:
        logger.warning("only one identity: validation uses a training identity")
    val = next(p for p in photos if p.person == (held or people[0]))
    logger.info("validation identity: %s (%s)", val.person, val.path.name)
    return train_photos, val


# --- 5. one optimizer step --------------------------------------------------------------------------
def _batches(
    loader: torch.utils.data.DataLoader, run: _Run, num_timesteps: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Device batches with their noise and timesteps; counts consumed draws (the resume position)."""
    device, fixed = run.accelerator.device, None
    for batch in loader:
        if fixed is None or not run.config.overfit_one_batch:
            latents = batch["latents"]
            noise = torch.randn(latents.shape, generator=run.noise_gen)  # CPU draw: same on every device
            steps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=run.noise_gen)
            fixed = {**batch, "noise": noise, "timesteps": steps}
        run.samples += run.config.batch_size
        yield {k: v.to(device) for k, v in fixed.items()}


def _train_step(
    run: _Run, batches: Iterator[dict[str, torch.Tensor]], noise_scheduler: Any
) -> dict[str, float]:
    """grad_accum micro-batches, one optimizer and LR step; mean loss / mse / penalty over micro-batches."""
    sums = torch.zeros(3, device=run.accelerator.device)
    for _ in range(run.config.grad_accum):
        batch = next(batches)
        with run.accelerator.accumulate(run.denoiser):
            latents, noise = batch["latents"], batch["noise"]
            timesteps = batch["timesteps"]
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            pred, incs = run.denoiser(noisy, timesteps, batch["text"], batch["tokens"], batch["embedding"])
            total, mse, penalty = fair_loss(pred, target, incs, batch["mask"], run.config.lam)
            run.accelerator.backward(total)
            if run.accelerator.sync_gradients:
                run.accelerator.clip_grad_norm_(run.adapter.parameters(), run.config.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([total, mse, penalty]).detach().float()
    run.scheduler.step()
    loss, mse, penalty = (sums / run.config.grad_accum).tolist()
    return {"loss": loss, "mse": mse, "penalty": penalty, "lr": run.scheduler.get_last_lr()[0]}


# --- 6. validation ----------------------------------------------------------------------------------
def _validate(run: _Run, models: dict[str, Any], photo: Photo) -> None:
    """Render num_val_images with the held-out face at scale 1; [reference | images] -> val/step_N.png."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    config = run.config
    if run.accelerator.is_main_process:
        core = run.accelerator.unwrap_model(run.denoiser)
        pipe = StableDiffusionPipeline(
            vae=models["vae"],
            text_encoder=models["text_encoder"],
            tokenizer=models["tokenizer"],
            unet=core.unet,
            scheduler=DDIMScheduler.from_config(models["noise_scheduler"].config, clip_sample=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        face = _read_cache(photo.cache)
        n, prompt = config.num_val_images, _caption(photo.path, config.caption)
        # the validation pictures must not move the training RNG: fork it
        device = run.accelerator.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), run.accelerator.autocast():
            kwargs = core.adapter.face_kwargs(
                face["tokens"][None], face["embedding"][None], scale=1.0, cfg=config.val_cfg > 1
            )
            images = pipe(
                prompt,
                num_images_per_prompt=n,
                num_inference_steps=config.val_steps,
                guidance_scale=config.val_cfg,
                height=config.resolution,
                width=config.resolution,
                generator=[torch.Generator().manual_seed(config.seed + k) for k in range(n)],
                cross_attention_kwargs=kwargs,
            ).images
        reference = _centre_square(read_image(photo.path), config.resolution)
        row = np.concatenate([from_pil(im) for im in [reference, *images]], axis=1)  # [H, (n+1)W, 3] BGR
        settings = {
            "Steps": config.val_steps,
            "CFG scale": config.val_cfg,
            "Seed": config.seed,
            "Face": photo.person,
        }
        path = write_image(
            config.out_dir / "val" / f"step_{run.step}.png",
            row,
            parameters=format_parameters(
                prompt, "", {**settings, "Adapter step": run.step, "Face scale": 1.0}
            ),
        )
        logger.info("validation pictures: %s (reference face first)", path)
    run.accelerator.wait_for_everyone()


# --- 7. checkpoints ---------------------------------------------------------------------------------
def _save_checkpoint(run: _Run) -> Path:
    """Write ckpt/step_N/ (built in a temp folder, renamed into place): everything --resume needs."""
    acc, root = run.accelerator, run.config.out_dir / "ckpt"
    final, tmp = root / f"step_{run.step}", root / f".step_{run.step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    _save_rng(run, tmp, acc.process_index)
    if acc.is_main_process:
        config = config_to_dict(run.config)
        save_adapter(run.adapter, tmp / "adapter.safetensors", training_config={**config, "step": run.step})
        tensors, meta = _optimizer_to_files(run.optimizer.state_dict())
        write_bytes_atomic(tmp / "optimizer.safetensors", save_tensors(tensors))
        write_text_atomic(tmp / "optimizer.json", json.dumps(meta))
        write_text_atomic(tmp / "scheduler.json", json.dumps(run.scheduler.state_dict()))
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        trainer = {"format": CKPT_FORMAT, "version": 1, "step": run.step, "samples": run.samples}
        trainer |= {"world_size": acc.num_processes, "grad_scaler": scaler, "sampler_seed": run.config.seed}
        write_text_atomic(tmp / "trainer.json", json.dumps(trainer, indent=1))
        write_text_atomic(tmp / "config.toml", tomli_w.dumps(config))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        logger.info("checkpoint: %s", final)
    acc.wait_for_everyone()
    return final


def _save_rng(run: _Run, folder: Path, rank: int) -> None:
    """This process's RNG states: python + numpy as JSON; torch CPU / CUDA / noise generator, safetensors."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(state), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    tensors = {"torch_cpu": torch.get_rng_state(), "noise": run.noise_gen.get_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    write_text_atomic(folder / f"rng_{rank}.json", json.dumps(states))
    write_bytes_atomic(folder / f"rng_{rank}.safetensors", save_tensors(tensors))


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as flat tensors ``<param>.<name>`` plus JSON (param groups, scalars)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of _optimizer_to_files."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _find_checkpoint(out_dir: Path, resume: str) -> Path:
    """The checkpoint folder for --resume: a path, or "latest" = the highest step under out_dir/ckpt."""
    if resume != "latest":
        folder = Path(resume).expanduser()
    else:
        found = sorted((out_dir / "ckpt").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        folder = found[-1] if found else out_dir / "ckpt" / "step_<none>"
    if not (folder / "trainer.json").is_file():
        raise InputError(
            f"No training checkpoint at {folder}.",
            fix=f"pass --resume PATH to a ckpt/step_N folder under {out_dir}.",
        )
    return folder


def _check_resume_config(config: TrainConfig, folder: Path) -> None:
    """Refuse to resume with settings that change the run (anything but places, reporting and length)."""
    saved = tomllib.loads((folder / "config.toml").read_text(encoding="utf-8"))
    now = config_to_dict(config)
    changed = sorted(k for k in now.keys() - RESUME_MAY_CHANGE if saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"Cannot resume {folder}: the config differs in {diffs}.",
            fix=f"resume with the checkpoint's config ({folder / 'config.toml'}); only "
            f"{', '.join(sorted(RESUME_MAY_CHANGE))} may change.",
        )


def _load_checkpoint(run: _Run, folder: Path) -> None:
    """Restore adapter, optimizer, LR schedule, grad scaler, step, sample position and RNG states."""
    acc = run.accelerator
    trainer = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    if trainer.get("format") != CKPT_FORMAT or trainer.get("world_size") != acc.num_processes:
        raise InputError(
            f"Checkpoint {folder} was written by {trainer.get('world_size')} process(es) in format "
            f"{trainer.get('format')!r}; this run has {acc.num_processes}.",
            fix="resume with the same number of processes (accelerate launch --num_processes N).",
        )
    # 1. adapter weights: the file's spec must be this adapter's (float32 copy, no dtype round trip)
    path = folder / "adapter.safetensors"
    if read_adapter_spec(path) != run.adapter.spec:
        raise InputError(
            f"The adapter in {folder} does not match this config's adapter.", fix="check the config."
        )
    with torch.no_grad():
        run.adapter.load_state_dict(_read_cache(path), strict=True)
    # 2. optimizer, LR schedule, grad scaler, counters
    meta = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    run.optimizer.load_state_dict(_optimizer_from_files(_read_cache(folder / "optimizer.safetensors"), meta))
    run.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text(encoding="utf-8")))
    if acc.scaler is not None and trainer.get("grad_scaler"):
        acc.scaler.load_state_dict(trainer["grad_scaler"])
    run.step, run.samples = int(trainer["step"]), int(trainer["samples"])
    # 3. RNG states of this process
    rank = acc.process_index
    states = json.loads((folder / f"rng_{rank}.json").read_text(encoding="utf-8"))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = _read_cache(folder / f"rng_{rank}.safetensors")
    torch.set_rng_state(tensors["torch_cpu"])
    run.noise_gen.set_state(tensors["noise"])
    if torch.cuda.is_available() and "cuda_0" in tensors:
        torch.cuda.set_rng_state_all([tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count())])
    logger.info("resumed from %s at step %d", folder, run.step)


# ----------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``train_adapter.py CONFIG [--resume [latest|PATH]] [--set key=value ...]``."""
    parser = argparse.ArgumentParser(
        description="Train the FACT face adapter.",
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:3]),  # the run commands
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", type=Path, help="configs/train_*.toml")
    parser.add_argument(
        "--resume", nargs="?", const="latest", help="a ckpt/step_N folder, or latest (default)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    args = parser.parse_args(argv)
    main_process = int(os.environ.get("RANK", "0")) == 0  # set by accelerate launch / torchrun
    level = logging.INFO if main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    try:
        train(load_train_config(args.config, args.set), resume=args.resume)
    except StudioError as err:
        logger.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        logger.error("interrupted: resume from the last checkpoint with --resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
