"""Face-adapter training data: a folder of people, a per-photo preprocessing cache, the ID-shuffle sampler.

Dataset layout: ``DATASET/<person>/<photo>.png|jpg|jpeg|webp``, one sub-folder per identity; a
``<photo>.txt`` beside a photo is its caption. Each usable photo (exactly one face, inside the centre
square) is preprocessed once into ``<cache>/<settings key>/<photo sha256>.safetensors``: VAE latents,
face tokens + embedding, face mask on the latent grid, caption embedding. The face models come in as
callables (``Preprocessor``), so this module does not depend on ``studio.faces``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from studio.adapter.trainconfig import TrainConfig
from studio.errors import ConfigError, InputError
from studio.files import sha256_file, write_bytes_atomic
from studio.imageio import read_image, to_pil, write_image
from studio.types import Face, ImageBGR

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VAE_FACTOR = 8  # SD latents are 1/8 of the picture side

FindFaces = Callable[[ImageBGR], Sequence[Face]]  # the usable faces of a picture
EncodeFaces = Callable[
    [ImageBGR, Sequence[Face]], tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]
]  # -> (tokens (N, T, C), embeddings (N, 512) L2-normed)


@dataclass(frozen=True)
class Photo:
    """One usable training photo and its preprocessing cache file."""

    person: str
    path: Path
    cache: Path


@dataclass(frozen=True)
class Preprocessor:
    """The frozen models that turn a photo into its cached training tensors."""

    find_faces: FindFaces
    encode_faces: EncodeFaces
    vae: Any  # diffusers AutoencoderKL
    tokenizer: Any  # CLIPTokenizer
    text_encoder: Any  # CLIPTextModel
    device: torch.device
    model_ids: Sequence[str]  # part of the cache key: other models, other cache files


class FaceDataset(torch.utils.data.Dataset):
    """Cached photos; item (target, condition, drop) -> target latents / mask / caption + condition's face."""

    def __init__(self, photos: Sequence[Photo]) -> None:
        self.photos = list(photos)

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, item: tuple[int, int, bool]) -> dict[str, torch.Tensor]:
        target, condition, drop = item
        data = read_cached(self.photos[target].cache)
        face = data if condition == target else read_cached(self.photos[condition].cache)
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


def make_loader(
    photos: Sequence[Photo], config: TrainConfig, *, rank: int, world: int, start: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """Batches of the ID-shuffle draws ``start``, ``start + 1``, ... of process ``rank`` of ``world``."""
    sampler = IdShuffleSampler(
        [p.person for p in photos],
        seed=config.seed,
        cond_drop=config.cond_drop,
        rank=rank,
        world=world,
        start=start,
    )
    return torch.utils.data.DataLoader(
        FaceDataset(photos),
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
    )


def noised_batches(
    loader: torch.utils.data.DataLoader,
    noise_gen: torch.Generator,
    num_timesteps: int,
    device: torch.device,
    *,
    overfit: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """Device batches with their noise and timesteps; ``overfit``: the first batch, noise, steps forever."""
    fixed = None
    for batch in loader:
        if fixed is None or not overfit:
            latents = batch["latents"]  # [B, 4, h, w]
            noise = torch.randn(latents.shape, generator=noise_gen)  # CPU draw: same on every device
            steps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=noise_gen)
            fixed = {**batch, "noise": noise, "timesteps": steps}
        yield {k: v.to(device) for k, v in fixed.items()}


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


# --- the dataset scan and its cache -----------------------------------------------------------------
def prepare_dataset(config: TrainConfig, pre: Preprocessor) -> list[Photo]:
    """Every usable photo of the dataset, preprocessed into the cache (cached photos are not recomputed)."""
    people = _person_folders(config)
    cache = _cache_folder(config, pre.model_ids)
    photos = []
    for person in people:
        for path in sorted(p for p in person.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = caption_for(path, config.caption)
            target = cache / f"{sha256_file(path)}.safetensors"
            cached = target.is_file() and _cached_caption(target) == caption
            if not cached and not _preprocess(path, caption, target, config.resolution, pre):
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


def _person_folders(config: TrainConfig) -> list[Path]:
    """The dataset's person folders, sorted (an empty folder is first filled if ``synthetic_people``)."""
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
    return people


def _cache_folder(config: TrainConfig, model_ids: Sequence[str]) -> Path:
    """``<cache_dir>/<key>``: the key hashes every setting and model the cached tensors depend on."""
    settings = [config.resolution, config.det_size, config.det_threshold, config.min_face, *model_ids]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    return Path(config.cache_dir or config.out_dir / "cache") / key


def _preprocess(path: Path, caption: str, target: Path, resolution: int, pre: Preprocessor) -> bool:
    """Cache one photo's latents, face tokens + embedding, face mask, caption embedding; False = skipped."""
    # 1. exactly one usable face
    image = read_image(path)  # HxWx3 uint8 BGR
    faces = pre.find_faces(image)
    if len(faces) != 1:
        logger.info("skipping %s: %d usable faces (need exactly 1)", path, len(faces))
        return False
    tokens, embedding = pre.encode_faces(image, faces)  # (1, T, C), (1, 512)
    # 2. the training picture: centre square, resized; the face box mapped onto the latent grid
    picture, mask = _square_picture(image, faces[0].box, resolution)
    if mask.sum() == 0:
        logger.info("skipping %s: the face is outside the centre square", path)
        return False
    # 3. VAE latents (scaled) and the caption's text embedding
    with torch.no_grad():
        rgb = (
            torch.from_numpy(np.array(picture)).permute(2, 0, 1)[None].float() / 127.5 - 1
        )  # HWC -> [1, 3, H, W]
        latents = pre.vae.encode(rgb.to(pre.device)).latent_dist.mode() * pre.vae.config.scaling_factor
        text = encode_text(pre.tokenizer, pre.text_encoder, caption, pre.device)  # [77, D]
    tensors = {
        "latents": latents[0].float().cpu(),  # [4, h, w]
        "mask": mask,
        "text": text.float().cpu(),
        "tokens": torch.from_numpy(tokens[0]),
        "embedding": torch.from_numpy(embedding[0]),
    }
    write_bytes_atomic(target, save_tensors(tensors, metadata={"caption": caption, "source": str(path)}))
    return True


def _square_picture(image: ImageBGR, box: tuple[float, ...], size: int) -> tuple[Image.Image, torch.Tensor]:
    """The centre square of ``image`` at ``size`` px (RGB PIL) and the face mask [1, size/8, size/8]."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    picture = centre_square(image, size)
    grid = size // VAE_FACTOR
    k = grid / side
    x1, x2 = (
        int(np.clip(f((v - left) * k), 0, grid)) for f, v in ((math.floor, box[0]), (math.ceil, box[2]))
    )
    y1, y2 = (int(np.clip(f((v - top) * k), 0, grid)) for f, v in ((math.floor, box[1]), (math.ceil, box[3])))
    mask = torch.zeros(1, grid, grid)  # [1, h, w]: 1 on latent cells the face box touches
    mask[:, y1:y2, x1:x2] = 1.0
    return picture, mask


def centre_square(image: ImageBGR, size: int) -> Image.Image:
    """The centre square of a BGR picture, resized to ``size`` px, as an RGB PIL image."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return to_pil(image[top : top + side, left : left + side]).resize((size, size), Image.Resampling.LANCZOS)


def encode_text(tokenizer: Any, text_encoder: Any, caption: str, device: torch.device) -> torch.Tensor:
    """The text encoder's last hidden state [77, D] for ``caption`` (SD 1.5's conditioning)."""
    ids = tokenizer(
        caption,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # [1, 77]
    return text_encoder(ids.to(device))[0][0]


def caption_for(path: Path, default: str) -> str:
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


def read_cached(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one cache file (safetensors: never executes code)."""
    return load_tensors(path.read_bytes())


# --- the validation split ---------------------------------------------------------------------------
def split_validation(config: TrainConfig, photos: list[Photo]) -> tuple[list[Photo], Photo | None]:
    """(training photos, the held-out identity's first photo); nothing is held out without validation."""
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
