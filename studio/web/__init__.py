"""The web studio: a Gradio UI and an HTTP API over the same ``Studio`` and campaign store.

``studio web`` serves it (docs/web.md); ``create_app(WebStudio(config))`` builds it in-process.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before any gradio import: no telemetry
