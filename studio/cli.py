"""The ``studio`` command line. The only module (with web/) that turns StudioErrors into exit codes."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from studio.config import FaceSelect, StudioConfig, load_config
from studio.errors import InputError, StudioError
from studio.types import PoseSource, Sampler

app = typer.Typer(
    help="Portrait Studio: text prompt → portrait.", pretty_exceptions_enable=False, no_args_is_help=True
)
models_app = typer.Typer(help="List, download, verify and build models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
styles_app = typer.Typer(help="Style presets (prompts/*.toml).", no_args_is_help=True)
app.add_typer(styles_app, name="styles")
identity_app = typer.Typer(help="Enrolled identities (with consent records).", no_args_is_help=True)
app.add_typer(identity_app, name="identity")
app.add_typer(config_app, name="config")

out = Console()
err_console = Console(stderr=True)

Profile = Annotated[str, typer.Option("--profile", "-p", help="configs/<profile>.toml (default, tiny, ...).")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="A TOML file layered over the profile.")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set draft.steps=20.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show progress logs.")]
Identity = Annotated[
    str | None,
    typer.Option("--identity", "-i", help="Refine faces to NAME, or 0=anna,1=kenji by face order."),
]
Select = Annotated[FaceSelect | None, typer.Option("--select", help="Faces a single identity goes to.")]
FaceIndex = Annotated[int, typer.Option("--face-index", min=0, help="With --select index.")]
Match = Annotated[str | None, typer.Option("--match", help="With --select similarity: reference identity.")]


def _setup(
    profile: str, config_file: Path | None, overrides: list[str] | None, debug: bool, verbose: bool = False
) -> StudioConfig:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(message)s",
        force=True,
        handlers=[RichHandler(console=err_console, show_path=debug, show_time=False)],
    )
    if not debug:  # third-party libraries' warnings are for developers; --debug shows them
        for name in ("diffusers", "transformers", "huggingface_hub", "peft"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return load_config(profile, user_file=config_file, overrides=overrides or ())


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to paint; may use {variables} (see --var).")],
    style: Annotated[
        str | None, typer.Option("--style", "-s", help="A preset from prompts/ (studio styles list).")
    ] = None,
    negative: Annotated[
        str | None, typer.Option("--negative", help="Negative prompt (default: style/config).")
    ] = None,
    variables: Annotated[
        list[str] | None, typer.Option("--var", help="Template variable: --var age=30.")
    ] = None,
    count: Annotated[
        int, typer.Option("-n", "--count", min=1, max=1000, help="Images: seeds seed, seed+1, ...")
    ] = 1,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=16, help="Images rendered at once.")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the first image.")] = 42,
    steps: Annotated[int | None, typer.Option("--steps", min=1, max=500)] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", min=0.0, max=50.0)] = None,
    sampler: Annotated[Sampler | None, typer.Option("--sampler")] = None,
    width: Annotated[int | None, typer.Option("--width")] = None,
    height: Annotated[int | None, typer.Option("--height")] = None,
    loras: Annotated[list[str] | None, typer.Option("--lora", help="NAME[:WEIGHT], repeatable.")] = None,
    pose: Annotated[Path | None, typer.Option("--pose", help="Pose image, OpenPose JSON, or photo.")] = None,
    pose_source: Annotated[PoseSource, typer.Option("--pose-source")] = "auto",
    control_scale: Annotated[float, typer.Option("--control-scale", min=0.0, max=2.0)] = 1.0,
    control_start: Annotated[float, typer.Option("--control-start", min=0.0, max=1.0)] = 0.0,
    control_end: Annotated[float, typer.Option("--control-end", min=0.0, max=1.0)] = 1.0,
    init_image: Annotated[
        Path | None, typer.Option("--init-image", help="Re-draft this picture (img2img).")
    ] = None,
    strength: Annotated[float, typer.Option("--strength", help="img2img: how much to change (0-1].")] = 0.75,
    identity: Identity = None,
    select: Select = None,
    face_index: FaceIndex = 0,
    match: Match = None,
    output_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: config).")] = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
) -> None:
    """Render portraits from a text prompt."""
    from studio.request import GenerateRequest

    request = GenerateRequest(
        prompt=prompt,
        negative=negative,
        style=style,
        variables=_pairs(variables or [], "--var", "="),
        seed=seed,
        count=count,
        batch_size=batch_size,
        width=width,
        height=height,
        steps=steps,
        cfg=cfg,
        sampler=sampler,
        loras=tuple(_lora(item) for item in loras or []),
        pose=pose,
        pose_source=pose_source,
        control_scale=control_scale,
        control_start=control_start,
        control_end=control_end,
        init_image=init_image,
        strength=strength,
        identity=identity,
        select=select,
        face_index=face_index,
        match=match,
    )
    studio, setup_s = _studio(profile, config_file, overrides, output_dir, debug, verbose)
    _report(studio.generate(request), setup_s)


@app.command("refine")
def refine_command(
    images: Annotated[list[Path], typer.Argument(help="Existing pictures to re-face (never overwritten).")],
    identity: Annotated[str, typer.Option("--identity", "-i", help="NAME, or 0=anna,1=kenji by face order.")],
    select: Select = None,
    face_index: FaceIndex = 0,
    match: Match = None,
    output_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: config).")] = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
) -> None:
    """Swap faces in existing images to enrolled identities (detect, swap, upscale, blend, QA)."""
    from studio.request import GenerateRequest

    request = GenerateRequest(prompt="", identity=identity, select=select, face_index=face_index, match=match)
    studio, setup_s = _studio(profile, config_file, overrides, output_dir, debug, verbose)
    _report(studio.refine_files(images, request), setup_s)


@app.command()
def reproduce(
    image: Annotated[Path, typer.Argument(help="A PNG written by studio generate.")],
    output_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: config).")] = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
) -> None:
    """Render an image again from the recipe stored in it; says whether the pixels are identical."""
    studio, setup_s = _studio(profile, config_file, overrides, output_dir, debug, verbose)
    result, identical = studio.reproduce(image)
    _report(result, setup_s)
    out.print(f"identical to {image}: {'yes' if identical else 'NO'}")


def _studio(
    profile: str,
    config_file: Path | None,
    overrides: list[str] | None,
    output_dir: Path | None,
    debug: bool,
    verbose: bool,
) -> tuple[Any, float]:
    from studio.pipeline import Studio

    extra = [f"output_dir={str(output_dir)!r}"] if output_dir else []
    config = _setup(profile, config_file, [*(overrides or []), *extra], debug, verbose)
    start = time.perf_counter()
    studio = Studio(config)
    return studio, time.perf_counter() - start


def _report(result: Any, setup_s: float) -> None:
    for note in result.notes:
        out.print(f"[bold yellow]note:[/] {escape(note)}")
    for status in result.statuses:
        out.print(f"refine: {escape(status)}")
    timings = {"setup": setup_s, **result.timings}
    out.print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    for path in result.outputs:
        out.print(f"wrote {path}")
    out.print(f"config {result.config_file}")


def _pairs(items: list[str], option: str, sep: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, found, value = item.partition(sep)
        if not found or not key:
            raise InputError(f"{option} {item!r} is not KEY{sep}VALUE.", fix=f"e.g. {option} age{sep}30.")
        pairs[key.strip()] = value.strip()
    return pairs


def _lora(item: str) -> tuple[str, float]:
    name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1.0")
    try:
        return name, float(weight)
    except ValueError as err:
        raise InputError(
            f"--lora {item!r}: weight {weight!r} is not a number.", fix="e.g. --lora film:0.7."
        ) from err


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

    _setup("default", None, None, debug)
    preset = load_style(name)
    for key, value in vars(preset).items():
        out.print(f"[bold]{key}[/]: {escape(str(value))}")


@models_app.command("list")
def models_list(
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Show every catalogued model: present / missing / corrupt, with its licence."""
    from studio.models import open_catalogue
    from studio.models.store import check

    config = _setup(profile, config_file, overrides, debug)
    table = Table()
    table.add_column("name", no_wrap=True)
    for column in ("kind", "status", "commercial", "licence", "where / note"):
        table.add_column(column)
    colours = {"present": "green", "missing": "yellow", "corrupt": "red"}
    for entry in open_catalogue(config).values():
        result = check(entry, config.models)
        note = str(result.path) if result.path else entry.source.describe()
        if entry.fixture:
            note += f"\nFIXTURE: {entry.fixture}"
        status = f"[{colours.get(result.status, 'white')}]{result.status}[/]"
        table.add_row(
            entry.name, entry.kind, status, "yes" if entry.commercial else "no", entry.licence, note
        )
    out.print(table)


@models_app.command("pull")
def models_pull(
    names: Annotated[list[str], typer.Argument(help="Catalogue names.")],
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Download models, verify their sha256 and move them into place atomically (resumable)."""
    from studio.models import open_catalogue
    from studio.models.pull import pull

    config = _setup(profile, config_file, overrides, debug)
    catalogue = open_catalogue(config)
    entries = [catalogue.entry(name) for name in names]
    columns = (*Progress.get_default_columns()[:1], BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        for entry in entries:
            task = bar.add_task(entry.name, total=entry.size)
            path = pull(
                entry, config.models, progress=lambda done, total, t=task: bar.update(t, completed=done)
            )
            bar.update(task, completed=entry.size)
            out.print(f"{entry.name}: {path}")


@models_app.command("verify")
def models_verify(
    names: Annotated[list[str] | None, typer.Argument(help="Names (default: all present).")] = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Re-hash model files and compare with the catalogue; exits 4 if any is corrupt."""
    from studio.errors import ChecksumError
    from studio.models import open_catalogue
    from studio.models.store import check

    config = _setup(profile, config_file, overrides, debug)
    catalogue = open_catalogue(config)
    entries = [catalogue.entry(n) for n in names] if names else list(catalogue.values())
    corrupt = []
    for entry in entries:
        result = check(entry, config.models, recheck=True)
        if result.status == "missing" and not names:
            continue
        out.print(f"{entry.name}: {result.status} {result.path or ''}")
        if result.status != "present":
            corrupt.append(entry.name)
    if corrupt:
        raise ChecksumError(
            f"Not verified: {', '.join(corrupt)}.",
            fix="re-download with `studio models pull NAME` (delete the corrupt file first).",
        )


@models_app.command("make-tiny")
def models_make_tiny(
    folder: Annotated[Path, typer.Argument(help="Where to build the kit.")],
    force: Annotated[bool, typer.Option("--force", help="Rebuild if present.")] = False,
    seed: int = 0,
    debug: Debug = False,
) -> None:
    """Build the tiny faithful model kit (random weights in the real formats) in FOLDER."""
    from studio.models.tiny import make_tiny_kit

    _setup("default", None, None, debug, verbose=True)
    start = time.perf_counter()
    make_tiny_kit(folder, seed=seed, force=force)
    out.print(
        f"tiny kit in {folder} ({time.perf_counter() - start:.1f} s); catalogue {folder / 'models.toml'}"
    )
    out.print("note: random weights — pictures are not portraits; the detector is a fixture.")


@config_app.command("show")
def config_show(
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Print the resolved configuration as TOML."""
    import tomli_w

    from studio.config import config_to_dict

    out.print(tomli_w.dumps(config_to_dict(_setup(profile, config_file, overrides, debug))), markup=False)


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
    studio, _ = _studio(profile, config_file, overrides, None, debug, False)
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
    studio, _ = _studio(profile, config_file, overrides, None, debug, False)
    table = Table("name", "photos", "consent", "created", "status")
    for item in studio.identities.list():
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
    studio, _ = _studio(profile, config_file, overrides, None, debug, False)
    item = studio.identities.load(name)
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
    studio, _ = _studio(profile, config_file, overrides, None, debug, False)
    studio.identities.remove(name)
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
    studio, _ = _studio(profile, config_file, overrides, None, debug, False)
    item = studio.identities.revoke(name)
    out.print(f"revoked {name} at {item.revoked}")


def main() -> None:
    """Console entry point: one clear line and a non-zero exit for user errors; --debug for tracebacks."""
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except StudioError as err:
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err_console.print("interrupted: finished outputs are kept; nothing partial was written.")
        sys.exit(130)
