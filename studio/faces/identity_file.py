"""The identity file format: safetensors tensors + string metadata, validated on every load.

Tensors: ``embedding`` (512,) float32 L2-normed, ``photo_embeddings`` (K, 512) float32, optional
``face_tokens`` (K, T, C) float32. Metadata (strings): format, version, name, consent, recognizer_sha256,
source_sha256 (JSON list, one per photo), created, revoked ("" or ISO time); version 2 adds the consent's
scope (JSON list of purposes), expires ("" or an ISO date), evidence_sha256 and granted_by. Version 1 files
are still read (their consent has no scope: any purpose, no expiry). Pickles are never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from studio.errors import IdentityError
from studio.models.weights import safetensors_bytes, safetensors_metadata
from studio.types import Identity

ADD_HINT = "enrol the person with `studio identity add NAME PHOTO... --consent TEXT`"
IDENTITY_FORMAT = "portrait-studio-identity"
IDENTITY_VERSION = "2"
_READABLE_VERSIONS = ("1", "2")
_METADATA_KEYS = ("name", "consent", "recognizer_sha256", "source_sha256", "created", "revoked")
_NORM_TOLERANCE = 1e-3
EMBEDDING_SIZE = 512  # ArcFace's width, as studio.faces.detect's (kept here: this module needs no detector)
MAX_FILE_BYTES = 64 << 20  # 64 MiB is ~30 000 photo rows: anything larger is not an identity file


def serialize_identity(identity: Identity) -> bytes:
    """The safetensors bytes of an identity file: two or three float32 tensors and string metadata."""
    tensors = {
        "embedding": np.ascontiguousarray(identity.embedding, dtype=np.float32),  # (512,)
        "photo_embeddings": np.ascontiguousarray(identity.photo_embeddings, dtype=np.float32),  # (K, 512)
    }
    if identity.face_tokens is not None:
        tensors["face_tokens"] = np.ascontiguousarray(identity.face_tokens, dtype=np.float32)  # (K, T, C)
    metadata = {
        "format": IDENTITY_FORMAT,
        "version": IDENTITY_VERSION,
        "name": identity.name,
        "consent": identity.consent,
        "recognizer_sha256": identity.recognizer_sha256,
        "source_sha256": json.dumps(list(identity.source_sha256)),
        "created": identity.created,
        "revoked": identity.revoked or "",
        "scope": json.dumps(list(identity.scope)),
        "expires": identity.expires or "",
        "evidence_sha256": identity.evidence_sha256,
        "granted_by": identity.granted_by,
    }
    return safetensors_bytes(tensors, metadata)


def bad_identity_file(path: Path, problem: str) -> IdentityError:
    """IdentityError for a damaged or foreign identity file."""
    return IdentityError(f"Identity file {path} is invalid: {problem}.", fix=f"remove it and {ADD_HINT}.")


def parse_identity_file(path: Path, name: str, data: bytes) -> Identity:
    """Validate an identity file's bytes: format, metadata, shapes, dtype, finiteness, unit norms."""
    # 1. container and metadata
    meta = _read_metadata(path, data)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, TypeError) as err:
        raise bad_identity_file(path, f"not a readable safetensors file ({err})") from err
    if meta["name"] != name:
        raise bad_identity_file(path, f"it holds identity {meta['name']!r}, not {name!r} (renamed file?)")
    if not meta["consent"].strip():
        raise bad_identity_file(path, "its consent record is empty")
    try:
        sources = json.loads(meta["source_sha256"])
    except json.JSONDecodeError:
        sources = None
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise bad_identity_file(
            path, f"source_sha256 {meta['source_sha256'][:80]!r} is not a JSON list of strings"
        )
    # 2. tensors: (512,) and (K, 512) float32, finite, unit rows; one checksum per row
    embedding = _checked_tensor(path, tensors, "embedding", ndim=1)
    photos = _checked_tensor(path, tensors, "photo_embeddings", ndim=2)
    if len(photos) == 0 or len(photos) != len(sources):
        raise bad_identity_file(path, f"{len(photos)} photo embeddings but {len(sources)} photo checksums")
    face_tokens = _checked_tokens(path, tensors.get("face_tokens"), len(photos))
    return Identity(
        name=name,
        embedding=embedding,
        photo_embeddings=photos,
        consent=meta["consent"],
        recognizer_sha256=meta["recognizer_sha256"],
        source_sha256=tuple(sources),
        created=meta["created"],
        revoked=meta["revoked"] or None,
        face_tokens=face_tokens,
        **_consent_terms(path, meta),
    )


def _consent_terms(path: Path, meta: dict[str, str]) -> dict[str, object]:
    """Version 2's consent terms (scope, expiry, evidence, grantor); a version 1 file has none."""
    if meta["version"] == "1":
        return {}
    try:
        scope = json.loads(meta.get("scope", "[]"))
    except json.JSONDecodeError:
        scope = None
    if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
        raise bad_identity_file(path, f"scope {meta.get('scope', '')[:80]!r} is not a JSON list of strings")
    return {
        "scope": tuple(scope),
        "expires": meta.get("expires") or None,
        "evidence_sha256": meta.get("evidence_sha256", ""),
        "granted_by": meta.get("granted_by", ""),
    }


def _read_metadata(path: Path, data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__``, checked for format, version and required keys."""
    meta = safetensors_metadata(data)
    if meta is None:
        raise bad_identity_file(path, "not a safetensors file (no readable header)")
    found = (meta.get("format"), meta.get("version"))
    if meta.get("format") != IDENTITY_FORMAT or meta.get("version") not in _READABLE_VERSIONS:
        raise bad_identity_file(
            path, f"format/version {found}, expected ({IDENTITY_FORMAT!r}, one of {_READABLE_VERSIONS})"
        )
    missing = [key for key in _METADATA_KEYS if not isinstance(meta.get(key), str)]
    if missing:
        raise bad_identity_file(path, f"metadata lacks {', '.join(missing)}")
    return meta


def _checked_tensor(
    path: Path, tensors: dict[str, np.ndarray], key: str, ndim: int
) -> npt.NDArray[np.float32]:
    """Tensor ``key``: (512,) or (K, 512) by ``ndim``, float32, finite, rows of unit L2 norm."""
    tensor = tensors.get(key)
    expected = "(512,)" if ndim == 1 else "(K, 512)"
    if tensor is None:
        raise bad_identity_file(path, f"tensor {key!r} is missing")
    if tensor.ndim != ndim or tensor.shape[-1] != EMBEDDING_SIZE:
        raise bad_identity_file(path, f"tensor {key!r} has shape {tensor.shape}, expected {expected}")
    if tensor.dtype != np.float32:
        raise bad_identity_file(path, f"tensor {key!r} has dtype {tensor.dtype}, expected float32")
    if not np.isfinite(tensor).all():
        raise bad_identity_file(path, f"tensor {key!r} holds NaN or infinite values")
    norms = np.linalg.norm(tensor.astype(np.float64), axis=-1)  # () or (K,)
    if (np.abs(norms - 1.0) > _NORM_TOLERANCE).any():
        worst = float(norms.flat[int(np.argmax(np.abs(norms - 1.0)))])
        raise bad_identity_file(
            path, f"tensor {key!r} is not L2-normed (norm {worst:.4f}, expected 1 ± 0.001)"
        )
    return tensor


def _checked_tokens(path: Path, tokens: np.ndarray | None, photos: int) -> npt.NDArray[np.float32] | None:
    """The optional ``face_tokens`` tensor: (K, T, C) float32, finite, one token set per photo."""
    if tokens is None:
        return None
    if tokens.ndim != 3 or len(tokens) != photos or 0 in tokens.shape:
        raise bad_identity_file(
            path, f"tensor 'face_tokens' has shape {tokens.shape}, expected ({photos}, T, C)"
        )
    if tokens.dtype != np.float32:
        raise bad_identity_file(path, f"tensor 'face_tokens' has dtype {tokens.dtype}, expected float32")
    if not np.isfinite(tokens).all():
        raise bad_identity_file(path, "tensor 'face_tokens' holds NaN or infinite values")
    return tokens
