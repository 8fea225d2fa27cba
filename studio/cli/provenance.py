"""``studio verify IMAGE...`` and ``studio audit show | verify``: thin clients over verify and the log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from studio.cli.common import ConfigFile, Debug, Json, Overrides, Profile, out, setup_logging_and_config

audit_app = typer.Typer(help="The audit log: every enrolment, use, revocation, removal and output.")
EXIT_NOT_VERIFIED = 10  # an image is not signed, watermarked and audited, or the log is broken


def verify_command(
    images: Annotated[list[Path], typer.Argument(help="Images to check.")],
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    as_json: Json = False,
) -> None:
    """Say for each image: C2PA credentials, watermark, recipe, audit entry (exit 10 if one lacks)."""
    config = setup_logging_and_config(profile, config_file, overrides, debug)
    from studio.verify import verify_image

    results = [verify_image(path, config) for path in images]
    if as_json:
        print(json.dumps([_json(r) for r in results], ensure_ascii=False))
    for result in results if not as_json else ():
        out.print(f"[bold]{escape(str(result.path))}[/]", highlight=False)
        out.print(f"  C2PA: {result.credentials.state} — {escape(result.credentials.reason)}")
        out.print(f"  watermark: {escape(result.watermark)}")
        recipe = result.recipe
        out.print(
            f"  recipe: {recipe.id if recipe else 'none'}"
            + (f" ({', '.join(recipe.stages)})" if recipe else "")
        )
        entry = result.audit
        audit = f"entry {entry.seq} ({entry.event}, {entry.time})" if entry else "no entry for these bytes"
        out.print(f"  audit: {audit}" + (f"; {escape(result.audit_problem)}" if result.audit_problem else ""))
        out.print(f"  verdict: {'signed, watermarked and audited' if result.ok else 'NOT verified'}")
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_NOT_VERIFIED)


@audit_app.command("show")
def audit_show(
    identity: Annotated[
        str | None, typer.Option("--identity", help="Only entries naming this identity.")
    ] = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    as_json: Json = False,
) -> None:
    """List the audit log's entries (hashes and facts, never biometrics)."""
    config = setup_logging_and_config(profile, config_file, overrides, debug)
    from studio.audit import AuditLog

    entries = AuditLog(config.audit.log).entries(identity)
    if as_json:
        print(json.dumps([e.__dict__ for e in entries], ensure_ascii=False, default=dict))
        return
    for entry in entries:
        who = ", ".join(f"{n} ({sha[:12]})" for n, sha in entry.identities.items()) or "-"
        facts = ", ".join(f"{k}={v}" for k, v in entry.data.items() if k in _SHOWN)
        out.print(
            f"{entry.seq:>5} {entry.time} {entry.event:<7} {escape(who)} {escape(facts)}", highlight=False
        )


@audit_app.command("verify")
def audit_verify(
    against: Annotated[
        list[Path] | None,
        typer.Option("--against", help="Also check the log head these images' credentials name."),
    ] = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
) -> None:
    """Check the hash chain (edited, removed, reordered entries), and a cut tail against images."""
    config = setup_logging_and_config(profile, config_file, overrides, debug)
    from studio.audit import AuditLog
    from studio.verify import verify_image

    log = AuditLog(config.audit.log)
    check = log.verify()
    problems = list(check.problems)
    for image in against or []:
        problem = verify_image(image, config, log).audit_problem
        if problem:
            problems.append(f"{image}: {problem}")
    out.print(f"{log.path}: {check.entries} entries, head {check.head[:12]}…", highlight=False)
    for problem in problems:
        out.print(f"[bold red]problem:[/] {escape(problem)}")
    if problems:
        raise typer.Exit(EXIT_NOT_VERIFIED)
    out.print("intact")


_SHOWN = (
    "path",
    "recipe_id",
    "purpose",
    "scope",
    "expires",
    "revoked",
    "watermark",
    "c2pa",
    "marks_off",
    "sha256",
)


def _json(result: object) -> dict[str, object]:
    from studio.verify import Verification

    assert isinstance(result, Verification)
    return {
        "path": str(result.path),
        "c2pa": result.credentials.state,
        "c2pa_reason": result.credentials.reason,
        "watermark": result.watermark,
        "watermarked": result.watermarked,
        "recipe_id": result.recipe.id if result.recipe else None,
        "audit_seq": result.audit.seq if result.audit else None,
        "audit_problem": result.audit_problem,
        "ok": result.ok,
    }
