"""The ``studio`` command line. The only module (with web/) that turns StudioErrors into exit codes."""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from studio.config import StudioConfig, load_config
from studio.errors import StudioError
from studio.types import Sampler

app = typer.Typer(
    help="Portrait Studio: text prompt → portrait.", pretty_exceptions_enable=False, no_args_is_help=True
)
models_app = typer.Typer(help="List, download, verify and build models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err_console = Console(stderr=True)

Profile = Annotated[str, typer.Option("--profile", "-p", help="configs/<profile>.toml (default, tiny, ...).")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="A TOML file layered over the profile.")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set draft.steps=20.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show progress logs.")]


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
    prompt: Annotated[str, typer.Argument(help="What to paint.")],
    negative: Annotated[
        str | None, typer.Option("--negative", help="Negative prompt (default: config).")
    ] = None,
    count: Annotated[
        int, typer.Option("-n", "--count", min=1, max=64, help="Images (seeds seed, seed+1, ...).")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the first image.")] = 42,
    steps: Annotated[int | None, typer.Option("--steps", min=1, max=500)] = None,
    sampler: Annotated[Sampler | None, typer.Option("--sampler")] = None,
    width: Annotated[int | None, typer.Option("--width")] = None,
    height: Annotated[int | None, typer.Option("--height")] = None,
    output_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: config).")] = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
) -> None:
    """Render portraits from a text prompt."""
    from studio.draft import DraftRequest
    from studio.pipeline import Studio

    extra = [f"output_dir={str(output_dir)!r}"] if output_dir else []
    config = _setup(profile, config_file, [*(overrides or []), *extra], debug, verbose)
    start = time.perf_counter()
    studio = Studio(config)
    setup_s = time.perf_counter() - start
    draft = config.draft
    request = DraftRequest(
        prompt=prompt,
        negative=draft.negative if negative is None else negative,
        seed=seed,
        count=count,
        width=width or draft.width,
        height=height or draft.height,
        steps=steps or draft.steps,
        cfg=draft.cfg,
        sampler=sampler or draft.sampler,
    )
    result = studio.generate(request)
    for note in result.notes:
        out.print(f"[bold yellow]note:[/] {note}")
    timings = {"setup": setup_s, **result.timings}
    out.print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    for path in result.outputs:
        out.print(f"wrote {path}")
    out.print(f"config {result.config_file}")


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
