"""One ASGI app: the HTTP API under ``/api`` and the Gradio UI at ``/``, served by uvicorn.

Safe by default: loopback unless credentials are given; Gradio serves files from the output folder only
(``allowed_paths``), with the identity library, the audit log, the signing keys and the models blocked; one
queue slot per accelerator; uploads capped (``web.max_upload_mb``); no share link, no monitoring dashboard,
no analytics, no server-side rendering process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr
import uvicorn
from fastapi import FastAPI

from studio.web.api import build_api
from studio.web.security import Credentials, check_bind, private_paths
from studio.web.service import WebStudio
from studio.web.ui import build_ui

logger = logging.getLogger(__name__)


def create_app(service: WebStudio, auth: Credentials | None = None) -> FastAPI:
    """The whole web studio as one FastAPI app (what ``serve`` runs; tests mount it in-process too)."""
    app = FastAPI(title="Portrait Studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/api", build_api(service, auth))
    ui = build_ui(service)
    ui.queue(default_concurrency_limit=service.slots, max_size=256)
    gr.mount_gradio_app(
        app,
        ui,
        path="/",
        auth=list(auth.users) if auth else None,
        auth_message="Portrait Studio: sign in with the credentials `studio web --auth` was started with.",
        allowed_paths=[str(service.outputs)],
        blocked_paths=[str(p) for p in private_paths(service.config)],
        max_file_size=service.max_upload_bytes,
        ssr_mode=False,
        enable_monitoring=False,
        mcp_server=False,
        footer_links=["api"],
        pwa=False,
    )
    return app


def serve(service: WebStudio, host: str, port: int, auth: Credentials | None = None) -> None:
    """Serve until interrupted; refuses a non-loopback ``host`` without credentials."""
    check_bind(host, auth)
    app = create_app(service, auth)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    logger.warning("Portrait Studio web UI on %s (API: %sapi/docs)", where, where)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)


@contextmanager
def serving(service: WebStudio, auth: Credentials | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve in a background thread of this process on a free port (tests, benches, notebooks); yields the
    base URL and stops the server on exit."""
    check_bind(host, auth)
    config = uvicorn.Config(create_app(service, auth), host=host, port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="studio-web", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the web studio did not start (see the log above)")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}/"
    finally:
        server.should_exit = True
        thread.join(30)
