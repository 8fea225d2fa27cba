"""`studio models ...` and `studio config show`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from studio.cli.common import (
    ConfigFile,
    Debug,
    Overrides,
    Profile,
    err_console,
    out,
    setup_logging_and_config,
)

models_app = typer.Typer(help="List, download, verify and build models.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)


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

    config = setup_logging_and_config(profile, config_file, overrides, debug)
    table = Table()
    table.add_column("name", no_wrap=True)
    for column in ("kind", "status", "commercial", "licence", "where / note"):
        table.add_column(column)
    colours = {"present": "green", "missing": "yellow", "corrupt": "red"}
    for entry in open_catalogue(config).values():
        result = check(entry, config.models)
        status = f"[{colours.get(result.status, 'white')}]{result.status}[/]"
        table.add_row(
            entry.name, entry.kind, status, "yes" if entry.commercial else "no", entry.licence, result.note
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

    config = setup_logging_and_config(profile, config_file, overrides, debug)
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

    config = setup_logging_and_config(profile, config_file, overrides, debug)
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
    seed: Annotated[int, typer.Option("--seed", help="Seed of the kit's random weights.")] = 0,
    debug: Debug = False,
) -> None:
    """Build the tiny faithful model kit (random weights in the real formats) in FOLDER."""
    from studio.models.tiny import make_tiny_kit

    setup_logging_and_config("default", None, None, debug, verbose=True)
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

    out.print(
        tomli_w.dumps(config_to_dict(setup_logging_and_config(profile, config_file, overrides, debug))),
        markup=False,
    )
