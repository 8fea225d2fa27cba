"""IP-Adapter-FaceID (SD 1.5): the public ``h94/IP-Adapter-FaceID`` weights, attached per request.

The public file ``ip-adapter-faceid_sd15.bin`` is a torch pickle. It is read once, tensors only
(``torch.load(weights_only=True)``), checked, and rewritten as safetensors in diffusers' IP-Adapter
layout (``image_proj.<key>`` / ``ip_adapter.<key>``); every later load reads the safetensors file.

Usage::

    weights = ensure_converted(bin_path, cache_dir)      # once; re-converted when the .bin changes
    load_faceid(pipe, weights, scale=0.8)                # IP branch + the LoRA inside the file
    pipe(prompt, ip_adapter_image_embeds=faceid_embeds(embedding, batch=1, cfg=True,
                                                       dtype=pipe.unet.dtype, device=pipe.device))
    unload_faceid(pipe)                                  # the UNet is the base model again

The file carries a LoRA on every UNet attention layer as well as the IP branch; diffusers loads it as
the peft adapter ``FACEID_LORA`` at weight 1.0, as the public model is meant to run. ``scale`` only
scales the IP branch (so scale 0 = the base model plus that LoRA). While FaceID is loaded, any
``set_adapters`` call must keep ``FACEID_LORA`` active (see ``faceid_adapter_weights``).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from diffusers.utils import USE_PEFT_BACKEND
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open

from studio.errors import AdapterError, InputError, ModelNotFoundError, UnsafeFileError
from studio.files import sha256_file, write_bytes_atomic
from studio.models.weights import safetensors_bytes

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]  # tensor name -> tensor
Embedding = npt.NDArray[np.float32]  # (512,) float32 L2-normed insightface normed_embedding

FACEID_LORA = "faceid_0"  # the peft adapter name diffusers gives the LoRA of the first IP-Adapter
EMBED_DIM = 512
SOURCE_SHA_KEY = "source_sha256"  # safetensors metadata: sha256 of the .bin it was converted from
_NORM_TOLERANCE = 1e-2
_PROJ_KEYS = frozenset(
    {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}
)
# original IP-Adapter numbering: one index per UNet attention processor (see studio/models/tiny/ipadapter.py)
_IP_KEY = re.compile(r"(\d+)\.(to_k_ip|to_v_ip|to_(?:q|k|v|out)_lora\.(?:down|up))\.weight")
_LORA_COMPONENTS = ("unet", "text_encoder")


# ---------------------------------------------------------------- conversion


def convert_faceid_weights(src: Path, dst: Path) -> Path:
    """Convert a public ``ip-adapter-faceid*.bin`` into a checked safetensors file at ``dst``."""
    return _convert(Path(src), Path(dst), sha256_file(src))


def ensure_converted(src: Path, cache_dir: Path) -> Path:
    """``cache_dir/<src stem>.safetensors``, converted on first use and again whenever ``src`` changes."""
    src = Path(src)
    if not src.is_file():
        raise ModelNotFoundError(f"IP-Adapter-FaceID file {src} does not exist.", fix="pull it first.")
    dst = Path(cache_dir) / f"{src.stem}.safetensors"
    sha = sha256_file(src)
    if _converted_from(dst) == sha:
        return dst
    return _convert(src, dst, sha)


def _convert(src: Path, dst: Path, sha: str) -> Path:
    # 1. tensors only: a file that needs anything more is refused, never unpickled
    state = _load_weights_only(src)
    # 2. the structure of IP-Adapter-FaceID, flattened to diffusers' safetensors key prefixes
    flat = _normalize_faceid(state, src)
    # 3. atomic write, with the source checksum that ensure_converted compares against
    data = safetensors_bytes(flat, {"format": "pt", SOURCE_SHA_KEY: sha})
    write_bytes_atomic(dst, data)
    logger.info("converted %s -> %s (%d tensors)", src.name, dst, len(flat))
    return dst


def _converted_from(path: Path) -> str | None:
    """The source sha256 recorded in a converted file; None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(SOURCE_SHA_KEY)
    except (SafetensorError, OSError):
        return None


def _load_weights_only(src: Path) -> Any:
    if not src.is_file():
        raise ModelNotFoundError(f"IP-Adapter-FaceID file {src} does not exist.", fix="pull it first.")
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UnsafeFileError(
            f"{src.name} holds objects other than tensors and weights-only loading refused it ({reason}); "
            "it was not unpickled.",
            fix="use the original file from h94/IP-Adapter-FaceID, or a .safetensors export of it.",
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise AdapterError(
            f"{src.name} is not a readable torch weights file ({err}).", fix="download it again."
        ) from err


def _normalize_faceid(state: Any, src: Path) -> StateDict:
    """Check the public layout ({"image_proj": MLPProjModel, "ip_adapter": layers}); flatten with prefixes."""
    expected = "a dict {'image_proj': {...}, 'ip_adapter': {...}} of tensors (IP-Adapter-FaceID, not Plus)"
    if not isinstance(state, dict) or set(state) != {"image_proj", "ip_adapter"}:
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise AdapterError(f"{src.name} has top-level {keys}; expected {expected}.", fix=_FIX_FILE)
    for group in ("image_proj", "ip_adapter"):
        tensors = state[group]
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterError(f"{src.name}: {group!r} is not a dict of tensors; expected {expected}.")
        bad = [k for k, v in tensors.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
        if bad:
            raise AdapterError(f"{src.name}: {group} tensors {bad[:3]} are not finite floats.", fix=_FIX_FILE)
    _check_image_proj(state["image_proj"], src)
    _check_ip_layers(state["ip_adapter"], int(state["image_proj"]["norm.weight"].shape[0]), src)
    # flat keys are split back by prefix in diffusers' IPAdapterMixin.load_ip_adapter (.safetensors branch)
    return {
        f"{group}.{key}": value.detach().clone().contiguous()  # clone: safetensors refuses shared storage
        for group in ("image_proj", "ip_adapter")
        for key, value in sorted(state[group].items())
    }


_FIX_FILE = (
    "use ip-adapter-faceid_sd15.bin from h94/IP-Adapter-FaceID (FaceID Plus / Portrait are other formats)."
)


def _check_image_proj(proj: StateDict, src: Path) -> None:
    """MLPProjModel: proj.0 [hidden, 512], proj.2 [tokens * cross, hidden], norm [cross]."""
    if set(proj) != _PROJ_KEYS:
        kind = (
            "FaceID Plus" if any(k.startswith("perceiver_resampler.") for k in proj) else "another IP-Adapter"
        )
        raise AdapterError(
            f"{src.name}: image_proj keys {sorted(proj)[:6]} look like {kind}; "
            f"expected exactly {sorted(_PROJ_KEYS)} (IP-Adapter-FaceID).",
            fix=_FIX_FILE,
        )
    hidden, embed = proj["proj.0.weight"].shape
    cross = proj["norm.weight"].shape[0]
    out = proj["proj.2.weight"].shape[0]
    if embed != EMBED_DIM or proj["proj.2.weight"].shape[1] != hidden or out % cross or hidden % embed:
        raise AdapterError(
            f"{src.name}: image_proj shapes proj.0 {tuple(proj['proj.0.weight'].shape)}, proj.2 "
            f"{tuple(proj['proj.2.weight'].shape)}, norm ({cross},) do not chain from a {EMBED_DIM}-d face "
            "embedding to tokens of the norm width.",
            fix=_FIX_FILE,
        )


def _check_ip_layers(layers: StateDict, cross: int, src: Path) -> None:
    """Every key is ``<i>.to_k_ip`` / ``to_v_ip`` / a LoRA half; k/v come in pairs reading ``cross``."""
    unknown = [k for k in layers if not _IP_KEY.fullmatch(k)]
    if unknown:
        raise AdapterError(f"{src.name}: unexpected ip_adapter keys {sorted(unknown)[:3]}.", fix=_FIX_FILE)
    ids_k = {k.split(".")[0] for k in layers if k.endswith(".to_k_ip.weight")}
    ids_v = {k.split(".")[0] for k in layers if k.endswith(".to_v_ip.weight")}
    if not ids_k or ids_k != ids_v:
        raise AdapterError(f"{src.name}: ip_adapter has no matching to_k_ip/to_v_ip pairs.", fix=_FIX_FILE)
    widths = {int(layers[f"{i}.to_k_ip.weight"].shape[1]) for i in ids_k}
    if widths != {cross}:
        raise AdapterError(
            f"{src.name}: to_k_ip reads widths {sorted(widths)} but image tokens are {cross} wide.",
            fix=_FIX_FILE,
        )


# ---------------------------------------------------------------- attach / detach


def load_faceid(pipe: Any, weights: Path, *, scale: float) -> None:
    """Attach converted FaceID weights (IP branch + its LoRA) to an SD 1.5 pipeline; keeps other LoRAs."""
    weights = Path(weights)
    # 1. check inputs: converted safetensors that fit this UNet
    _check_scale(scale)
    if weights.suffix != ".safetensors":
        raise UnsafeFileError(
            f"{weights.name} is not a safetensors file.", fix="convert it first with ensure_converted()."
        )
    has_lora = _check_fits(pipe.unet, weights)
    if has_lora and not USE_PEFT_BACKEND:
        raise AdapterError(
            "IP-Adapter-FaceID carries a LoRA and diffusers' peft backend is not available.",
            fix="install peft.",
        )
    # 2. replace any IP-Adapter already attached (diffusers would keep a stale FaceID LoRA otherwise)
    unload_faceid(pipe)
    active = _active_adapters(pipe)
    # 3. diffusers loads the IP branch and, through peft, the LoRA as FACEID_LORA; no CLIP image encoder
    try:
        pipe.load_ip_adapter(
            str(weights.parent), subfolder="", weight_name=weights.name, image_encoder_folder=None
        )
    except (ValueError, KeyError, RuntimeError) as err:
        unload_faceid(pipe)  # no half-attached adapter is left behind
        raise AdapterError(
            f"{weights.name} could not be attached to this UNet ({err}).",
            fix="delete the converted file and convert the original .bin again.",
        ) from err
    # 4. diffusers activated FACEID_LORA alone: bring back the LoRAs that were active (their weights kept)
    if has_lora:
        _set_active(pipe, {**active, "unet": [*active.get("unet", []), FACEID_LORA]})
    pipe.set_ip_adapter_scale(float(scale))
    logger.info("IP-Adapter-FaceID attached from %s (scale %.2f)", weights, scale)


def set_faceid_scale(pipe: Any, scale: float) -> None:
    """Change the IP branch's strength of an attached FaceID (0 = no identity; the LoRA stays)."""
    _check_scale(scale)
    pipe.set_ip_adapter_scale(float(scale))


def unload_faceid(pipe: Any) -> None:
    """Detach FaceID (IP branch and its LoRA); other LoRAs keep their state. No-op when none is attached."""
    active = _active_adapters(pipe)
    if faceid_loaded(pipe):
        pipe.unload_ip_adapter()
    if FACEID_LORA in getattr(pipe.unet, "peft_config", {}):
        with warnings.catch_warnings():  # peft's "setting active adapter to <other>" is undone below
            warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
            pipe.unet.delete_adapters(FACEID_LORA)
        # peft activates some other adapter when the deleted one was the only active one: undo that
        _set_active(pipe, {name: [a for a in names if a != FACEID_LORA] for name, names in active.items()})


@dataclass(eq=False)
class ParkedFaceID:
    """An attached FaceID taken out of the UNet's forward with its weights kept (see ``park_faceid``)."""

    processors: dict[str, Any]  # every attention processor as it was, the IP ones with their weights
    projection: Any  # the UNet's image projection (``encoder_hid_proj``)


def park_faceid(pipe: Any) -> ParkedFaceID | None:
    """Make the UNet the base model again without discarding FaceID: plain attention processors where the
    IP ones were, no image projection. Its LoRA stays resident, inactive unless a request activates it.
    ``restore_faceid`` puts it back in microseconds where a reload takes seconds. None: nothing attached."""
    if not faceid_loaded(pipe):
        return None
    unet = pipe.unet
    parked = ParkedFaceID(dict(unet.attn_processors), unet.encoder_hid_proj)
    plain = {name: AttnProcessor2_0() if isinstance(processor, IPAdapterAttnProcessor2_0) else processor
             for name, processor in parked.processors.items()}  # fmt: skip
    unet.set_attn_processor(plain)
    unet.encoder_hid_proj = None  # as diffusers' unload_ip_adapter leaves it
    unet.config.encoder_hid_dim_type = None
    return parked


def restore_faceid(pipe: Any, parked: ParkedFaceID, *, scale: float) -> None:
    """Put a parked FaceID back on the UNet it was parked from, at ``scale``."""
    _check_scale(scale)
    unet = pipe.unet
    unet.set_attn_processor(dict(parked.processors))
    unet.encoder_hid_proj = parked.projection
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    set_faceid_scale(pipe, scale)


def faceid_loaded(pipe: Any) -> bool:
    """Whether an IP-Adapter is attached to the pipeline's UNet."""
    return isinstance(getattr(pipe.unet, "encoder_hid_proj", None), MultiIPAdapterImageProjection)


def faceid_adapter_weights(pipe: Any) -> dict[str, float]:
    """{FACEID_LORA: 1.0} while FaceID's LoRA is on the UNet: merge it into every ``set_adapters`` call."""
    return {FACEID_LORA: 1.0} if FACEID_LORA in getattr(pipe.unet, "peft_config", {}) else {}


def faceid_embeds(
    embedding: Embedding, *, batch: int, cfg: bool, dtype: torch.dtype, device: torch.device | str
) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` for one identity: [[2B, 1, 512]] (zeros; it) if cfg, else [[B, 1, 512]].

    ``batch`` (B) is the number of prompts passed to the pipeline (diffusers itself repeats the
    embeds ``num_images_per_prompt`` times).
    """
    vector = _normalize_embedding(embedding)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"FaceID batch must be a positive int, got {batch!r}.")
    positive = torch.from_numpy(vector).expand(batch, 1, EMBED_DIM)  # [batch, 1 image, 512]
    if cfg:
        # diffusers splits precomputed embeds with chunk(2) into (negative, positive); the negative is the
        # zero embedding, as IP-Adapter-FaceID's own pipeline and the diffusers docs use
        positive = torch.cat([torch.zeros_like(positive), positive])  # [2*batch, 1, 512]
    return [positive.to(device=device, dtype=dtype).contiguous()]


# ---------------------------------------------------------------- helpers


def _check_scale(scale: float) -> None:
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale < 0
    ):
        raise InputError(
            f"FaceID scale must be a finite number >= 0, got {scale!r}.", fix="use e.g. 0.5 to 1.0."
        )


def _normalize_embedding(embedding: Embedding) -> npt.NDArray[np.float32]:
    """A (512,) float32 copy of a finite, L2-normed embedding; InputError otherwise."""
    array = np.asarray(embedding)
    if array.shape != (EMBED_DIM,) or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            f"FaceID embedding has shape {array.shape} dtype {array.dtype}; expected ({EMBED_DIM},) float.",
            fix="pass an insightface normed_embedding (ArcFace, 512-d).",
        )
    vector = array.astype(np.float32)
    norm = float(np.linalg.norm(vector)) if np.isfinite(vector).all() else math.nan
    if not abs(norm - 1.0) <= _NORM_TOLERANCE:
        raise InputError(
            f"FaceID embedding has L2 norm {norm:.4f}; expected 1 (±{_NORM_TOLERANCE}).",
            fix="use insightface's normed_embedding, not embedding.",
        )
    return vector


def _check_fits(unet: Any, weights: Path) -> bool:
    """AdapterError unless the file's widths and layer count fit ``unet``; returns whether it has a LoRA."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
            cross = (
                handle.get_slice("image_proj.norm.weight").get_shape()[0]
                if ("image_proj.norm.weight" in keys)
                else None
            )
    except (SafetensorError, OSError) as err:
        raise AdapterError(
            f"{weights} is not a readable safetensors file ({err}).",
            fix="delete it; ensure_converted() writes it again.",
        ) from err
    layers = sum(key.endswith(".to_k_ip.weight") for key in keys)
    expected = sum(name.endswith("attn2.processor") for name in unet.attn_processors)
    width = unet.config.cross_attention_dim
    if cross != width or layers != expected:
        raise AdapterError(
            f"{weights.name} is an IP-Adapter-FaceID for {layers} cross-attention layers of width {cross}; "
            f"this UNet has {expected} of width {width}.",
            fix="use the FaceID file made for this base model family (sd15 vs sdxl).",
        )
    return any("_lora." in key for key in keys)


def _active_adapters(pipe: Any) -> dict[str, list[str]]:
    """Active peft adapters per LoRA-loadable component with peft layers ([] where LoRAs are disabled)."""
    active: dict[str, list[str]] = {}
    for name in _LORA_COMPONENTS:
        layer = _first_tuner_layer(getattr(pipe, name, None))
        if layer is not None:
            active[name] = [] if layer.disable_adapters else list(layer.active_adapters)
    return active


def _set_active(pipe: Any, active: dict[str, list[str]]) -> None:
    """Enable LoRA layers and activate exactly ``active`` per component, keeping adapter weights.

    diffusers' ``set_adapters`` would reset every weight to 1.0; peft's per-layer ``set_adapter`` keeps
    them. A ``disable_lora()`` state was read as "none active", so enabling here changes no output.
    """
    for name, names in active.items():
        model = getattr(pipe, name, None)
        for module in model.modules() if model is not None else ():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(True)
                module.set_adapter(names)


def _first_tuner_layer(model: torch.nn.Module | None) -> BaseTunerLayer | None:
    if model is None:
        return None
    return next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
