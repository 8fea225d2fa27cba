"""The Ray engine: campaign workers as Ray actors, on this machine or on a cluster (``--engine ray``).

:class:`RayPool` is a ``Pool`` for the coordinator (``studio.batch.engine.run_items``), with the semantics
of ``LocalPool``: each actor holds one resident :class:`~studio.batch.worker.Worker` (one Studio,
single-threaded torch), runs one task at a time and returns its Outcome (pixels as numpy arrays) to the
driver, which alone writes files and the store. An actor that dies under a task is reported as a
``Crash`` and replaced; an actor that cannot start stops the run with its own error. Ray is an optional
extra: it is imported only here, when the pool is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from studio.batch.engine import Crash
from studio.batch.worker import Outcome, Task, Worker
from studio.errors import RuntimeSetupError, StudioError

logger = logging.getLogger(__name__)

_MESSAGE_CHARS = 300  # a Ray error message is a multi-line report: the store keeps one line of it


class RayPool:
    """``size`` Ray actors, each holding one resident Studio; a dead one is replaced."""

    def __init__(
        self, config: Mapping[str, Any], size: int = 1, address: str | None = None, threads: int = 1
    ) -> None:
        self.size, self._config, self._threads = size, dict(config), threads
        self._ray = _import_ray()
        self._started = _connect(self._ray, size, address)
        self._actors: list[_Actor] = []
        try:
            self._remote = self._ray.remote(num_cpus=1, num_gpus=self._gpus_per_actor())(_RayWorker)
            self._actors = [_Actor(self._spawn()) for _ in range(size)]
            _await_ready(self._ray, [a.handle for a in self._actors])
        except BaseException:
            self.close()
            raise

    def submit(self, task: Task) -> None:
        """Send ``task`` to an idle actor."""
        actor = next(a for a in self._actors if a.task is None)
        actor.task, actor.ref = task, actor.handle.run.remote(task)

    def next(self) -> Outcome | Crash:
        """The next result: an Outcome, or a Crash when an actor died under its task."""
        ray = self._ray
        busy = {a.ref: a for a in self._actors if a.task is not None}
        [ref], _ = ray.wait(list(busy), num_returns=1)
        actor = busy[ref]
        task = actor.task
        assert task is not None  # only busy actors are waited on
        actor.task, actor.ref = None, None
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the actor lives on (Worker.run catches item errors)
            return Crash(task, f"Ray task failed: {_one_line(err)}")
        except ray.exceptions.RayError as err:  # RayActorError, ActorDiedError, WorkerCrashedError, OOM...
            return self._crashed(actor, task, err)

    def close(self) -> None:
        """Stop every actor (and the local Ray instance, when this pool started it)."""
        for actor in self._actors:
            with contextlib.suppress(Exception):  # already dead, or Ray already gone
                self._ray.kill(actor.handle, no_restart=True)
        self._actors = []
        if self._started:
            self._started = False
            self._ray.shutdown()

    def _crashed(self, actor: _Actor, task: Task, err: Exception) -> Crash:
        """Replace the dead actor; the task is reported as a crash."""
        logger.warning("Ray actor died under item %s: %s", task.item[:12], _one_line(err))
        with contextlib.suppress(Exception):
            self._ray.kill(actor.handle, no_restart=True)
        actor.handle = self._spawn()
        _await_ready(self._ray, [actor.handle])
        return Crash(task, f"Ray actor died ({type(err).__name__}: {_one_line(err)})")

    def _spawn(self) -> Any:
        return self._remote.remote(self._config, self._threads)

    def _gpus_per_actor(self) -> float:
        """One GPU per actor when the cluster has GPUs and the config does not ask for the CPU; actors
        share the GPUs (fractions) when there are fewer GPUs than actors, rather than wait forever."""
        device = str(self._config.get("runtime", {}).get("device", "auto"))
        gpus = float(self._ray.cluster_resources().get("GPU", 0))
        if device == "cpu" or gpus <= 0:
            return 0
        if gpus >= self.size:
            return 1
        share = int(gpus / self.size * 10_000) / 10_000  # Ray's resource precision
        logger.warning("%d Ray actors share %g GPU(s): %g GPU each", self.size, gpus, share)
        return share


@dataclass
class _Actor:
    handle: Any  # ray.actor.ActorHandle of _RayWorker
    task: Task | None = None
    ref: Any = None  # ray.ObjectRef of the task's Outcome


class _RayWorker:
    """A Ray actor: one Worker; a Worker that cannot start is reported by ``ready``, not by a dead actor."""

    def __init__(self, config: Mapping[str, Any], threads: int) -> None:
        self.worker: Worker | None = None
        self.error: StudioError | str | None = None
        try:
            self.worker = Worker(config, threads)
        except StudioError as err:
            self.error = err
        except Exception as err:
            logger.exception("a campaign worker could not start")
            self.error = f"{type(err).__name__}: {err}"

    def ready(self) -> StudioError | str | None:
        """None when the Worker is ready, else why it could not start."""
        return self.error

    def run(self, task: Task) -> Outcome:
        """Run one attempt (Worker.run never raises for an item's own problems)."""
        if self.worker is None:
            raise RuntimeError(f"this worker did not start: {self.error}")
        return self.worker.run(task)


# Ray replicates a driver started by `uv run` onto its workers (RAY_ENABLE_UV_RUN_RUNTIME_ENV, on by
# default): each worker then runs `uv run` in an uploaded copy of the working folder, builds a fresh
# environment there and times out on start. The studio's workers use the driver's own environment (the same
# paths on every node), so the hook is off unless the user set it; Ray reads it when it is first imported.
UV_HOOK = "RAY_ENABLE_UV_RUN_RUNTIME_ENV"


def _import_ray() -> Any:
    os.environ.setdefault(UV_HOOK, "0")
    try:
        import ray
    except ImportError as err:
        raise RuntimeSetupError(
            f"--engine ray needs Ray, which is not installed here ({err}).",
            fix="install the ray extra: uv sync --extra ray (or pip install 'portrait-studio[ray]')",
        ) from err
    return ray


def _connect(ray: Any, size: int, address: str | None) -> bool:
    """Join the running Ray instance, the cluster at ``address``, or start a local one (returns True)."""
    if ray.is_initialized():
        if address is not None:
            logger.warning("Ray is already initialised in this process: --address %s is not used", address)
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    try:
        if address is not None:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=size, include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RuntimeSetupError(
            f"Could not start or join {where}: {_one_line(err)}",
            fix="check the address (ray status on the head node), or drop --address to run on this machine.",
        ) from err
    return True


def _await_ready(ray: Any, handles: list[Any]) -> None:
    """Wait for new actors' Studios; an actor that cannot start stops the run with its own error."""
    for handle in handles:
        try:
            problem = ray.get(handle.ready.remote())
        except ray.exceptions.RayError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, StudioError):
                raise cause from err
            problem = f"{type(err).__name__}: {_one_line(err)}"
        if isinstance(problem, StudioError):
            raise problem
        if problem is not None:
            raise RuntimeSetupError(
                f"A campaign worker (Ray actor) could not start ({problem}).",
                fix="see the actor's log (ray logs, or the driver's output); check that `studio generate` "
                "works with this profile on the worker nodes.",
            )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"
