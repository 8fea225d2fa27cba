"""``studio web``: the browser UI and the HTTP API (a thin client over the same ``Studio``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from studio.cli.common import (
    ConfigFile,
    Debug,
    OutDir,
    Overrides,
    Profile,
    Verbose,
    err_console,
    setup_logging_and_config,
)
from studio.config import WebConfig, limits


def web_command(
    host: Annotated[
        str | None, typer.Option("--host", help="Address to listen on (default: web.host, 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", **limits(WebConfig, "port"), help="Port (default: web.port).")
    ] = None,
    auth: Annotated[
        str | None, typer.Option("--auth", help="USER:PASS for the UI and the API (visible in `ps`).")
    ] = None,
    auth_file: Annotated[
        Path | None, typer.Option("--auth-file", help="A chmod-600 file of USER:PASS lines.")
    ] = None,
    output_dir: OutDir = None,
    profile: Profile = "default",
    config_file: ConfigFile = None,
    overrides: Overrides = None,
    debug: Debug = False,
    verbose: Verbose = False,
) -> None:
    """Serve the web studio (Generate, Re-face, Identities, Campaigns, Models) and its HTTP API."""
    from studio.web.security import check_bind, credentials

    layers = [*(overrides or []), *([f"output_dir={str(output_dir)!r}"] if output_dir else [])]
    config = setup_logging_and_config(profile, config_file, layers, debug, verbose)
    users = credentials(auth, auth_file)
    host, port = host or config.web.host, port or config.web.port
    check_bind(host, users)  # before any model library or UI is loaded
    from studio.web.app import serve
    from studio.web.service import WebStudio

    service = WebStudio(config, profile=profile, user_file=config_file, overrides=layers)
    err_console.print(f"Portrait Studio on http://{host}:{port}/ (API: /api/docs); Ctrl+C stops it")
    serve(service, host, port, users)
