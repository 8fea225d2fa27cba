"""TOML configuration: profiles in configs/, validated once into frozen objects.

Loading order (later wins): ``configs/default.toml`` → ``configs/<profile>.toml`` → an optional user
file → ``--set section.key=value`` overrides. Every bad value is reported with its key, the value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w

from studio.errors import ConfigError, InputError
from studio.types import Device, DType, Sampler

logger = logging.getLogger(__name__)

OnnxProviders = Literal["auto", "cpu", "cuda", "coreml"]
ShippedFolder = Literal["configs", "prompts"]  # top-level folders that ship inside the wheel
MAX_BATCH = 16  # images rendered at once (draft.batch_size, --batch-size)
PROFILES_NOTE = "profiles are the configs/*.toml files other than models.toml and train_*.toml"


def config_dir() -> Path:
    """The folder holding default.toml, tiny.toml and models.toml (STUDIO_CONFIG_DIR overrides)."""
    env = os.environ.get("STUDIO_CONFIG_DIR")
    return Path(env) if env else shipped_dir("configs")


def shipped_dir(name: ShippedFolder) -> Path:
    """A folder the studio ships: the checkout's top-level one, else the installed package's copy."""
    project = project_dir()
    if project is not None:
        return project / name
    # a wheel carries configs/ and prompts/ as package data under studio/_data/ (see pyproject.toml)
    folder = importlib.resources.files("studio").joinpath("_data", name)
    if not isinstance(folder, Path):
        raise ConfigError(
            f"the studio's {name}/ folder is inside an archive ({folder}); expected files on disk.",
            fix="install portrait-studio as an unpacked wheel (pip / uv install it), not from a zip",
        )
    return folder


def project_dir() -> Path | None:
    """The checkout the studio runs from (top-level configs/, prompts/, loras/); None when installed."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "configs").is_dir() else None


def bounds(lo: float, hi: float, *, multiple: int | None = None) -> dict[str, float]:
    """Field metadata: the one definition of a setting's allowed range (read by validation and the CLI)."""
    return {"min": lo, "max": hi} | ({"multiple": multiple} if multiple else {})


def limits(cls: type, name: str) -> dict[str, float]:
    """The allowed range of field ``name`` of dataclass ``cls`` (``{"min": .., "max": ..}`` or empty)."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    return {k: v for k, v in spec.metadata.items() if k in ("min", "max")}


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of a settings dataclass against its Literal choices and range metadata."""
    hints = typing.get_type_hints(type(obj))
    for spec in dataclasses.fields(obj):
        check_value(spec, hints[spec.name], getattr(obj, spec.name), f"{prefix}{spec.name}")


def check_value(spec: dataclasses.Field, hint: Any, value: Any, key: str) -> None:
    """One value against its field's Literal choices and range; a ConfigError naming ``key`` if not."""
    if get_origin(hint) is Literal and value is not None and value not in get_args(hint):
        _bad(key, value, "one of " + ", ".join(repr(a) for a in get_args(hint)))
    item = _tuple_literal(hint)
    if item is not None and value is not None:
        for one in value:
            check_value(spec, item, one, key)
        if len(set(value)) != len(value):
            _bad(key, value, "each value at most once")
    if value is None or "min" not in spec.metadata:
        return
    lo, hi, step = spec.metadata["min"], spec.metadata["max"], spec.metadata.get("multiple")
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        _bad(key, value, f"a number from {lo} to {hi}")
    if step and value % step:
        _bad(key, value, f"a multiple of {step} from {lo} to {hi}")


def _tuple_literal(hint: Any) -> Any:
    """``Literal[...]`` of ``tuple[Literal[...], ...]`` (``| None`` allowed), else None."""
    union = get_origin(hint) is types.UnionType
    options = [a for a in get_args(hint) if a is not type(None)] if union else [hint]
    for option in options:
        args = get_args(option)
        if get_origin(option) is tuple and args and get_origin(args[0]) is Literal:
            return args[0]
    return None


@dataclass(frozen=True)
class ModelsConfig:
    """Where model files live and how they may be loaded."""

    dir: Path = Path("~/.cache/portrait-studio/models")
    search_paths: tuple[Path, ...] = ()
    catalogues: tuple[Path, ...] = (Path("models.toml"),)
    tiny_kit: Path | None = None
    allow_pickle: bool = False
    licences: Path | None = None  # your licence declarations for models outside the catalogue (TOML)


@dataclass(frozen=True)
class RuntimeConfig:
    """Device, precision, ONNX Runtime execution providers and CPU threads."""

    device: Device = "auto"
    dtype: DType = "auto"
    onnx_providers: OnnxProviders = "auto"
    threads: int = field(default=0, metadata=bounds(0, 1024))  # torch, OpenCV, ORT; 0: physical cores

    def __post_init__(self) -> None:
        check_fields(self, "runtime.")


Toggle = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class PerformanceConfig:
    """GPU memory and speed options; "auto" picks per device (diffusers already uses SDPA attention)."""

    vae_slicing: Toggle = "auto"  # auto: on for cuda (decode a batch image by image)
    vae_tiling: Toggle = "auto"  # auto: on for outputs above 2 megapixels
    attention_slicing: Toggle = "auto"  # auto: on for mps
    channels_last: Toggle = "auto"  # auto: on for cuda
    cpu_offload: Literal["none", "model", "sequential"] = "none"
    compile: bool = False  # torch.compile the UNet (slow first image, faster after)

    def __post_init__(self) -> None:
        check_fields(self, "performance.")


@dataclass(frozen=True)
class ImagesConfig:
    """Limits on images read from users."""

    max_pixels: int = field(default=40_000_000, metadata=bounds(1, 1_000_000_000))

    def __post_init__(self) -> None:
        check_fields(self, "images.")


@dataclass(frozen=True)
class DraftConfig:
    """Stable Diffusion draft defaults."""

    model: str = "sd15"  # catalogue name, Hugging Face repo id, diffusers folder or .safetensors file
    family: Literal["auto", "sd15", "sdxl"] = "auto"  # for models outside the catalogue
    width: int = field(default=512, metadata=bounds(64, 4096, multiple=8))
    height: int = field(default=768, metadata=bounds(64, 4096, multiple=8))
    steps: int = field(default=30, metadata=bounds(1, 500))
    cfg: float = field(default=7.0, metadata=bounds(0.0, 50.0))
    sampler: Sampler = "DPM++ 2M Karras"
    negative: str = "lowres, blurry, deformed face, bad anatomy, extra fingers, watermark, text"
    controlnet: str = "controlnet_openpose_sd15"  # used with --pose (SDXL: controlnet_openpose_sdxl)
    lora_dir: Path | None = None  # default: the checkout's loras/ (installed: <models.dir>/lora)
    cap_styles: bool = False  # true: a style preset cannot raise width, height or steps above these
    max_loaded_loras: int = field(default=8, metadata=bounds(1, 64))

    def __post_init__(self) -> None:
        check_fields(self, "draft.")


FaceSelect = Literal["all", "largest", "left-to-right", "index", "similarity"]
MaskShape = Literal["ellipse", "box"]
# The face processors, applied one after another to every assigned face (studio.faces.processors).
ProcessorName = Literal["swap", "enhance"]
BlendMode = Literal["alpha", "poisson"]  # feathered alpha paste, or Poisson (cv2.seamlessClone) in the ROI
# Face-parser regions (the BiSeNet CelebAMask-HQ classes FaceFusion masks by).
FaceRegion = Literal[
    "skin",
    "left-eyebrow",
    "right-eyebrow",
    "left-eye",
    "right-eye",
    "glasses",
    "nose",
    "mouth",
    "upper-lip",
    "lower-lip",
]
FACE_REGIONS: tuple[FaceRegion, ...] = get_args(FaceRegion)
# Each region's CelebAMask-HQ class index in a BiSeNet parser's 19 outputs (FaceFusion's face_mask_region_set)
FACE_REGION_CLASSES: Mapping[FaceRegion, int] = types.MappingProxyType(
    dict(zip(FACE_REGIONS, (1, 2, 3, 4, 5, 6, 10, 11, 12, 13), strict=True))
)


@dataclass(frozen=True)
class DetectConfig:
    """Which detections count as faces: score threshold, detector input side, smallest face side."""

    threshold: float = field(default=0.5, metadata=bounds(0.05, 0.99))  # detector score
    det_size: int = field(default=640, metadata=bounds(128, 2048, multiple=32))  # px, letterboxed square
    min_face: int = field(default=32, metadata=bounds(1, 4096))  # px mean box side: smaller faces are ignored

    def __post_init__(self) -> None:
        check_fields(self, "refine.detect.")


@dataclass(frozen=True)
class MaskConfig:
    """How the crop-space blend mask is shaped: fractions are of the crop's side."""

    shape: MaskShape = "ellipse"
    padding: float = field(default=0.0, metadata=bounds(0.0, 0.49))  # trimmed from each side
    blur: float = field(default=0.1, metadata=bounds(0.0, 0.5))  # feather width (0: a 1-px hard edge)
    occlusion: bool = False  # also mask what covers the face (hands, glasses, hair): refine.occluder model
    regions: tuple[FaceRegion, ...] = ()  # also keep only these face-parser regions (none: no parser)

    def __post_init__(self) -> None:
        check_fields(self, "refine.mask.")


@dataclass(frozen=True)
class EnrolConfig:
    """Quality gates for enrolment photos."""

    min_face: int = field(default=64, metadata=bounds(16, 4096))  # px, mean box side
    min_score: float = field(default=0.6, metadata=bounds(0.05, 0.99))  # detector score
    min_sharpness: float = field(default=20.0, metadata=bounds(0.0, 10000.0))  # Laplacian variance
    outlier: float = field(default=0.25, metadata=bounds(-1.0, 1.0))  # min cosine to the others' mean

    def __post_init__(self) -> None:
        check_fields(self, "refine.enrol.")


@dataclass(frozen=True)
class EnhanceConfig:
    """The face enhancer processor: which model, how much of its result is blended in."""

    model: str = "gfpgan_1_4"  # gfpgan_1_4 or codeformer (catalogue name or .onnx file)
    blend: float = field(default=0.8, metadata=bounds(0.0, 1.0))  # 1: the enhanced face alone
    fidelity: float = field(default=0.5, metadata=bounds(0.0, 1.0))  # CodeFormer: 1 = closest to input

    def __post_init__(self) -> None:
        check_fields(self, "refine.enhance.")


@dataclass(frozen=True)
class RefineConfig:
    """Face refinement: models, detection, selection, upscaling, blending and QA."""

    enabled: bool = True
    detector: str = "det_10g"
    recognizer: str = "w600k_r50"
    swapper: str = "inswapper_128"
    upscaler: str = "realesrgan_x2plus"
    occluder: str = "xseg_1"  # occlusion mask model (refine.mask.occlusion)
    parser: str = "bisenet_resnet_34"  # face-parser model (refine.mask.regions)
    processors: tuple[ProcessorName, ...] = ("swap",)  # applied in this order to every assigned face
    blend: BlendMode = "alpha"
    identities_dir: Path = Path("~/.local/share/portrait-studio/identities")
    templates_dir: Path = Path("~/.local/share/portrait-studio/templates")  # multi-person templates
    select: FaceSelect = "all"  # which faces get a single --identity
    upscale: Toggle = "auto"  # auto: when the face on the canvas is larger than the swapper's 128 px
    upscale_tile: int = field(default=0, metadata=bounds(0, 4096))  # Real-ESRGAN tile size, 0 = whole crop
    colour_match: bool = True
    min_similarity: float = field(default=0.0, metadata=bounds(0.0, 1.0))  # QA: below this the image fails
    detect: DetectConfig = DetectConfig()
    mask: MaskConfig = MaskConfig()
    enhance: EnhanceConfig = EnhanceConfig()
    enrol: EnrolConfig = EnrolConfig()

    def __post_init__(self) -> None:
        check_fields(self, "refine.")


@dataclass(frozen=True)
class AdapterConfig:
    """Identity-conditioned drafts: which adapter files, and how strongly they steer."""

    fact: str = "adapters/fact-sd15.safetensors"  # catalogue name or file (relative to the project folder)
    faceid: str = "ip_adapter_faceid_sd15"  # catalogue name or file of IP-Adapter-FaceID
    scale: float = field(default=0.8, metadata=bounds(0.0, 2.0))

    def __post_init__(self) -> None:
        check_fields(self, "adapter.")


WatermarkMethod = Literal["dwtDct", "dwtDctSvd", "rivaGan"]
LabelCorner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]


@dataclass(frozen=True)
class ProvenanceConfig:
    """How every output is marked as AI-generated: C2PA Content Credentials, a watermark, a label.

    Turning C2PA or the watermark off is allowed, and written to the audit log with every output."""

    c2pa: bool = True
    watermark: bool = True
    watermark_method: WatermarkMethod = "dwtDctSvd"  # chosen by bench/watermark_bench.py
    signing_key: Path | None = None  # PEM private key (with signing_chain); none: a local CA in data_dir
    signing_chain: Path | None = None  # PEM certificates, the signing certificate first
    data_dir: Path = Path("~/.local/share/portrait-studio")  # the local CA and signing certificate
    trust_anchors: Path | None = None  # PEM root certificates `studio verify` trusts
    label: bool = False  # a visible label in a corner of every output
    label_text: str = "AI-generated"
    label_corner: LabelCorner = "bottom-right"

    def __post_init__(self) -> None:
        check_fields(self, "provenance.")


@dataclass(frozen=True)
class AuditConfig:
    """The append-only, hash-chained audit log of every identity enrolment, use, revocation and removal."""

    log: Path = Path("~/.local/share/portrait-studio/audit.jsonl")


@dataclass(frozen=True)
class ConsentConfig:
    """What the studio's work is for: identities are used only within their consent's scope."""

    purpose: str = "internal"  # e.g. ads, concept-art, internal; a campaign may set its own


@dataclass(frozen=True)
class SafetyConfig:
    """Content checks: on the draft before refine and on the final image."""

    checker: Literal["none", "nudenet"] = "none"  # nudenet: the `safety` extra (NudeNet 320n, AGPL-3.0)
    model: str = "nudenet_320n"  # catalogue entry of the detector
    required: bool = False  # true: a missing or failing checker blocks every output (fails closed)
    threshold: float = field(default=0.5, metadata=bounds(0.05, 0.99))  # detector score that blocks
    blocked_classes: tuple[str, ...] = (
        "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "ANUS_EXPOSED",
        "BUTTOCKS_EXPOSED",
    )  # fmt: skip
    blocked_terms: tuple[str, ...] = ()  # prompt words that block a request before any rendering

    def __post_init__(self) -> None:
        check_fields(self, "safety.")


@dataclass(frozen=True)
class WebConfig:
    """``studio web``: the browser UI and HTTP API (--host/--port/--auth on the command line)."""

    host: str = "127.0.0.1"  # loopback only; any other address needs --auth or --auth-file
    port: int = field(default=7860, metadata=bounds(1, 65535))
    max_upload_mb: int = field(default=25, metadata=bounds(1, 2048))  # per uploaded file
    slots: int = field(default=0, metadata=bounds(0, 64))  # jobs on the accelerator at once; 0: one per GPU
    manifests: Path = Path("campaigns")  # campaign manifests offered in the Campaigns tab (besides uploads)

    def __post_init__(self) -> None:
        check_fields(self, "web.")


@dataclass(frozen=True)
class StudioConfig:
    """The whole validated configuration."""

    profile: str
    models: ModelsConfig = ModelsConfig()
    commercial: bool = False
    output_dir: Path = Path("outputs")
    runtime: RuntimeConfig = RuntimeConfig()
    performance: PerformanceConfig = PerformanceConfig()
    images: ImagesConfig = ImagesConfig()
    draft: DraftConfig = DraftConfig()
    refine: RefineConfig = RefineConfig()
    adapter: AdapterConfig = AdapterConfig()
    provenance: ProvenanceConfig = ProvenanceConfig()
    audit: AuditConfig = AuditConfig()
    consent: ConsentConfig = ConsentConfig()
    safety: SafetyConfig = SafetyConfig()
    web: WebConfig = WebConfig()
    explicit_keys: tuple[str, ...] = ()  # keys set by --set or --config: they beat style presets

    def __post_init__(self) -> None:
        check_fields(self)


def load_config(
    profile: str = "default", *, user_file: Path | None = None, overrides: Sequence[str] = ()
) -> StudioConfig:
    """Load, merge and validate the configuration for ``profile``."""
    # 1. merge the layers
    folder = config_dir()
    table = _read_toml(folder / "default.toml")
    if profile != "default":
        table = _merge(table, _read_toml(_profile_file(folder, profile)))
    explicit: set[str] = set()
    layers = [_read_toml(Path(user_file))] if user_file is not None else []
    layers += [_parse_override(item) for item in overrides]
    for layer in layers:
        table = _merge(table, layer)
        explicit |= set(_dotted_keys(layer))
    table.pop("extends", None)
    table["profile"] = profile
    table["explicit_keys"] = sorted(explicit)
    # 2. validate into frozen objects
    config = _build(StudioConfig, table, prefix="")
    logger.debug("loaded config profile=%s", profile)
    return config


def config_to_dict(config: StudioConfig) -> dict[str, Any]:
    """The config as plain TOML-ready data (paths as strings, None dropped)."""
    return _plain(dataclasses.asdict(config))


def config_to_toml(config: StudioConfig) -> str:
    """The resolved config as TOML text (what is written beside a run's outputs)."""
    return tomli_w.dumps(config_to_dict(config))


def config_from_dict(table: Mapping[str, Any]) -> StudioConfig:
    """A config from ``config_to_dict`` data (e.g. a recipe's), validated like a profile."""
    return _build(StudioConfig, table, prefix="")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _dotted_keys(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"draft": {"steps": 9}}`` → ``["draft.steps"]``."""
    keys = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            keys += _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _profile_file(folder: Path, profile: str) -> Path:
    path = folder / f"{profile}.toml"
    if not _is_profile(path) or not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.toml") if _is_profile(p))
        raise ConfigError(
            f"Unknown profile {profile!r}; known profiles: {', '.join(known)}.",
            fix=f"use --profile with one of those ({PROFILES_NOTE}).",
        )
    return path


def _is_profile(path: Path) -> bool:
    """Profiles are the configs/*.toml files other than the model catalogue and training configs."""
    return path.stem != "models" and not path.stem.startswith("train_")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as err:
        raise ConfigError(f"Config file {path} does not exist.", fix="check the path.") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Config file {path} is not valid TOML: {err}.", fix="correct the syntax.") from err


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"Override {item!r} is not of the form section.key=value.", fix="e.g. --set draft.steps=20."
        )
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is a string: --set draft.sampler=Euler
    table: dict[str, Any] = {}
    node = table
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return table


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"Config key {prefix.rstrip('.')} must be a table, got {table!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown config key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(fields))}.",
            fix="correct the spelling or remove it.",
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name in table:
            values[name] = _convert(table[name], hints[name], spec, f"{prefix}{name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                values[name] = _build(hints[name], {}, f"{prefix}{name}.")
            else:
                raise ConfigError(f"Config key {prefix}{name} is required.", fix="set it in the profile.")
    return cls(**values)


def _convert(value: Any, hint: Any, spec: dataclasses.Field, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    origin, args = get_origin(hint), get_args(hint)
    if origin in (types.UnionType, typing.Union):  # X | None
        inner = next(a for a in args if a is not type(None))
        return None if value in (None, "") else _convert(value, inner, spec, key)
    if origin is Literal:
        return value  # checked with the ranges, by check_fields in the section's __post_init__
    if origin is tuple:
        if not isinstance(value, list | tuple):
            _bad(key, value, "a list")
        return tuple(_convert(v, args[0], spec, key) for v in value)
    return _scalar(value, hint, spec, key)


def _scalar(value: Any, hint: Any, spec: dataclasses.Field, key: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            _bad(key, value, "true or false")
        return value
    if hint in (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (hint is int and not float(value).is_integer()):
            _bad(key, value, "an integer" if hint is int else "a number")
        return hint(value)
    if hint is Path:
        if not isinstance(value, str):
            _bad(key, value, "a path string")
        return Path(os.path.expandvars(value)).expanduser()
    if not isinstance(value, str):
        _bad(key, value, "a string")
    return value


def _bad(key: str, value: Any, allowed: str) -> typing.NoReturn:
    if key.startswith("--"):  # a request option (studio.request), not a config key
        raise InputError(
            f"{key} {value!r} is not allowed: use {allowed}.", fix=f"pass {key} with such a value."
        )
    raise ConfigError(
        f"Config key {key} has value {value!r}; allowed: {allowed}.",
        fix=f"change it in the profile or pass --set {key}=<value>.",
    )
