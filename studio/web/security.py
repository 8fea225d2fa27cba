"""Who may use the web studio, where it may listen, and what it may serve.

The rules (docs/web.md): loopback by default; any other address needs credentials; the HTTP API and the UI
take the same credentials; files are served from the output folder only, never from the identity library,
the audit log, the signing keys or the models.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from studio.config import StudioConfig
from studio.errors import ConfigError, InputError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class Credentials:
    """The users allowed in, each with a password (compared in constant time)."""

    users: tuple[tuple[str, str], ...]

    def check(self, user: str, password: str) -> bool:
        """Whether ``user``/``password`` is one of the pairs (every pair is compared: no early exit)."""
        found = False
        for known_user, known_password in self.users:
            same_user = secrets.compare_digest(user.encode(), known_user.encode())
            same_password = secrets.compare_digest(password.encode(), known_password.encode())
            found |= same_user and same_password
        return found


def parse_auth(text: str, where: str = "--auth") -> tuple[str, str]:
    """``USER:PASS`` → (user, password); the password may contain ':'."""
    user, found, password = text.strip().partition(":")
    if not found or not user or not password:
        raise InputError(f"{where}: {text.strip()[:40]!r} is not USER:PASS.", fix="e.g. --auth anna:s3cret.")
    return user, password


def read_auth_file(path: Path) -> tuple[tuple[str, str], ...]:
    """One USER:PASS per line (blank lines and # comments skipped); the file must not be world-readable."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"--auth-file {path}: {err.strerror or err}.", fix="give a readable file.") from err
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise InputError(
            f"--auth-file {path} is readable by every user of this machine.", fix=f"chmod 600 {path}."
        )
    users = tuple(
        parse_auth(line, f"--auth-file {path} line {n}")
        for n, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not users:
        raise InputError(f"--auth-file {path} holds no USER:PASS line.", fix="add one, e.g. anna:s3cret.")
    return users


def credentials(auth: str | None, auth_file: Path | None) -> Credentials | None:
    """The credentials ``--auth`` and ``--auth-file`` give (both may be used), or None."""
    users = ((parse_auth(auth),) if auth else ()) + (read_auth_file(auth_file) if auth_file else ())
    return Credentials(users) if users else None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: Credentials | None) -> None:
    """Refuse a non-loopback address without credentials: anyone on the network could use the studio."""
    if auth is None and not is_loopback(host):
        raise ConfigError(
            f"Refusing to serve on {host} without authentication: anyone who can reach it could generate, "
            "re-face and read every output.",
            fix="add --auth USER:PASS or --auth-file FILE (chmod 600), or serve on 127.0.0.1 behind a "
            "reverse proxy with TLS.",
        )


def private_paths(config: StudioConfig) -> list[Path]:
    """What the web studio must never serve: identities, templates, the audit log, signing keys, models."""
    provenance = config.provenance
    paths = [
        Path(config.refine.identities_dir),
        Path(config.refine.templates_dir),
        Path(config.audit.log).parent,
        Path(provenance.data_dir),
        Path(config.models.dir),
        *(p for p in (provenance.signing_key, provenance.signing_chain) if p is not None),
    ]
    return [Path(os.path.abspath(p.expanduser())) for p in paths]


def served_folder(config: StudioConfig) -> Path:
    """The one folder the web studio serves files from: the output folder (which must hold no private
    folder)."""
    outputs = Path(os.path.abspath(Path(config.output_dir).expanduser()))
    for private in private_paths(config):
        if private == outputs or outputs in private.parents:
            raise ConfigError(
                f"The output folder {outputs} and the private folder {private} overlap: the web studio "
                "serves the output folder, and must never serve identities, keys or the audit log.",
                fix="give output_dir and refine.identities_dir / audit.log / provenance.data_dir / "
                "models.dir separate folders.",
            )
    return outputs
