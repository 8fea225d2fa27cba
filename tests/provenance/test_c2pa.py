"""C2PA Content Credentials: the local CA, signing, and the four states ``studio verify`` reports."""

from __future__ import annotations

import hashlib
import io
import logging
import stat
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.errors import ConfigError, OutputError, RuntimeSetupError
from studio.imageio import read_metadata, write_image
from studio.provenance.c2pa import (
    CA_KEY_FILE,
    COMPOSITE_WITH_TRAINED_MEDIA,
    LOCAL_FOLDER,
    SIGNER_FILE,
    SIGNER_KEY_FILE,
    TRAINED_ALGORITHMIC_MEDIA,
    ManifestFacts,
    SigningIdentity,
    check_library_path,
    local_ca_file,
    read_credentials,
    sign_png,
    signing_identity,
)

MODELS = {"checkpoint": "a" * 64, "swapper": "b" * 64, "hub-repo": ""}
IDENTITIES = {"anna": "c" * 64}
AUDIT_HEAD = "d" * 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("studio-data")


@pytest.fixture(scope="module")
def identity(data_dir: Path) -> SigningIdentity:
    return signing_identity(None, None, data_dir)


@pytest.fixture(scope="module")
def anchors(identity: SigningIdentity, data_dir: Path) -> bytes:
    return local_ca_file(data_dir).read_bytes()


def _png(tmp_path: Path, seed: int = 0, size: tuple[int, int] = (48, 32)) -> bytes:
    """A PNG as the studio writes it: A1111 parameters tEXt and the recipe iTXt chunk."""
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)  # HxWx3 BGR
    path = write_image(
        tmp_path / f"draft-{seed}.png", image, parameters="a portrait\nSteps: 4, Seed: 1", recipe={"id": "r"}
    )
    return path.read_bytes()


def _facts(**changes: object) -> ManifestFacts:
    base = {"title": "out.png", "edited": False, "models": MODELS, "recipe_id": "recipe-1"}
    return ManifestFacts(**{**base, "audit_head": AUDIT_HEAD, "identities": IDENTITIES, **changes})


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append((data[at + 4 : at + 8], data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def _assemble(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


def test_local_ca_is_created_private_once_and_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="studio.provenance.c2pa"):
        first = signing_identity(None, None, tmp_path)
    folder = tmp_path / LOCAL_FOLDER
    assert first.local and first.source == str(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in (SIGNER_KEY_FILE, CA_KEY_FILE):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert "untrusted" in caplog.text
    assert signing_identity(None, None, tmp_path) == first  # reused, not re-created
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCAL_FOLDER]  # no temp folder left


def test_racing_processes_share_one_local_ca(tmp_path: Path) -> None:
    with ThreadPoolExecutor(6) as pool:
        identities = list(pool.map(lambda _: signing_identity(None, None, tmp_path), range(6)))
    assert len({i.key_pem for i in identities}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCAL_FOLDER]


def test_signed_png_is_valid_untrusted_with_our_assertion(tmp_path: Path, identity: SigningIdentity) -> None:
    signed = sign_png(_png(tmp_path), _facts(), identity)
    credentials = read_credentials(signed)
    assert credentials.state == "valid-untrusted", credentials.reason
    assert "local CA" in credentials.reason
    manifest = credentials.manifest
    assert manifest is not None
    assert manifest["recipe"] == {
        "recipe_id": "recipe-1",
        "models": MODELS,
        "audit_head": AUDIT_HEAD,
        "identities": IDENTITIES,
    }
    assert [a["action"] for a in manifest["actions"]] == ["c2pa.created"]
    assert manifest["actions"][0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert manifest["signer"]["common_name"] == "Portrait Studio local signer"
    # the text chunks written before signing survive it
    (tmp_path / "signed.png").write_bytes(signed)
    metadata = read_metadata(tmp_path / "signed.png")
    assert metadata.parameters == "a portrait\nSteps: 4, Seed: 1" and metadata.recipe == {"id": "r"}


def test_local_root_as_trust_anchor_makes_it_trusted(
    tmp_path: Path, identity: SigningIdentity, anchors: bytes
) -> None:
    credentials = read_credentials(sign_png(_png(tmp_path), _facts(), identity), anchors)
    assert credentials.state == "trusted", credentials.reason


def test_one_flipped_pixel_byte_is_invalid(tmp_path: Path, identity: SigningIdentity) -> None:
    signed = sign_png(_png(tmp_path), _facts(), identity)
    chunks = _chunks(signed)
    index = next(i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT")
    raw = bytearray(zlib.decompress(chunks[index][1]))
    raw[-1] ^= 0x01  # the last pixel byte: whatever the row filters, no other byte decodes from it
    chunks[index] = (b"IDAT", zlib.compress(bytes(raw)))
    tampered = _assemble(chunks)
    before = np.asarray(Image.open(io.BytesIO(signed)))
    after = np.asarray(Image.open(io.BytesIO(tampered)))  # still a decodable PNG
    assert np.count_nonzero(before != after) == 1
    credentials = read_credentials(tampered)
    assert credentials.state == "invalid"
    assert "assertion.dataHash.mismatch" in credentials.reason


def test_a_text_chunk_added_after_signing_is_invalid(tmp_path: Path, identity: SigningIdentity) -> None:
    chunks = _chunks(sign_png(_png(tmp_path), _facts(), identity))
    chunks.insert(-1, (b"tEXt", b"Comment\x00added later"))
    assert read_credentials(_assemble(chunks)).state == "invalid"


def test_unsigned_png_is_absent(tmp_path: Path) -> None:
    credentials = read_credentials(_png(tmp_path))
    assert credentials.state == "absent" and credentials.manifest is None


def test_edited_image_names_its_parent(tmp_path: Path, identity: SigningIdentity, anchors: bytes) -> None:
    parent = sign_png(_png(tmp_path, seed=1), _facts(title="draft.png"), identity)
    facts = _facts(title="refaced.png", edited=True, parent=parent, recipe_id="recipe-2")
    credentials = read_credentials(sign_png(_png(tmp_path, seed=2), facts, identity), anchors)
    assert credentials.state == "trusted", credentials.reason
    manifest = credentials.manifest
    assert manifest is not None
    (ingredient,) = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["format"] == "image/png"
    assert "active_manifest" in ingredient  # the draft's own credentials travel with it
    actions = manifest["actions"]
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.edited"]
    assert actions[1]["digitalSourceType"] == COMPOSITE_WITH_TRAINED_MEDIA
    assert manifest["recipe"]["parent_sha256"] == hashlib.sha256(parent).hexdigest()


def test_refined_without_a_parent_file_is_created_then_edited(
    tmp_path: Path, identity: SigningIdentity
) -> None:
    credentials = read_credentials(sign_png(_png(tmp_path), _facts(edited=True), identity))
    assert credentials.state == "valid-untrusted", credentials.reason
    assert credentials.manifest is not None
    assert [a["action"] for a in credentials.manifest["actions"]] == ["c2pa.created", "c2pa.edited"]


def test_no_thumbnail_is_embedded(tmp_path: Path, identity: SigningIdentity) -> None:
    unsigned = _png(tmp_path)
    parent = sign_png(_png(tmp_path, seed=3), _facts(), identity)
    signed = sign_png(unsigned, _facts(edited=True, parent=parent), identity)
    manifest = read_credentials(signed).manifest
    assert manifest is not None and manifest["thumbnails"] == []
    assert b"c2pa.thumbnail" not in signed
    assert len(parent) - len(unsigned) < 6000  # a few KB: claim, signature, certificate


def test_identities_must_be_hashes(tmp_path: Path, identity: SigningIdentity) -> None:
    with pytest.raises(ValueError, match="sha256"):
        sign_png(_png(tmp_path), _facts(identities={"anna": "embedding:0.1,0.2"}), identity)


def test_configured_key_and_chain(tmp_path: Path, anchors: bytes) -> None:
    from cryptography.hazmat.primitives import serialization

    signing_identity(None, None, tmp_path / "outside")  # another CA stands in for a real one
    folder = tmp_path / "outside" / LOCAL_FOLDER
    key = serialization.load_pem_private_key((folder / SIGNER_KEY_FILE).read_bytes(), password=None)
    sec1 = key.private_bytes(  # "BEGIN EC PRIVATE KEY", as openssl ecparam writes it
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (tmp_path / "key.pem").write_bytes(sec1)
    configured = signing_identity(tmp_path / "key.pem", folder / SIGNER_FILE, tmp_path / "data")
    assert not configured.local and str(tmp_path / "key.pem") in configured.source
    assert not (tmp_path / "data").exists()  # a configured identity creates no local CA
    signed = sign_png(_png(tmp_path), _facts(), configured)
    assert read_credentials(signed, local_ca_file(tmp_path / "outside").read_bytes()).state == "trusted"
    assert read_credentials(signed, anchors).state == "valid-untrusted"  # another root


def test_key_without_chain_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"provenance\.signing_chain"):
        signing_identity(tmp_path / "key.pem", None, tmp_path)
    with pytest.raises(ConfigError, match=r"provenance\.signing_key"):
        signing_identity(None, tmp_path / "chain.pem", tmp_path)


def test_unreadable_or_mismatched_files_are_config_errors(tmp_path: Path, data_dir: Path) -> None:
    folder = data_dir / LOCAL_FOLDER
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        signing_identity(tmp_path / "missing.pem", folder / SIGNER_FILE, tmp_path)
    other = signing_identity(None, None, tmp_path / "other")
    (tmp_path / "other-key.pem").write_bytes(other.key_pem)
    with pytest.raises(ConfigError, match="not the signing key's certificate"):
        signing_identity(tmp_path / "other-key.pem", folder / SIGNER_FILE, tmp_path)


def test_garbage_is_invalid_not_a_crash() -> None:
    assert read_credentials(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).state == "invalid"


def test_a_planted_native_library_is_refused(tmp_path: Path) -> None:
    check_library_path(tmp_path)
    (tmp_path / "libs" / "x86_64-unknown-linux-gnu").mkdir(parents=True)
    (tmp_path / "libs" / "x86_64-unknown-linux-gnu" / "libc2pa_c.so").write_bytes(b"")
    with pytest.raises(RuntimeSetupError, match=r"libc2pa_c\.so"):
        check_library_path(tmp_path)


def test_a_broken_parent_is_reported_but_the_child_stays_valid(
    tmp_path: Path, identity: SigningIdentity
) -> None:
    chunks = _chunks(sign_png(_png(tmp_path, seed=4), _facts(), identity))
    chunks.insert(-1, (b"tEXt", b"Comment\x00edited after signing"))
    broken_parent = _assemble(chunks)
    child = sign_png(_png(tmp_path, seed=5), _facts(edited=True, parent=broken_parent), identity)
    credentials = read_credentials(child)
    assert credentials.state == "valid-untrusted"  # the child's own signature and hashes hold
    assert credentials.manifest is not None
    assert credentials.manifest["ingredients"][0]["failures"] == ["assertion.dataHash.mismatch"]
    assert "recorded with broken credentials" in credentials.reason


def test_bad_trust_anchors_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trust anchors"):
        read_credentials(_png(tmp_path), b"not a certificate")


def test_importing_the_module_stays_light() -> None:
    code = "import sys, studio.provenance.c2pa; print(sorted({'c2pa', 'cryptography'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_draft_from_an_input_image_is_created_with_an_input(
    tmp_path: Path, identity: SigningIdentity
) -> None:
    signed = sign_png(_png(tmp_path), _facts(parent=_png(tmp_path, seed=6)), identity)
    manifest = read_credentials(signed).manifest
    assert manifest is not None and [a["action"] for a in manifest["actions"]] == ["c2pa.created"]
    assert manifest["ingredients"][0]["relationship"] == "inputTo"


def test_an_unreadable_parent_is_an_output_error(tmp_path: Path, identity: SigningIdentity) -> None:
    with pytest.raises(OutputError, match=r"out\.png"):
        sign_png(_png(tmp_path), _facts(edited=True, parent=b"\x89PNG\r\n\x1a\nbroken"), identity)
