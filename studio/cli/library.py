"""`studio styles ...` and `studio identity ...`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from studio.cli.common import (
    ConfigFile,
    Debug,
    Overrides,
    Profile,
    make_studio,
    out,
    setup_logging_and_config,
)

styles_app = typer.Typer(help="Style presets (prompts/*.toml).", no_args_is_help=True)
identity_app = typer.Typer(help="Enrolled identities (with consent records).", no_args_is_help=True)

if TYPE_CHECKING:
    from studio.faces.identity import IdentityLibrary


@styles_app.command("list")
def styles_list() -> None:
    """List the style presets."""
    from studio.styles import list_styles

    table = Table("name", "sampler", "steps", "cfg", "size", "description")
    for preset in list_styles():
        table.add_row(
            preset.name,
            preset.sampler,
            str(preset.steps),
            str(preset.cfg),
            f"{preset.width}x{preset.height}",
            preset.description,
        )
    out.print(table)


@styles_app.command("show")
def styles_show(name: Annotated[str, typer.Argument(help="Preset name.")], debug: Debug = False) -> None:
    """Show one style preset in full."""
    from studio.styles import load_style

    setup_logging_and_config("default", None, None, debug)
    preset = load_style(name)
    for key, value in vars(preset).items():
        out.print(f"[bold]{key}[/]: {escape(str(value))}")


@identity_app.command("add")
def identity_add(
    name: Annotated[str, typer.Argument(help="Identity name (letters, digits, _ . -).")],
    photos: Annotated[list[Path], typer.Argument(help="One or more photos with the person's face.")],
    consent: Annotated[
        str, typer.Option("--consent", help="The consent record, e.g. 'release #123, 2026-11-01'.")
    ],
    replace: Annotated[bool, typer.Option("--replace", help="Re-enrol an existing name.")] = False,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Enrol an identity from photos; its embedding is cached in a safetensors file."""
    studio, _ = make_studio(profile, config_file, overrides, None, debug, False)
    report = studio.enrol(name, photos, consent=consent, replace=replace)
    for path, reason in report.rejected:
        out.print(f"[yellow]rejected[/] {escape(str(path))}: {escape(reason)}")
    for warning in report.warnings:
        out.print(f"[yellow]warning:[/] {escape(warning)}")
    out.print(
        f"enrolled {report.identity.name} from {len(report.used)} photo(s): "
        f"{studio.identities.path_for(report.identity.name)}"
    )


@identity_app.command("list")
def identity_list(
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """List enrolled identities, with consent and revocation."""
    library = _library(profile, config_file, overrides, debug)
    table = Table("name", "photos", "consent", "created", "status")
    for item in library.list():
        status = f"[red]revoked {item.revoked}[/]" if item.revoked else "[green]active[/]"
        table.add_row(item.name, str(len(item.source_sha256)), escape(item.consent), item.created, status)
    out.print(table)


@identity_app.command("show")
def identity_show(
    name: str,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Show one identity's record (not its embedding)."""
    library = _library(profile, config_file, overrides, debug)
    item = library.load(name)
    for key in ("name", "consent", "created", "revoked", "recognizer_sha256"):
        out.print(f"[bold]{key}[/]: {escape(str(getattr(item, key)))}")
    out.print(f"[bold]photos[/]: {len(item.source_sha256)} ({', '.join(s[:12] for s in item.source_sha256)})")


@identity_app.command("remove")
def identity_remove(
    name: str,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Delete an identity's file."""
    library = _library(profile, config_file, overrides, debug)
    library.remove(name)
    out.print(f"removed {name}")


@identity_app.command("revoke")
def identity_revoke(
    name: str,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Revoke an identity's consent: it stays on record but can no longer be used."""
    library = _library(profile, config_file, overrides, debug)
    item = library.revoke(name)
    out.print(f"revoked {name} at {item.revoked}")


def _library(
    profile: str, config_file: Path | None, overrides: list[str] | None, debug: bool
) -> IdentityLibrary:
    """The identity library the config points at, without a Studio: no model (library) is loaded."""
    from studio.faces.identity import IdentityLibrary

    config = setup_logging_and_config(profile, config_file, overrides, debug)
    return IdentityLibrary(config.refine.identities_dir)
