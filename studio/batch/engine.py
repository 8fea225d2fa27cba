"""The campaign coordinator: hands pending items to workers, writes every file and every state change.

Workers come from a pool: :class:`LocalPool` (worker processes on this machine, the default) or
``studio.batch.ray_engine.RayPool``. The coordinator alone writes the store and the files: a draft that
other unfinished items share is stored losslessly under ``drafts/<draft key>.png`` when it is first rendered,
and each of them reuses it; an output goes to ``outputs/<job>/<recipe id>.png`` (``failed-qa/`` when it
failed the QA gate after its re-rolls) through the output sink, then the item is marked done, in that
order: a killed coordinator leaves at most a complete file whose item is pending, and writing it again is a
no-op.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Protocol

from studio.batch.store import CampaignStore, ItemRow, worker_name
from studio.batch.worker import Outcome, Task, Worker
from studio.errors import RuntimeSetupError, StudioError
from studio.imageio import read_image
from studio.output import FAILED_QA_DIR, OutputSink
from studio.provenance import Provenance
from studio.qa import reroll_seed
from studio.recipe import Recipe

logger = logging.getLogger(__name__)

DRAFTS_DIR, OUTPUTS_DIR = "drafts", "outputs"
Progress = Callable[[Mapping[str, int]], None]  # called with the counts per state after every change


@dataclass(frozen=True)
class Crash:
    """A worker died under a task (its process exited, its Ray actor was lost)."""

    task: Task
    message: str


class Pool(Protocol):
    """Workers that run tasks; ``next`` returns the next finished Outcome or a Crash."""

    size: int

    def submit(self, task: Task) -> None: ...
    def next(self) -> Outcome | Crash: ...
    def close(self) -> None: ...


@dataclass
class RunSummary:
    """What one ``run`` did."""

    counts: dict[str, int]
    attempts: int = 0
    drafts_rendered: int = 0
    drafts_reused: int = 0
    seconds: float = 0.0
    blocked: list[str] = field(default_factory=list)
    notes: dict[str, None] = field(default_factory=dict)  # the outputs' recipe notes, each once


def run_items(
    store: CampaignStore,
    folder: Path,
    pool: Pool,
    *,
    max_rerolls: int,
    provenance: Provenance | None = None,
    progress: Progress | None = None,
) -> RunSummary:
    """Run every pending item of ``store`` on ``pool`` until none is left (outputs marked, signed and
    audited by ``provenance``)."""
    start = time.perf_counter()
    # 1. a killed run's leftovers: running attempts become interrupted, stale temp files go
    sink = OutputSink(folder, provenance=provenance)
    for sub in ("", OUTPUTS_DIR):  # each sweep reaches one level down: drafts/, outputs/<job>/, failed-qa/
        OutputSink(folder / sub).sweep()
    store.recover()
    summary = RunSummary(store.counts())
    in_flight: dict[str, Task] = {}  # item id -> task
    rendering: set[str] = set()  # draft keys a worker is rendering now (their sharers wait)
    while True:
        # 2. keep every worker busy with the next pending item whose draft is not being rendered
        while len(in_flight) < pool.size:
            row = _next_ready(store, in_flight, rendering)
            if row is None:
                break
            task = _task(store, row, folder)
            in_flight[row.id] = task
            if task.draft is None and row.draft_key and row.rerolls == 0:
                rendering.add(row.draft_key)
            pool.submit(task)
            summary.attempts += 1
        if not in_flight:
            break
        # 3. one result back: files first, then its state change (one transaction)
        result = pool.next()
        task = result.task if isinstance(result, Crash) else in_flight[result.item]
        in_flight.pop(task.item)
        rendering.discard(store.item(task.item).draft_key or "")
        if isinstance(result, Crash):
            state = store.fail(task.item, task.attempt, "crashed", error_class="WorkerCrash", stage="worker",
                               message=result.message)  # fmt: skip
            logger.warning("item %s crashed its worker (%s): now %s", task.item[:12], result.message, state)
        else:
            _record(store, sink, folder, task, result, max_rerolls, summary)
        summary.counts = store.counts()
        if progress is not None:
            progress(summary.counts)
    store.add_notes(summary.notes)
    summary.seconds = time.perf_counter() - start
    return summary


def _next_ready(store: CampaignStore, in_flight: Mapping[str, Task], rendering: set[str]) -> ItemRow | None:
    for row in store.items(["pending"]):
        if row.id not in in_flight and not (row.rerolls == 0 and row.draft_key in rendering):
            return row
    return None


def _task(store: CampaignStore, row: ItemRow, folder: Path) -> Task:
    """The item's next attempt: its planned seed, or a re-roll seed derived from its id and re-roll count."""
    seed = row.request.get("seed") if row.rerolls == 0 else reroll_seed(row.id, row.rerolls)
    request = {**row.request, "seed": seed} if row.kind == "generate" else dict(row.request)
    draft = folder / DRAFTS_DIR / f"{row.draft_key}.png"
    reuse = row.kind == "generate" and row.rerolls == 0 and row.draft_key is not None and draft.is_file()
    n = store.start(row.id, seed if row.kind == "generate" else None, worker_name())
    return Task(row.id, n, row.kind, request, row.source, str(draft) if reuse else None)


def _record(
    store: CampaignStore,
    sink: OutputSink,
    folder: Path,
    task: Task,
    outcome: Outcome,
    max_rerolls: int,
    summary: RunSummary,
) -> None:
    row = store.item(task.item)
    if outcome.state in ("failed", "blocked"):
        error = {"error_class": outcome.error_class or "Error", "stage": outcome.stage or ""}
        store.fail(task.item, task.attempt, outcome.state, **error, message=outcome.message or "")
        if outcome.state == "blocked":
            summary.blocked.append(f"{task.item[:12]}: {outcome.message}")
        return
    # 1. a freshly rendered draft is stored once, losslessly, under its key, for every item that shares it
    parent = outcome.draft_image
    if outcome.qa.get("blocked"):
        parent = None  # a blocked picture's draft is not kept either
    elif outcome.draft_image is not None and outcome.draft_recipe is not None:
        draft = Recipe.from_json(outcome.draft_recipe)
        key = draft.draft_key or ""
        if store.sharers(key, task.item):  # kept only for the items that will reuse it
            sink.write_addressed(outcome.draft_image, draft, key, subfolder=DRAFTS_DIR, intermediate=True)
        summary.drafts_rendered += 1
    elif task.draft is not None:
        summary.drafts_reused += 1
        parent = read_image(Path(task.draft))
    # 2. the output (a QA failure with re-rolls left is not written: the item goes again with a new seed)
    recipe = Recipe.from_json(outcome.recipe or "")
    summary.notes.update(dict.fromkeys(recipe.notes))
    reroll = outcome.state == "failed_qa" and task.kind == "generate" and row.rerolls < max_rerolls
    blocked = bool(outcome.qa.get("blocked")) and not reroll
    output = None
    if blocked:  # the content check blocked it: never written, recorded with its scores
        sink.record_blocked(recipe, outcome.qa.get("reasons", []), outcome.qa.get("scores", {}))
        summary.blocked.append(f"{task.item[:12]}: {'; '.join(outcome.qa.get('reasons', []))}")
    elif not reroll:
        sub = f"{OUTPUTS_DIR}/{row.job}" if outcome.state == "done" else f"{OUTPUTS_DIR}/{FAILED_QA_DIR}"
        refined = recipe.refine is not None and recipe.draft is not None
        path = sink.write_addressed(
            outcome.image, recipe, recipe.id, subfolder=sub, parent=parent if refined else None
        )
        output = str(path.relative_to(folder))
    rendered, state = outcome.draft_image is not None, "blocked" if blocked else outcome.state
    store.finish(
        task.item, task.attempt, state, output=output, qa=outcome.qa, draft_rendered=rendered,
        seconds=outcome.seconds, reroll=reroll,
    )  # fmt: skip


# -- the local pool: worker processes on this machine ---------------------------------------------------


class LocalPool:
    """``size`` worker processes, each holding one resident Studio; a dead one is replaced."""

    def __init__(self, config: Mapping[str, Any], size: int = 1, threads: int = 1) -> None:
        self.size, self._config, self._threads = size, dict(config), threads
        self._context = multiprocessing.get_context("spawn")  # no forked torch state
        # started now, waited for at their first task: their imports overlap the coordinator's planning
        self._workers: list[_Process] = [self._spawn() for _ in range(size)]

    def submit(self, task: Task) -> None:
        """Send ``task`` to an idle worker."""
        worker = next(w for w in self._workers if w.task is None)
        if not worker.ready:
            try:
                _await_ready(worker)
            except BaseException:
                self.close()
                raise
        worker.task = task
        with contextlib.suppress(BrokenPipeError, OSError):  # a dead worker: next() reports the crash
            worker.conn.send(task)

    def next(self) -> Outcome | Crash:
        """The next result: an Outcome, or a Crash when a worker died under its task."""
        while True:
            busy = [w for w in self._workers if w.task is not None]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                if worker.conn in ready:
                    try:
                        outcome = worker.conn.recv()
                    except (EOFError, OSError):
                        return self._crashed(worker)
                    worker.task = None
                    return outcome
                if worker.process.sentinel in ready:
                    return self._crashed(worker)

    def close(self) -> None:
        """Stop every worker."""
        for worker in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()

    def _crashed(self, worker: _Process) -> Crash:
        task = worker.task
        assert task is not None  # only busy workers are waited on
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        self._workers[self._workers.index(worker)] = self._spawn()  # ready-checked at its first task
        return Crash(task, f"worker process {worker.process.pid} died (exit code {code})")

    def _spawn(self) -> _Process:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(child, self._config, self._threads), daemon=True, name="studio-worker"
        )
        process.start()
        child.close()
        return _Process(process, parent)


@dataclass
class _Process:
    process: Any  # multiprocessing.Process
    conn: Connection
    task: Task | None = None
    ready: bool = False


def _await_ready(worker: _Process) -> None:
    """Wait for a new worker's Studio; a worker that cannot start stops the run with its own error."""
    ready = wait([worker.conn, worker.process.sentinel])
    message = worker.conn.recv() if worker.conn in ready else None
    if message is None or message[0] != "ready":
        worker.process.join(timeout=5)
        if message is not None and isinstance(message[1], StudioError):
            raise message[1]
        detail = message[1] if message else f"exit code {worker.process.exitcode}"
        raise RuntimeSetupError(
            f"A campaign worker process could not start ({detail}).",
            fix="run with --debug to see its log; check that `studio generate` works with this profile.",
        )
    worker.ready = True


def _serve(conn: Connection, config: Mapping[str, Any], threads: int) -> None:
    """A worker process: tasks in, outcomes out, until told to stop or the coordinator is gone."""
    try:
        worker = Worker(config, threads)
    except StudioError as err:
        conn.send(("error", err))
        return
    except Exception as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the coordinator is gone: nothing to report to
            return
        if task is None:
            return
        conn.send(worker.run(task))
