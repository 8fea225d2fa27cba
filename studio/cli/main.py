"""The ``studio`` command line. The only place (with web/) that turns StudioErrors into exit codes."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape

from studio.cli.common import (
    ConfigFile,
    Debug,
    FaceIndex,
    Identity,
    Match,
    Overrides,
    Profile,
    Select,
    Verbose,
    err_console,
    make_studio,
    out,
    report,
)
from studio.cli.library import identity_app, styles_app
from studio.cli.models import config_app, models_app
from studio.config import DraftConfig, limits
from studio.errors import InputError, StudioError
from studio.request import GenerateRequest
from studio.types import FaceAdapterKind, PoseSource, Sampler


def _limits(name: str) -> dict[str, float]:
    """An option's range, from its one definition (GenerateRequest's field metadata)."""
    return limits(GenerateRequest, name)


app = typer.Typer(
    help="Portrait Studio: text prompt → portrait.", pretty_exceptions_enable=False, no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(styles_app, name="styles")
app.add_typer(identity_app, name="identity")
app.add_typer(config_app, name="config")


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
        int, typer.Option("-n", "--count", **_limits("count"), help="Images: seeds seed, seed+1, ...")
    ] = 1,
    batch_size: Annotated[
        int, typer.Option("--batch-size", **_limits("batch_size"), help="Images rendered at once.")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", **_limits("seed"), help="Seed of the first image.")] = 42,
    steps: Annotated[int | None, typer.Option("--steps", **limits(DraftConfig, "steps"))] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", **limits(DraftConfig, "cfg"))] = None,
    sampler: Annotated[Sampler | None, typer.Option("--sampler")] = None,
    width: Annotated[int | None, typer.Option("--width")] = None,
    height: Annotated[int | None, typer.Option("--height")] = None,
    loras: Annotated[list[str] | None, typer.Option("--lora", help="NAME[:WEIGHT], repeatable.")] = None,
    pose: Annotated[Path | None, typer.Option("--pose", help="Pose image, OpenPose JSON, or photo.")] = None,
    pose_source: Annotated[PoseSource, typer.Option("--pose-source")] = "auto",
    control_scale: Annotated[float, typer.Option("--control-scale", **_limits("control_scale"))] = 1.0,
    control_start: Annotated[float, typer.Option("--control-start", **_limits("control_start"))] = 0.0,
    control_end: Annotated[float, typer.Option("--control-end", **_limits("control_end"))] = 1.0,
    init_image: Annotated[
        Path | None, typer.Option("--init-image", help="Re-draft this picture (img2img).")
    ] = None,
    strength: Annotated[
        float, typer.Option("--strength", **_limits("strength"), help="img2img: how much to change.")
    ] = 0.75,
    identity: Identity = None,
    select: Select = None,
    face_index: FaceIndex = 0,
    match: Match = None,
    adapter: Annotated[
        FaceAdapterKind | None, typer.Option("--adapter", help="Steer the draft toward --identity.")
    ] = None,
    adapter_scale: Annotated[
        float | None, typer.Option("--adapter-scale", **_limits("adapter_scale"), help="Adapter strength.")
    ] = None,
    output_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: config).")] = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
) -> None:
    """Render portraits from a text prompt."""
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
        adapter=adapter,
        adapter_scale=adapter_scale,
    )
    studio, setup_s = make_studio(profile, config_file, overrides, output_dir, debug, verbose)
    report(studio.generate(request), setup_s)


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
    request = GenerateRequest(prompt="", identity=identity, select=select, face_index=face_index, match=match)
    studio, setup_s = make_studio(profile, config_file, overrides, output_dir, debug, verbose)
    report(studio.refine_files(images, request), setup_s)


@app.command()
def reproduce(
    image: Annotated[Path, typer.Argument(help="A PNG written by studio generate or studio refine.")],
    current_config: Annotated[
        bool,
        typer.Option("--current-config", help="Run under this profile/--set config, not the recipe's."),
    ] = False,
    output_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: config).")] = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
) -> None:
    """Render an image again from its recipe, under the recipe's config; says whether pixels are identical."""
    studio, setup_s = make_studio(profile, config_file, overrides, output_dir, debug, verbose)
    again = studio.reproduce(image, use_current_config=current_config)
    report(again.result, setup_s)
    out.print(f"identical to {image}: {'yes' if again.identical else 'NO'}", soft_wrap=True)
    for difference in again.differences:
        out.print(f"differs: {escape(difference)}", soft_wrap=True)
    if not again.identical:
        raise typer.Exit(8)


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


def main() -> None:
    """Console entry point: one clear line and a non-zero exit for user errors; --debug for tracebacks."""
    debug = "--debug" in sys.argv
    try:
        code = app(standalone_mode=False)  # typer returns the code of a typer.Exit here
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
    sys.exit(code if isinstance(code, int) else 0)
