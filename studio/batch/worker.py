"""A campaign worker: one resident Studio that turns tasks (an item's request) into outcomes.

Workers never write files or the store: they return pixels and records to the coordinator, which does
both. The same :class:`Worker` runs in a local worker process and inside a Ray actor, so both engines give
the same items and, on CPU, the same bytes (each worker runs single-threaded).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from studio.errors import ContentBlockedError, IdentityError, StudioError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One attempt at an item, as the coordinator sends it."""

    item: str
    attempt: int
    kind: str  # generate | refine
    request: Mapping[str, Any]  # GenerateRequest.to_dict(), with this attempt's seed
    source: str | None = None  # refine jobs: the master image
    draft: str | None = None  # a stored draft (PNG with its recipe) to reuse instead of rendering


@dataclass(frozen=True, eq=False)
class Outcome:
    """What a worker made of a task: the picture and its recipe, the QA verdict, or the error."""

    item: str
    attempt: int
    state: Literal["done", "failed_qa", "failed", "blocked"]
    image: Any = None  # HxWx3 uint8 BGR (numpy), the final picture
    recipe: str | None = None  # its recipe, JSON
    draft_image: Any = None  # HxWx3 uint8 BGR: a draft rendered by this task (stored for reuse)
    draft_recipe: str | None = None
    qa: Mapping[str, Any] = field(default_factory=dict)  # passed, reasons, similarities, status
    error_class: str | None = None
    stage: str | None = None
    message: str | None = None
    seconds: float = 0.0


class Worker:
    """A resident Studio built from a config record; ``run`` never raises for an item's own problems."""

    def __init__(self, config: Mapping[str, Any], threads: int = 1) -> None:
        from studio.config import config_from_dict
        from studio.pipeline import Studio

        # its share of the cores (torch, OpenCV, ONNX Runtime: the Studio applies runtime.threads), so N
        # workers share the machine without oversubscription
        runtime = {**config.get("runtime", {}), "threads": threads}
        self.studio = Studio(config_from_dict({**config, "runtime": runtime}))

    def run(self, task: Task) -> Outcome:
        """Consent → draft (or reuse a stored draft) → refine → QA gate, for one attempt."""
        start, stage = time.perf_counter(), ["start"]
        try:
            outcome = self._run(task, stage)
        except (IdentityError, ContentBlockedError) as err:  # consent revoked, a blocked prompt: blocked
            outcome = _error(task, "blocked", err, stage[0])
        except StudioError as err:
            outcome = _error(task, "failed", err, stage[0])
        except Exception as err:  # a library failure: recorded for this item, the worker goes on
            logger.exception("item %s failed in %s", task.item, stage[0])
            outcome = _error(task, "failed", err, stage[0])
        return replace(outcome, seconds=time.perf_counter() - start)

    def _run(self, task: Task, stage: list[str]) -> Outcome:
        from studio.imageio import read_image, read_metadata
        from studio.recipe import recipe_from_image
        from studio.request import GenerateRequest
        from studio.results import Draft

        studio = self.studio
        request = GenerateRequest.from_dict(task.request)
        # 1. consent, checked when the item starts (an identity revoked since planning blocks it)
        stage[0] = "consent"
        studio.check_cast(request)
        # 2. the picture: the master image, a stored draft, or a fresh draft
        stage[0] = "draft"
        rendered = None
        if task.kind == "refine":
            picture = studio.open(Path(task.source or ""))
        elif task.draft is not None:
            path = Path(task.draft)
            stored = Draft(read_image(path), recipe_from_image(read_metadata(path).recipe, path))
            picture = studio.rebase(stored, request)
        else:
            picture = rendered = studio.draft(request)[0]
        # 3. the content check on the picture, refine (not for a blocked picture), and the QA gate
        stage[0] = "refine"
        result, verdict = studio.judge(picture, request)
        qa = {
            "passed": verdict.passed,
            "reasons": list(verdict.reasons),
            "similarities": list(verdict.similarities),
            "status": getattr(result, "status", "draft"),
            "blocked": verdict.blocked,
            "scores": dict(verdict.scores),
        }
        return Outcome(
            task.item,
            task.attempt,
            "done" if verdict.passed else "failed_qa",
            image=result.image,
            recipe=result.recipe.to_json(),
            draft_image=None if rendered is None else rendered.image,
            draft_recipe=None if rendered is None else rendered.recipe.to_json(),
            qa=qa,
        )


def _error(task: Task, state: Literal["failed", "blocked"], err: Exception, stage: str) -> Outcome:
    message = " ".join(str(err).split()) or type(err).__name__
    return Outcome(
        task.item, task.attempt, state, error_class=type(err).__name__, stage=stage, message=message
    )
