"""Options, consoles and set-up shared by every ``studio`` command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from studio.config import BlendMode, FaceSelect, StudioConfig, limits, load_config
from studio.request import GenerateRequest

_IMPORTED = time.perf_counter()
out = Console(soft_wrap=True)  # printed paths never wrap, on a terminal or in a pipe
err_console = Console(stderr=True, soft_wrap=True)

Profile = Annotated[str, typer.Option("--profile", "-p", help="configs/<profile>.toml (default, tiny, ...).")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="A TOML file layered over the profile.")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set draft.steps=20.")]
OutDir = Annotated[Path | None, typer.Option("--out", help="Output folder (default: config).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show progress logs.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object (for scripts).")]
Identity = Annotated[
    str | None,
    typer.Option(
        "--identity",
        "-i",
        "--cast",
        help="Refine faces to NAME, or 0=anna,1=kenji by face order (by slot with --template).",
    ),
]
TemplateName = Annotated[
    str | None,
    typer.Option("--template", help="A multi-person template (studio template add): --cast maps its slots."),
]
Select = Annotated[FaceSelect | None, typer.Option("--select", help="Faces a single identity goes to.")]
FaceIndex = Annotated[
    int, typer.Option("--face-index", **limits(GenerateRequest, "face_index"), help="With --select index.")
]
Match = Annotated[str | None, typer.Option("--match", help="With --select similarity: reference identity.")]
Processors = Annotated[
    str | None,
    typer.Option("--processors", help="Face processors in order, e.g. swap,enhance (default: config)."),
]
Blend = Annotated[BlendMode | None, typer.Option("--blend", help="alpha or poisson paste (default: config).")]
Occlusion = Annotated[
    bool | None,
    typer.Option("--occlusion/--no-occlusion", help="Leave hands, glasses... in front of a face untouched."),
]
Regions = Annotated[
    str | None,
    typer.Option("--regions", help="Keep only these face regions, e.g. skin,nose,mouth ('' for none)."),
]


def refine_options(
    processors: str | None, blend: BlendMode | None, occlusion: bool | None, regions: str | None
) -> dict[str, Any]:
    """The GenerateRequest refine fields of the --processors, --blend, --occlusion and --regions options."""
    return {
        "processors": None if processors is None else _names(processors),
        "blend": blend,
        "occlusion": occlusion,
        "regions": None if regions is None else _names(regions),
    }


def _names(text: str) -> tuple[Any, ...]:
    """``"swap, enhance"`` → ``("swap", "enhance")`` (checked by GenerateRequest against its choices)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


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
    """The configured Studio, and the ``startup`` time: process start (interpreter, imports, options) up to
    a Studio ready to load its first model."""
    extra = [f"output_dir={str(output_dir)!r}"] if output_dir else []
    config = setup_logging_and_config(profile, config_file, [*(overrides or []), *extra], debug, verbose)
    from studio.pipeline import Studio  # the model libraries: only once the config is known to be good

    studio = Studio(config)
    return studio, process_age()


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere: since ``studio.cli`` was imported)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def report(
    result: Any, startup_s: float, *, as_json: bool = False, extra: dict[str, Any] | None = None
) -> None:
    """Print what a run did (or one JSON object); exit 9 if an output failed QA, 7 if a refine changed
    nothing."""
    timings = {"startup": startup_s, **result.timings}
    if as_json:
        data = {
            "run_id": result.run_id,
            "outputs": [str(p) for p in result.outputs],
            "config": str(result.config_file),
            "statuses": list(result.statuses),
            "unchanged": list(result.unchanged),
            "failed_qa": [str(p) for p in result.failed_qa],
            "blocked": list(result.blocked),
            "notes": list(result.notes),
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            **(extra or {}),
        }
        print(json.dumps(data, ensure_ascii=False))  # plain stdout: no markup, no wrapping
    else:
        for note in result.notes:
            out.print(f"[bold yellow]note:[/] {escape(note)}")
        for status in result.statuses:
            out.print(f"refine: {escape(status)}")
        out.print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        for path in result.outputs:
            out.print(f"wrote {path}", highlight=False)
        out.print(f"config {result.config_file}", highlight=False)
    for item in result.unchanged:
        err_console.print(f"[bold red]error:[/] refine changed nothing: {escape(item)}")
    for item in result.blocked:
        err_console.print(f"[bold red]error:[/] blocked by the content check, not written: {escape(item)}")
    if result.blocked:
        raise typer.Exit(11)
    for path in result.failed_qa:
        err_console.print(f"[bold red]error:[/] failed QA, written apart: {path}", highlight=False)
    if result.failed_qa:
        raise typer.Exit(9)
    if result.unchanged:
        raise typer.Exit(7)


@contextlib.contextmanager
def step_progress(*, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar of denoising steps on a terminal (None elsewhere: pipes and logs stay clean)."""
    if not enabled or not err_console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("drafting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err_console
    ) as bar:
        task = bar.add_task("steps", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
