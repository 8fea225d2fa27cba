"""C2PA Content Credentials: sign every PNG the studio writes, read them back for ``studio verify``.

A draft gets a ``c2pa.created`` action (trainedAlgorithmicMedia); a refined or re-faced image a
``c2pa.edited`` action (compositeWithTrainedAlgorithmicMedia) with its source image as the parent
ingredient. Our assertion ``org.portrait-studio.recipe`` holds the recipe id, model sha256s, the audit log
head and identity file digests: hashes only, never an image or an embedding. No thumbnail, no network.

The signature covers every byte of the PNG but its own ``caBX`` chunk: the ``parameters`` and recipe
chunks are written before signing, and any later change (one pixel, one text chunk) makes it invalid.
Without ``provenance.signing_key``/``signing_chain``, a local CA made on first use in
``<provenance.data_dir>/c2pa`` signs: such credentials validate as untrusted unless a reader trusts its
``ca.pem``. c2pa-python and cryptography are imported lazily: ``import studio`` stays light.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from studio._version import __version__
from studio.errors import ConfigError, OutputError, RuntimeSetupError
from studio.files import atomic_writer

logger = logging.getLogger(__name__)

CredentialState = Literal["trusted", "valid-untrusted", "invalid", "absent"]

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE_WITH_TRAINED_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
)
RECIPE_ASSERTION = "org.portrait-studio.recipe"
LOCAL_FOLDER = "c2pa"  # under provenance.data_dir
CA_FILE, CA_KEY_FILE, SIGNER_FILE, SIGNER_KEY_FILE = "ca.pem", "ca-key.pem", "signer.pem", "signer-key.pem"
LOCAL_ORG = "Portrait Studio (local)"

_CA_DAYS, _SIGNER_DAYS = 20 * 365, 10 * 365  # no timestamp authority: a signature fails once its cert expires
_UNTRUSTED_CODES = frozenset({"signingCredential.untrusted"})  # "no trust anchor", not "tampered"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NO_NETWORK = {"remote_manifest_fetch": False, "ocsp_fetch": False}
_CERT_FIX = (
    "use a key with its certificate chain (signing certificate first; digitalSignature key usage, an "
    "EKU such as emailProtection, not a CA, issued by a CA), or unset provenance.signing_key and "
    "provenance.signing_chain to sign with the studio's local CA"
)


@dataclass(frozen=True)
class SigningIdentity:
    """A PEM private key (PKCS#8) and its certificate chain (signing certificate first)."""

    key_pem: bytes
    chain_pem: bytes
    local: bool  # the studio's own local CA: credentials validate as untrusted
    source: str  # where it came from: the configured files, or the local CA folder


@dataclass(frozen=True)
class ManifestFacts:
    """What a PNG's manifest states: how it was made, from what, and which recipe made it."""

    title: str  # the file name
    edited: bool  # False: c2pa.created (a draft); True: c2pa.edited (refined or re-faced)
    models: Mapping[str, str]  # role -> sha256 ("" for a Hugging Face repo)
    recipe_id: str
    audit_head: str  # hash of the audit log's last entry
    identities: Mapping[str, str] = field(default_factory=dict)  # name -> identity file sha256
    parent: bytes | None = None  # the source image's bytes: the parentOf ingredient (no thumbnail)
    generator: str = f"portrait-studio {__version__}"
    parent_format: str = "image/png"


@dataclass(frozen=True)
class Credentials:
    """The C2PA state of one image, with the reason and the active manifest (JSON-ready)."""

    state: CredentialState
    reason: str
    manifest: Mapping[str, Any] | None


def signing_identity(key: Path | None, chain: Path | None, data_dir: Path) -> SigningIdentity:
    """The configured key and chain, or else the local CA's signing identity (created on first use)."""
    if key is None and chain is None:
        return _local_identity(Path(data_dir).expanduser())
    if key is None or chain is None:
        given, missing = (
            ("signing_key", "signing_chain") if chain is None else ("signing_chain", "signing_key")
        )
        raise ConfigError(
            f"provenance.{given} is set but provenance.{missing} is not; C2PA signing needs both.",
            fix=f"set provenance.{missing} too, or unset provenance.{given} to sign with the local CA.",
        )
    key, chain = Path(key).expanduser(), Path(chain).expanduser()
    key_pem = _read_pem(key, "provenance.signing_key")
    chain_pem = _read_pem(chain, "provenance.signing_chain")
    return _checked_identity(key_pem, chain_pem, local=False, source=f"{key} + {chain}")


def local_ca_file(data_dir: Path) -> Path:
    """The local CA's root certificate: add it to a reader's trust anchors to trust local credentials."""
    return Path(data_dir).expanduser() / LOCAL_FOLDER / CA_FILE


def sign_png(data: bytes, facts: ManifestFacts, identity: SigningIdentity) -> bytes:
    """``data`` (a complete PNG, text chunks included) with an embedded, signed C2PA manifest."""
    c2pa = _import_c2pa()

    # 1. the manifest: actions, our assertion, then the parent ingredient
    definition = _manifest_definition(facts)
    out = io.BytesIO()
    try:
        signer = c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(_signing_alg(identity.key_pem), identity.chain_pem, identity.key_pem, None)
        )
        context = c2pa.Context.from_dict(_settings())
        with context, signer, c2pa.Builder(definition, context=context) as builder:
            if facts.parent is not None:
                if facts.edited:  # c2pa-rs then adds the c2pa.opened action that names the parent
                    builder.set_intent(c2pa.C2paBuilderIntent.EDIT)
                relationship = "parentOf" if facts.edited else "inputTo"
                ingredient = {"title": _parent_title(facts), "relationship": relationship}
                builder.add_ingredient(ingredient, facts.parent_format, io.BytesIO(facts.parent))
            # 2. sign: the hash covers every byte but the manifest's own chunk
            builder.sign(signer, "image/png", io.BytesIO(data), out)
    except c2pa.C2paError.Signature as err:
        raise ConfigError(
            f"The C2PA signing credentials from {identity.source} were refused: {err}.", fix=_CERT_FIX + "."
        ) from err
    except c2pa.C2paError as err:  # e.g. a parent image c2pa-rs cannot parse
        raise OutputError(
            f"Could not sign {facts.title} with C2PA Content Credentials: {err}; nothing was written.",
            fix="check the source image; provenance.c2pa = false writes without credentials (and says so "
            "in the audit log).",
        ) from err
    signed = out.getvalue()
    logger.debug("signed %s: %d -> %d bytes", facts.title, len(data), len(signed))
    return signed


def read_credentials(data: bytes, trust_anchors_pem: bytes | None = None) -> Credentials:
    """Validate an image's C2PA manifest: trusted, valid-untrusted, invalid or absent, with the reason."""
    c2pa = _import_c2pa()
    settings = _settings(_checked_anchors(trust_anchors_pem) if trust_anchors_pem else None)
    try:
        with c2pa.Context.from_dict(settings) as context:
            reader = c2pa.Reader.try_create(io.BytesIO(data), context=context)
            if reader is None:
                return Credentials("absent", "no C2PA manifest in the file", None)
            with reader:
                state = reader.get_validation_state()
                results = reader.get_validation_results() or {}
                active = reader.get_active_manifest()
    except c2pa.C2paError as err:  # a manifest that cannot be parsed, or a file that is no image
        return Credentials("invalid", f"the C2PA data cannot be read: {err}", None)
    return _judge(state, results, active)


def _import_c2pa() -> ModuleType:
    """c2pa-python, unless its loader would take a native library from the working folder.

    Its loader looks for ``libc2pa_c.so`` in the working folder (and ``artifacts/``, ``libs/`` below it)
    before its own package: ``studio verify`` run in a downloads folder must not load a planted library.
    """
    if "c2pa" not in sys.modules:
        check_library_path(Path.cwd())
    import c2pa

    return c2pa


def check_library_path(folder: Path) -> None:
    """Refuse to import c2pa-python where a native C2PA library in ``folder`` would shadow its own."""
    names = ("libc2pa_c.so", "libc2pa_c.dylib", "c2pa_c.dll")
    for base in (folder, folder / "artifacts", folder / "libs"):
        found = [base / n for n in names] + [p for n in names for p in base.glob(f"*/{n}")]
        shadow = next((p for p in found if p.exists()), None)
        if shadow is not None:
            raise RuntimeSetupError(
                f"Refusing to load the C2PA library: {shadow} would be loaded instead of the installed one "
                "(c2pa-python searches the working folder first).",
                fix="run the studio from another folder, or remove that file.",
            )


# -- signing identities ------------------------------------------------------------------------------------


def _read_pem(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"Cannot read {key} file {path}: {err.strerror or err}.",
            fix=f"check the path and its permissions, or unset {key}.",
        ) from err


def _checked_identity(key_pem: bytes, chain_pem: bytes, *, local: bool, source: str) -> SigningIdentity:
    """Parse the key and chain, check they belong together and are valid now; the key as PKCS#8 PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"The C2PA signing key from {source} is not an unencrypted PEM private key: {err}.",
            fix="give provenance.signing_key an unencrypted PEM key (EC P-256/384/521, RSA or Ed25519).",
        ) from err
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as err:
        raise ConfigError(
            f"The C2PA certificate chain from {source} is not PEM certificates: {err}.", fix=_CERT_FIX + "."
        ) from err
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if certs[0].public_key().public_bytes(der, public) != private.public_key().public_bytes(der, public):
        raise ConfigError(
            f"The first certificate in the C2PA chain from {source} is not the signing key's certificate.",
            fix="put the signing certificate first in provenance.signing_chain, then its issuers.",
        )
    now = datetime.datetime.now(datetime.UTC)
    if not certs[0].not_valid_before_utc <= now <= certs[0].not_valid_after_utc:
        raise ConfigError(
            f"The C2PA signing certificate from {source} is not valid now (valid "
            f"{certs[0].not_valid_before_utc:%Y-%m-%d} to {certs[0].not_valid_after_utc:%Y-%m-%d}).",
            fix="renew the certificate" + (f" (remove {source} to create a new local CA)." if local else "."),
        )
    return SigningIdentity(key_pem=_pkcs8(private), chain_pem=chain_pem, local=local, source=source)


def _local_identity(data_dir: Path) -> SigningIdentity:
    """The local CA's signing identity; created (once, atomically, race-safe) when the folder is absent."""
    folder = data_dir / LOCAL_FOLDER
    if not folder.exists():
        _create_local(data_dir, folder)
    missing = [n for n in (CA_FILE, SIGNER_FILE, SIGNER_KEY_FILE) if not (folder / n).is_file()]
    if missing:
        raise ConfigError(
            f"The local C2PA signing CA in {folder} is incomplete: {', '.join(missing)} missing.",
            fix=f"remove {folder} so the studio creates a new one (or set provenance.signing_key and "
            "provenance.signing_chain).",
        )
    _warn_if_readable(folder)
    identity = _checked_identity(
        _read_pem(folder / SIGNER_KEY_FILE, "provenance.data_dir"),
        _read_pem(folder / SIGNER_FILE, "provenance.data_dir"),
        local=True,
        source=str(folder),
    )
    logger.warning(
        "C2PA: signing with the studio's local CA in %s; these Content Credentials validate as untrusted "
        "(valid, but not from a recognised signer). Set provenance.signing_key and "
        "provenance.signing_chain to sign with your own certificate.",
        folder,
    )
    return identity


def _create_local(data_dir: Path, folder: Path) -> None:
    """Write a new CA and signing certificate into a private temp folder, then rename it into place.

    A directory rename onto an existing, non-empty folder fails, so when two processes race, exactly one
    folder wins whole and the loser reads it; nobody ever sees a half-written CA.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(prefix=f".{LOCAL_FOLDER}-new-", dir=data_dir))  # mode 0700
    except OSError as err:
        raise ConfigError(
            f"Cannot create the local C2PA signing CA in {data_dir}: {err.strerror or err}.",
            fix="make provenance.data_dir a writable folder, or set provenance.signing_key and "
            "provenance.signing_chain.",
        ) from err
    try:
        for name, pem in _issue_local_ca().items():
            with atomic_writer(tmp / name) as handle:
                handle.write(pem)
            if name.endswith("-key.pem"):
                os.chmod(tmp / name, 0o600)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process got there first (ENOTEMPTY / EEXIST): use its CA
            if not folder.is_dir():
                raise
            logger.debug("another process created %s first; using it", folder)
            return
        _fsync_folder(data_dir)
        logger.warning("C2PA: created a local signing CA in %s (root certificate: %s)", folder, CA_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Persist a rename (POSIX; best effort elsewhere)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _issue_local_ca() -> dict[str, bytes]:
    """A P-256 root CA and an end-entity certificate with the extensions C2PA requires, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Portrait Studio local C2PA CA", ca_key, ca_key, ca=True).sign(ca_key, hashes.SHA256())
    signer = (
        _certificate("Portrait Studio local signer", key, ca_key, ca=False)
        .issuer_name(ca.subject)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return {
        CA_FILE: ca.public_bytes(serialization.Encoding.PEM),
        CA_KEY_FILE: _pkcs8(ca_key),  # kept to issue a new signing certificate under the same root
        SIGNER_FILE: signer.public_bytes(serialization.Encoding.PEM),  # the root stays out of the chain
        SIGNER_KEY_FILE: _pkcs8(key),
    }


def _certificate(common_name: str, key: Any, issuer_key: Any, *, ca: bool) -> Any:
    """A certificate builder: name, validity, basic constraints, key usage (CA: keyCertSign), SKI."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, LOCAL_ORG),
        ]
    )
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew
    usage = x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False)  # digitalSignature
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=_CA_DAYS if ca else _SIGNER_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.issuer_name(name) if issuer_key is key else builder


def _pkcs8(private: Any) -> bytes:
    """An unencrypted PKCS#8 PEM key: c2pa-rs refuses SEC1 ("BEGIN EC PRIVATE KEY") keys."""
    from cryptography.hazmat.primitives import serialization

    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _warn_if_readable(folder: Path) -> None:
    for path in (folder, folder / SIGNER_KEY_FILE, folder / CA_KEY_FILE):
        with contextlib.suppress(OSError):
            if path.stat().st_mode & 0o077:
                logger.warning("C2PA: %s is readable by other users; chmod it to 0700/0600", path)


def _signing_alg(key_pem: bytes) -> str:
    """The C2PA signing algorithm for a key: ES256/384/512 by curve, PS256 for RSA, Ed25519."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    private = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        curves = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if private.curve.name in curves:
            return curves[private.curve.name]
    if isinstance(private, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ConfigError(
        f"The C2PA signing key is a {type(private).__name__}, which C2PA cannot sign with.",
        fix="use an EC P-256/384/521, RSA (2048+) or Ed25519 key.",
    )


# -- manifests ---------------------------------------------------------------------------------------------


def _manifest_definition(facts: ManifestFacts) -> dict[str, Any]:
    """The manifest JSON for c2pa-python's Builder: actions and our recipe assertion."""
    bad = {name: value for name, value in facts.identities.items() if not _SHA256.fullmatch(value)}
    if bad:  # a guard: identities go into manifests as file digests only, never as data
        raise ValueError(f"identities must map names to sha256 hex digests, got {sorted(bad)}")
    name, _, version = facts.generator.rpartition(" ")  # "portrait-studio 0.1.0"
    agent = {"name": name, "version": version} if name else {"name": version}
    created = {
        "action": "c2pa.created",
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": agent,
    }
    edited = {
        "action": "c2pa.edited",
        "digitalSourceType": COMPOSITE_WITH_TRAINED_MEDIA,
        "softwareAgent": agent,
    }
    if not facts.edited:
        actions = [created]
    elif facts.parent is None:
        actions = [created, edited]  # refined in the same run: the draft was never a file of its own
    else:
        actions = [edited]  # c2pa.opened (the parent) is added first by the EDIT intent
    recipe: dict[str, Any] = {
        "recipe_id": facts.recipe_id,
        "models": dict(facts.models),
        "audit_head": facts.audit_head,
        "identities": dict(facts.identities),
    }
    if facts.parent is not None:
        recipe["parent_sha256"] = hashlib.sha256(facts.parent).hexdigest()
    return {
        "claim_generator_info": [agent],
        "title": facts.title,
        "format": "image/png",
        "assertions": [
            {"label": "c2pa.actions.v2", "data": {"actions": actions}},
            {"label": RECIPE_ASSERTION, "data": recipe},
        ],
    }


def _parent_title(facts: ManifestFacts) -> str:
    extension = facts.parent_format.rpartition("/")[2].replace("jpeg", "jpg")
    return f"source-{hashlib.sha256(facts.parent or b'').hexdigest()[:12]}.{extension}"


def _checked_anchors(pem: bytes) -> str:
    """Trust anchors as PEM text, refused here rather than read as 'invalid credentials' by c2pa-rs."""
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(pem)
        return pem.decode("ascii")
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"The C2PA trust anchors are not PEM certificates: {err}.",
            fix="give a PEM file of root certificates (e.g. the local CA's ca.pem).",
        ) from err


def _settings(trust_anchors: str | None = None) -> dict[str, Any]:
    """c2pa-rs settings: no thumbnails, no network, trust checked against the given anchors only."""
    settings: dict[str, Any] = {
        "version": 1,
        "builder": {"thumbnail": {"enabled": False}},  # the default embeds a ~280 KB JPEG
        "verify": {**_NO_NETWORK, "verify_trust": True},
    }
    if trust_anchors:
        settings["trust"] = {"user_anchors": trust_anchors}
    return settings


# -- validation --------------------------------------------------------------------------------------------


def _judge(state: str | None, results: Mapping[str, Any], active: Mapping[str, Any] | None) -> Credentials:
    """Map c2pa-rs's validation state and status codes to our four states, with a readable reason."""
    manifest = _summary(active) if active is not None else None
    failures = list(results.get("activeManifest", {}).get("failure", []))
    for delta in results.get("ingredientDeltas", []) or []:
        failures += delta.get("validationDeltas", {}).get("failure", [])
    broken = [f for f in failures if f.get("code") not in _UNTRUSTED_CODES]
    if broken or state not in ("Valid", "Trusted") or manifest is None:
        found = "; ".join(f"{f.get('code')}: {f.get('explanation', '')}" for f in broken)
        return Credentials("invalid", found or f"validation state {state!r}", manifest)
    signer = manifest.get("signer") or {}
    who = f"{signer.get('common_name', 'unknown signer')} (issuer: {signer.get('issuer', 'unknown')})"
    history = "; ".join(
        f"ingredient {i.get('title')} was recorded with broken credentials ({', '.join(i['failures'])})"
        for i in manifest["ingredients"]
        if i["failures"]
    )
    if state == "Trusted":
        reason = f"signature and hashes valid; signed by {who}, a trusted signer"
        return Credentials("trusted", "; ".join(filter(None, (reason, history))), manifest)
    local = signer.get("issuer") == LOCAL_ORG
    hint = "; it is the studio's local CA: add its ca.pem to the trust anchors to trust it" if local else ""
    reason = f"signature and hashes valid, but {who} does not chain to a trust anchor{hint}"
    return Credentials("valid-untrusted", "; ".join(filter(None, (reason, history))), manifest)


def _summary(active: Mapping[str, Any]) -> dict[str, Any]:
    """The active manifest as JSON-ready data: actions, our assertion, ingredients, signer, thumbnails."""
    assertions = {a.get("label"): a.get("data") for a in active.get("assertions", [])}
    actions = next((v for k, v in assertions.items() if str(k).startswith("c2pa.actions")), None) or {}
    ingredients = [
        {
            **{k: i[k] for k in ("title", "format", "relationship", "active_manifest") if k in i},
            "failures": _codes(i.get("validation_results", {}).get("activeManifest", {})),  # when signed
        }
        for i in active.get("ingredients", [])
    ]
    thumbnails = [active["thumbnail"]] if active.get("thumbnail") else []
    thumbnails += [i["thumbnail"] for i in active.get("ingredients", []) if i.get("thumbnail")]
    return {
        "label": active.get("label"),
        "title": active.get("title"),
        "generator": active.get("claim_generator_info"),
        "signer": active.get("signature_info"),
        "actions": actions.get("actions", []),
        "recipe": assertions.get(RECIPE_ASSERTION),
        "ingredients": ingredients,
        "assertions": list(assertions),
        "thumbnails": thumbnails,
    }


def _codes(statuses: Mapping[str, Any]) -> list[str]:
    """The failure codes of one validation result, less the untrusted-signer one."""
    return [f["code"] for f in statuses.get("failure", []) if f.get("code") not in _UNTRUSTED_CODES]
