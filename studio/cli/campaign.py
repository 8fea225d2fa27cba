"""``studio campaign plan | run | status | retry | report | export``: thin clients over ``Campaign``."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from studio.cli.common import (
    ConfigFile,
    Debug,
    Json,
    OutDir,
    Overrides,
    Profile,
    Verbose,
    err_console,
    out,
    setup_logging_and_config,
)

campaign_app = typer.Typer(help="Campaigns: a manifest of prompts × styles × identities × seeds.")

Manifest = Annotated[Path, typer.Argument(help="The campaign manifest (TOML; see docs/campaigns.md).")]
EngineOption = Annotated[str, typer.Option("--engine", help="local (worker processes) or ray.")]
Address = Annotated[str | None, typer.Option("--address", help="Ray cluster address (--engine ray).")]
Workers = Annotated[int, typer.Option("--workers", min=1, max=256, help="Workers (one Studio each).")]
EXIT_NOT_ALL_DONE = 9  # some items failed QA, failed or are blocked (see `studio campaign status`)


def _open(manifest: Path, profile: str, config_file: Path | None, overrides: list[str] | None,
          output_dir: Path | None, debug: bool, verbose: bool) -> Any:  # fmt: skip
    extra = [f"output_dir={str(output_dir)!r}"] if output_dir else []
    setup_logging_and_config(profile, config_file, [], debug, verbose)  # logging; the config is checked below
    from studio.batch.campaign import Campaign

    return Campaign.load(manifest, profile, user_file=config_file, overrides=[*(overrides or []), *extra])


@campaign_app.command("plan")
def plan_command(
    manifest: Manifest,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    output_dir: OutDir = None,
    debug: Debug = False,
    verbose: Verbose = False,
    as_json: Json = False,
) -> None:
    """Check a manifest and print what a run would make (nothing is written)."""
    campaign = _open(manifest, profile, config_file, overrides, output_dir, debug, verbose)
    plan = campaign.plan()
    summary = campaign.summary(plan)
    if as_json:
        print(json.dumps(summary, ensure_ascii=False))
        return
    out.print(f"campaign {escape(summary['campaign'])}: {summary['items']} items "
              f"({summary['new_items']} not yet in the store), {plan.drafts} drafts to render")  # fmt: skip
    for job, count in summary["jobs"].items():
        out.print(f"  job {escape(job)}: {count} items")
    for axis, count in summary["axes"].items():
        out.print(f"  axis {escape(axis)}: {count} values")
    out.print(f"folder {campaign.folder}", highlight=False)


@campaign_app.command("run")
def run_command(
    manifest: Manifest,
    engine: EngineOption = "local",
    address: Address = None,
    workers: Workers = 1,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    output_dir: OutDir = None,
    debug: Debug = False,
    verbose: Verbose = False,
    as_json: Json = False,
) -> None:
    """Render every unfinished item (a rerun after a crash renders only what is left)."""
    _check_engine(engine)
    campaign = _open(manifest, profile, config_file, overrides, output_dir, debug, verbose)
    _run(campaign, engine, workers, address, as_json, {})


@campaign_app.command("status")
def status_command(
    manifest: Manifest,
    attempts: Annotated[bool, typer.Option("--attempts", help="List every attempt of every item.")] = False,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    output_dir: OutDir = None,
    debug: Debug = False,
    verbose: Verbose = False,
    as_json: Json = False,
) -> None:
    """Items per state; every item that did not finish well, with each attempt's reason."""
    campaign = _open(manifest, profile, config_file, overrides, output_dir, debug, verbose)
    if not campaign.exists:  # nothing to report, and nothing is created for asking
        name = escape(campaign.manifest.name)
        out.print(f"campaign {name} has not been run yet (no store in {campaign.folder}); "
                  f"`studio campaign plan {manifest}` shows what it would make", highlight=False)  # fmt: skip
        return
    status = campaign.status()
    if as_json:
        items = [campaign.item_record(row) for row in status.items]
        print(
            json.dumps({"campaign": status.name, "counts": status.counts, "items": items}, ensure_ascii=False)
        )
        return
    out.print(_counts_line(status.name, status.counts))
    for row in status.items:
        if row.state == "done" and not attempts:
            continue
        axes = ", ".join(f"{k}={v}" for k, v in row.axes.items())
        out.print(f"{row.id[:12]} {row.state:<9} {escape(row.job)} ({escape(axes)}) "
                  f"{escape('; '.join(row.reasons))}")  # fmt: skip
        for attempt in campaign.store.attempts(row.id):
            detail = attempt.message or "; ".join((attempt.qa or {}).get("reasons", [])) or ""
            where = f" in {attempt.stage}" if attempt.stage else ""
            error = f" {attempt.error_class}{where}" if attempt.error_class else ""
            out.print(f"    attempt {attempt.n} seed {attempt.seed}: {attempt.state}{error} {escape(detail)}")


@campaign_app.command("retry")
def retry_command(
    manifest: Manifest,
    failed: Annotated[bool, typer.Option("--failed", help="Failed and blocked items.")] = False,
    failed_qa: Annotated[bool, typer.Option("--failed-qa", help="Items that failed QA (new seeds).")] = False,
    items: Annotated[
        list[str] | None, typer.Option("--item", help="Re-roll this item (id or prefix).")
    ] = None,
    engine: EngineOption = "local",
    address: Address = None,
    workers: Workers = 1,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    output_dir: OutDir = None,
    debug: Debug = False,
    verbose: Verbose = False,
    as_json: Json = False,
) -> None:
    """Run failures again (--failed, --failed-qa), or re-roll chosen items with a new seed (--item)."""
    if not (failed or failed_qa or items):
        from studio.errors import InputError

        raise InputError("Nothing to retry was named.", fix="pass --failed, --failed-qa or --item ID.")
    _check_engine(engine)
    campaign = _open(manifest, profile, config_file, overrides, output_dir, debug, verbose)
    queued = campaign.retry(failed=failed, failed_qa=failed_qa) if failed or failed_qa else 0
    for item in items or []:
        campaign.reroll(item)
        queued += 1
    if not as_json:
        out.print(f"queued {queued} item(s) again")
    _run(campaign, engine, workers, address, as_json, {"queued": queued})


@campaign_app.command("report")
def report_command(
    manifest: Manifest,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    output_dir: OutDir = None,
    debug: Debug = False,
    verbose: Verbose = False,
) -> None:
    """Write a labelled contact sheet per job and one offline HTML page (report/index.html)."""
    campaign = _open(manifest, profile, config_file, overrides, output_dir, debug, verbose)
    files = campaign.report()
    for sheet in files.sheets:
        out.print(f"wrote {sheet}", highlight=False)
    out.print(f"wrote {files.html}", highlight=False)


@campaign_app.command("export")
def export_command(
    manifest: Manifest,
    to: Annotated[Path, typer.Option("--to", help="Folder to export into.")],
    layout: Annotated[
        str, typer.Option("--layout", help="folders (one per axis value), csv or json.")
    ] = "folders",
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    output_dir: OutDir = None,
    debug: Debug = False,
    verbose: Verbose = False,
) -> None:
    """Copy the outputs under human-readable names (a folder per axis value), or write a flat index."""
    if layout not in ("folders", "csv", "json"):
        from studio.errors import InputError

        raise InputError(f"--layout {layout!r} received.", fix="use folders, csv or json.")
    campaign = _open(manifest, profile, config_file, overrides, output_dir, debug, verbose)
    written = campaign.export(to, layout)  # type: ignore[arg-type]
    out.print(f"exported {len(written)} file(s) into {to}", highlight=False)


def _check_engine(engine: str) -> None:
    if engine not in ("local", "ray"):
        from studio.errors import InputError

        raise InputError(f"--engine {engine!r} received.", fix="use --engine local or --engine ray.")


def _run(
    campaign: Any, engine: str, workers: int, address: str | None, as_json: bool, extra: Mapping[str, Any]
) -> None:
    """Run the campaign with a progress bar, then print (or emit as JSON) what the run did."""
    with _progress(enabled=not as_json) as update:
        summary = campaign.run(engine, workers=workers, address=address, progress=update)
    _finish(campaign, summary.counts, as_json, {
        **extra, "attempts": summary.attempts, "drafts_rendered": summary.drafts_rendered,
        "drafts_reused": summary.drafts_reused, "seconds": round(summary.seconds, 2),
    })  # fmt: skip


def _finish(campaign: Any, counts: Mapping[str, int], as_json: bool, extra: Mapping[str, Any]) -> None:
    """Print the final counts; exit 9 when some item did not end done."""
    if as_json:
        print(json.dumps({"campaign": campaign.manifest.name, "counts": dict(counts), **extra}))
    else:
        for note in campaign.store.notes():
            out.print(f"[bold yellow]note:[/] {escape(note)}")
        out.print(_counts_line(campaign.manifest.name, counts))
        out.print(f"folder {campaign.folder}", highlight=False)
    unfinished = sum(counts[s] for s in ("failed_qa", "failed", "blocked"))
    if unfinished:
        err_console.print(f"[bold red]error:[/] {unfinished} item(s) did not pass: see "
                          f"`studio campaign status {campaign.manifest.path}`", highlight=False)  # fmt: skip
        raise typer.Exit(EXIT_NOT_ALL_DONE)


def _counts_line(name: str, counts: Mapping[str, int]) -> str:
    return f"campaign {escape(name)}: " + ", ".join(f"{state} {n}" for state, n in counts.items())


class _progress:
    """A rich bar of finished items with counts per state and an ETA, on a terminal only."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled and err_console.is_terminal
        self.bar: Progress | None = None
        self.start = time.perf_counter()

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=err_console)  # fmt: skip
        self.bar.__enter__()
        self.task = self.bar.add_task("campaign", total=None)
        return self.update

    def update(self, counts: Mapping[str, int]) -> None:
        assert self.bar is not None
        finished = sum(counts[s] for s in ("done", "failed_qa", "failed", "blocked"))
        states = " ".join(f"{s} {n}" for s, n in counts.items() if n)
        self.bar.update(self.task, completed=finished, total=sum(counts.values()), description=states)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
