"""`studio styles ...`, `studio identity ...` and `studio template ...`."""

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
template_app = typer.Typer(
    help="Multi-person templates: a master picture whose faces are numbered slots (--template NAME --cast "
    "0=anna,1=kenji).",
    no_args_is_help=True,
)

if TYPE_CHECKING:
    from studio.faces.identity import IdentityLibrary
    from studio.faces.template import Template, TemplateLibrary


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
    scope: Annotated[
        str, typer.Option("--scope", help="Purposes the consent allows, comma-separated (ads,concept-art).")
    ] = "internal",
    expires: Annotated[
        str | None, typer.Option("--expires", help="Last day of allowed use, YYYY-MM-DD (default: none).")
    ] = None,
    evidence: Annotated[
        Path | None, typer.Option("--evidence", help="The signed release document (only its sha256 is kept).")
    ] = None,
    granted_by: Annotated[str, typer.Option("--granted-by", help="Who granted or recorded it.")] = "",
    replace: Annotated[bool, typer.Option("--replace", help="Re-enrol an existing name.")] = False,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Enrol an identity from photos with its consent (record, scope, expiry, evidence); the embedding is
    kept in a 0600 safetensors file and the enrolment is written to the audit log."""
    from studio.faces.consent import ConsentTerms, scope_list

    studio, _ = make_studio(profile, config_file, overrides, None, debug, False)
    terms = ConsentTerms(consent, scope_list(scope), expires, evidence, granted_by)
    report = studio.enrol(name, photos, consent=terms, replace=replace)
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
    table = Table("name", "photos", "consent", "scope", "expires", "created", "status")
    for item in library.list():
        status = f"[red]revoked {item.revoked}[/]" if item.revoked else "[green]active[/]"
        scope = ", ".join(item.scope) or "any (enrolled before scopes)"
        table.add_row(item.name, str(len(item.source_sha256)), escape(item.consent), escape(scope),
                      item.expires or "-", item.created, status)  # fmt: skip
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
    keys = ("name", "consent", "scope", "expires", "evidence_sha256", "granted_by", "created", "revoked")
    for key in (*keys, "recognizer_sha256"):
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
    return IdentityLibrary.for_config(config)


@template_app.command("add")
def template_add(
    name: Annotated[str, typer.Argument(help="Template name (letters, digits, _ . -).")],
    image: Annotated[Path, typer.Argument(help="The master picture; each face found becomes a slot.")],
    replace: Annotated[bool, typer.Option("--replace", help="Replace an existing template.")] = False,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Store a master picture as a template: its faces, left to right, become slots 0, 1, ..."""
    studio, _ = make_studio(profile, config_file, overrides, None, debug, False)
    template = studio.add_template(name, image, replace=replace)
    path = studio.templates.path_for(name)
    out.print(f"added template {template.name} with {len(template.slots)} slot(s): {path}", highlight=False)
    _print_slots(template)


@template_app.command("list")
def template_list(
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """List the templates."""
    library = _templates(profile, config_file, overrides, debug)
    table = Table("name", "slots", "size", "master sha256", "created")
    for item in library.list():
        table.add_row(item.name, str(len(item.slots)), f"{item.width}x{item.height}", item.image_sha256[:12],
                      item.created)  # fmt: skip
    out.print(table)


@template_app.command("show")
def template_show(
    name: str,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Show one template: its master picture and its slots (the numbers --cast maps)."""
    library = _templates(profile, config_file, overrides, debug)
    item = library.load(name)
    out.print(f"[bold]name[/]: {item.name}")
    out.print(f"[bold]master[/]: {escape(str(library.image_path(item)))} ({item.width}x{item.height}, "
              f"sha256 {item.image_sha256[:12]})")  # fmt: skip
    out.print(f"[bold]recognizer_sha256[/]: {item.recognizer_sha256}")
    out.print(f"[bold]created[/]: {item.created}")
    _print_slots(item)


@template_app.command("remove")
def template_remove(
    name: str,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Delete a template and its copy of the master picture."""
    library = _templates(profile, config_file, overrides, debug)
    library.remove(name)
    out.print(f"removed {name}")


def _print_slots(template: Template) -> None:
    """One line per slot: its number (as --cast uses it) and box."""
    for slot in template.slots:
        x1, y1, x2, y2 = slot.box
        out.print(f"slot {slot.index}: box {x1:.0f},{y1:.0f} - {x2:.0f},{y2:.0f} px", highlight=False)


def _templates(
    profile: str, config_file: Path | None, overrides: list[str] | None, debug: bool
) -> TemplateLibrary:
    """The template library the config points at, without a Studio: no model (library) is loaded."""
    from studio.faces.template import TemplateLibrary

    config = setup_logging_and_config(profile, config_file, overrides, debug)
    return TemplateLibrary.for_config(config)
