"""The face-adapter training config: one flat dataclass read from ``configs/train_*.toml``.

Every key of a ``train_*.toml`` is a field of ``TrainConfig`` (documented below); ``--set key=value``
overrides any of them with a TOML literal (a bare word is a string). Unknown keys, missing keys, wrong
types and out-of-range values raise ``ConfigError`` naming the key. ``resolve_model`` turns the config's
model references (paths, tiny-kit or catalogue names, Hugging Face repo ids) into paths.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from studio.errors import ConfigError


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


# --- model references ------------------------------------------------------------------------------
def resolve_model(config: TrainConfig, ref: str, *, folder: bool = False) -> str:
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
        from studio.models import ensure_tiny_kit

        kit = ensure_tiny_kit(Path(os.path.expandvars(config.kit)).expanduser())
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
