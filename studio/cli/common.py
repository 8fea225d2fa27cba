"""Options, consoles and set-up shared by every ``studio`` command."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from studio.config import FaceSelect, StudioConfig, limits, load_config
from studio.request import GenerateRequest

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
FaceIndex = Annotated[
    int, typer.Option("--face-index", **limits(GenerateRequest, "face_index"), help="With --select index.")
]
Match = Annotated[str | None, typer.Option("--match", help="With --select similarity: reference identity.")]


def setup_logging_and_config(
    profile: str, config_file: Path | None, overrides: list[str] | None, debug: bool, verbose: bool = False
) -> StudioConfig:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(message)s",
        force=True,
        handlers=[RichHandler(console=err_console, show_path=debug, show_time=False)],
    )
    if debug:
        os.environ["STUDIO_DEBUG_LIBRARIES"] = "1"  # studio.compat.quiet_model_libraries lets them speak
    else:  # third-party libraries' warnings are for developers; --debug shows them
        for name in ("diffusers", "transformers", "huggingface_hub", "peft"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return load_config(profile, user_file=config_file, overrides=overrides or ())


def make_studio(
    profile: str,
    config_file: Path | None,
    overrides: list[str] | None,
    output_dir: Path | None,
    debug: bool,
    verbose: bool,
) -> tuple[Any, float]:
    extra = [f"output_dir={str(output_dir)!r}"] if output_dir else []
    config = setup_logging_and_config(profile, config_file, [*(overrides or []), *extra], debug, verbose)
    start = time.perf_counter()
    from studio.pipeline import Studio  # the model libraries: only once the config is known to be good

    studio = Studio(config)
    return studio, time.perf_counter() - start


def report(result: Any, setup_s: float) -> None:
    """Print what a run did; a refine that changed nothing makes the command exit non-zero (7)."""
    for note in result.notes:
        out.print(f"[bold yellow]note:[/] {escape(note)}", soft_wrap=True)
    for status in result.statuses:
        out.print(f"refine: {escape(status)}", soft_wrap=True)
    timings = {"setup": setup_s, **result.timings}
    out.print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()), soft_wrap=True)
    for path in result.outputs:
        out.print(f"wrote {path}", soft_wrap=True, highlight=False)
    out.print(f"config {result.config_file}", soft_wrap=True, highlight=False)
    for item in result.unchanged:
        err_console.print(f"[bold red]error:[/] refine changed nothing: {escape(item)}", soft_wrap=True)
    if result.unchanged:
        raise typer.Exit(7)
