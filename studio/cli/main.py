"""The ``studio`` command line. The only place (with web/) that turns StudioErrors into exit codes."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from studio._version import __version__
from studio.cli.campaign import campaign_app
from studio.cli.common import (
    Blend,
    ConfigFile,
    Debug,
    FaceIndex,
    Identity,
    Json,
    Match,
    Occlusion,
    OutDir,
    Overrides,
    Processors,
    Profile,
    Regions,
    Select,
    TemplateName,
    Verbose,
    err_console,
    make_studio,
    out,
    refine_options,
    report,
    step_progress,
)
from studio.cli.library import identity_app, styles_app, template_app
from studio.cli.models import config_app, models_app
from studio.cli.provenance import audit_app, verify_command
from studio.cli.web import web_command
from studio.config import DraftConfig, limits
from studio.errors import InputError, StudioError
from studio.request import GenerateRequest, parse_lora, parse_pairs
from studio.types import FaceAdapterKind, PoseSource, Sampler


def _limits(name: str) -> dict[str, float]:
    """An option's range, from its one definition (GenerateRequest's field metadata)."""
    return limits(GenerateRequest, name)


app = typer.Typer(help="Portrait Studio: text prompt → portrait.", pretty_exceptions_enable=False)
app.add_typer(models_app, name="models")
app.add_typer(styles_app, name="styles")
app.add_typer(identity_app, name="identity")
app.add_typer(template_app, name="template")
app.add_typer(config_app, name="config")
app.add_typer(campaign_app, name="campaign")
app.add_typer(audit_app, name="audit")


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Portrait Studio: text prompt → portrait. Run a command with --help for its options."""
    if version:
        out.print(f"studio {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())
        raise typer.Exit(0)


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
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps", **limits(DraftConfig, "steps"), help="Denoising steps (default: style/config)."
        ),
    ] = None,
    cfg: Annotated[
        float | None,
        typer.Option("--cfg", **limits(DraftConfig, "cfg"), help="Guidance scale (default: style/config)."),
    ] = None,
    sampler: Annotated[
        Sampler | None, typer.Option("--sampler", help="A1111 sampler name (default: style/config).")
    ] = None,
    width: Annotated[
        int | None, typer.Option("--width", help="px, a multiple of 8 (default: style/config).")
    ] = None,
    height: Annotated[
        int | None, typer.Option("--height", help="px, a multiple of 8 (default: style/config).")
    ] = None,
    loras: Annotated[list[str] | None, typer.Option("--lora", help="NAME[:WEIGHT], repeatable.")] = None,
    pose: Annotated[Path | None, typer.Option("--pose", help="Pose image, OpenPose JSON, or photo.")] = None,
    pose_source: Annotated[
        PoseSource, typer.Option("--pose-source", help="What --pose is (auto: decided from the file).")
    ] = "auto",
    control_scale: Annotated[
        float, typer.Option("--control-scale", **_limits("control_scale"), help="ControlNet strength.")
    ] = 1.0,
    control_start: Annotated[
        float,
        typer.Option("--control-start", **_limits("control_start"), help="Pose steers from this fraction."),
    ] = 0.0,
    control_end: Annotated[
        float, typer.Option("--control-end", **_limits("control_end"), help="...until this fraction.")
    ] = 1.0,
    init_image: Annotated[
        Path | None, typer.Option("--init-image", help="Re-draft this picture (img2img).")
    ] = None,
    strength: Annotated[
        float, typer.Option("--strength", **_limits("strength"), help="img2img: how much to change.")
    ] = 0.75,
    identity: Identity = None,
    template: TemplateName = None,
    select: Select = None,
    face_index: FaceIndex = 0,
    match: Match = None,
    processors: Processors = None,
    blend: Blend = None,
    occlusion: Occlusion = None,
    regions: Regions = None,
    adapter: Annotated[
        FaceAdapterKind | None, typer.Option("--adapter", help="Steer the draft toward --identity.")
    ] = None,
    adapter_scale: Annotated[
        float | None, typer.Option("--adapter-scale", **_limits("adapter_scale"), help="Adapter strength.")
    ] = None,
    max_rerolls: Annotated[
        int,
        typer.Option(
            "--max-rerolls", min=0, max=100, help="Re-render a QA failure with a new seed up to N times."
        ),
    ] = 0,
    output_dir: OutDir = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
    as_json: Json = False,
) -> None:
    """Render portraits from a text prompt."""
    request = GenerateRequest(
        prompt=prompt,
        negative=negative,
        style=style,
        variables=parse_pairs(variables or [], "--var"),
        seed=seed,
        count=count,
        batch_size=batch_size,
        width=width,
        height=height,
        steps=steps,
        cfg=cfg,
        sampler=sampler,
        loras=tuple(parse_lora(item) for item in loras or []),
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
        template=template,
        **refine_options(processors, blend, occlusion, regions),
    )
    studio, startup_s = make_studio(profile, config_file, overrides, output_dir, debug, verbose)
    with step_progress(enabled=not as_json) as progress:
        result = studio.generate(request, progress, max_rerolls=max_rerolls)
    report(result, startup_s, as_json=as_json)


@app.command("refine")
def refine_command(
    identity: Annotated[
        str,
        typer.Option(
            "--identity",
            "-i",
            "--cast",
            help="NAME, or 0=anna,1=kenji by face order (by slot with --template).",
        ),
    ],
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Existing pictures to re-face (never overwritten); none: the --template's master."
        ),
    ] = None,
    template: TemplateName = None,
    select: Select = None,
    face_index: FaceIndex = 0,
    match: Match = None,
    processors: Processors = None,
    blend: Blend = None,
    occlusion: Occlusion = None,
    regions: Regions = None,
    output_dir: OutDir = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
    as_json: Json = False,
) -> None:
    """Swap faces in existing images to enrolled identities (detect, swap, upscale, blend, QA)."""
    if not images and template is None:
        raise InputError(
            "No picture to refine.", fix="give IMAGE..., or --template NAME to refine its master."
        )
    request = GenerateRequest(
        prompt="",
        identity=identity,
        select=select,
        face_index=face_index,
        match=match,
        template=template,
        **refine_options(processors, blend, occlusion, regions),
    )
    studio, startup_s = make_studio(profile, config_file, overrides, output_dir, debug, verbose)
    report(studio.refine_files(images or [], request), startup_s, as_json=as_json)


@app.command()
def reproduce(
    image: Annotated[Path, typer.Argument(help="A PNG written by studio generate or studio refine.")],
    current_config: Annotated[
        bool,
        typer.Option("--current-config", help="Run under this profile/--set config, not the recipe's."),
    ] = False,
    output_dir: OutDir = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
    as_json: Json = False,
) -> None:
    """Render an image again from its recipe, under the recipe's config; says whether pixels are identical."""
    studio, startup_s = make_studio(profile, config_file, overrides, output_dir, debug, verbose)
    again = studio.reproduce(image, use_current_config=current_config)
    extra = {"identical": again.identical, "differences": list(again.differences)}
    report(again.result, startup_s, as_json=as_json, extra=extra)
    if not as_json:
        out.print(f"identical to {image}: {'yes' if again.identical else 'NO'}")
        for difference in again.differences:
            out.print(f"differs: {escape(difference)}")
    if not again.identical:
        raise typer.Exit(8)


app.command("verify")(verify_command)  # after generate, refine and reproduce in the command list
app.command("web")(web_command)


def main() -> None:
    """Console entry point: one clear line and a non-zero exit for every error; --debug for tracebacks."""
    debug = "--debug" in sys.argv
    try:
        code = app(standalone_mode=False, prog_name="studio")  # returns the code of a typer.Exit
    except StudioError as err:
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        sys.exit(err.exit_code)
    except typer.TyperException as exc:  # typer's bundled click: usage errors, bad option values
        sys.exit(_usage_error(exc))
    except OSError as err:  # a file problem no StudioError named: still one line, never a traceback
        if debug:
            traceback.print_exc()
        name = f": {err.filename}" if getattr(err, "filename", None) else ""
        problem = escape(f"{err.strerror or err}{name}")
        err_console.print(f"[bold red]error:[/] {problem}", highlight=False)
        err_console.print("fix: check the path, free disk space and permissions.", highlight=False)
        sys.exit(6)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted: finished outputs are kept; nothing partial was written.")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc: typer.TyperException) -> int:
    """Print a command-line usage error as one line plus a hint; the exit code is 2."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "studio"
    message = " ".join(str(exc.format_message()).split()) if hasattr(exc, "format_message") else str(exc)
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    err_console.print(f"usage: see `{command} --help`", highlight=False)
    return 2
