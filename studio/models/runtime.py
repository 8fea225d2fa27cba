"""Device, dtype and ONNX Runtime provider choice; sessions report the providers actually in use.

A requested accelerator that cannot be used is an error, never a silent fall-back to the CPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.config import OnnxProviders, RuntimeConfig
from studio.errors import RuntimeSetupError
from studio.types import Device

if TYPE_CHECKING:  # torch and onnxruntime load in the functions below, when a model is about to load
    import onnxruntime as ort
    import torch

logger = logging.getLogger(__name__)

_PROVIDER_NAMES: dict[OnnxProviders, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
_GPU_HINT = (
    "install the GPU runtime with `uv sync --extra gpu` (onnxruntime-gpu; remove the CPU onnxruntime "
    'wheel, which shadows it) and check the CUDA/cuDNN libraries, or set runtime.onnx_providers = "cpu".'
)


def choose_device(requested: Device) -> torch.device:
    """cuda > mps > cpu for "auto"; an explicitly requested device must be available."""
    import torch

    available = {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available[requested]:
        raise RuntimeSetupError(
            f"runtime.device = {requested!r} but torch reports no {requested} device "
            f"(torch {torch.__version__}).",
            fix='use runtime.device = "auto" or "cpu", or install a torch build for your accelerator.',
        )
    return torch.device(requested)


def choose_dtype(config: RuntimeConfig, device: torch.device) -> torch.dtype:
    """float16 on cuda, float32 elsewhere, unless the config names a dtype."""
    import torch

    if config.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, config.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        raise RuntimeSetupError(
            "runtime.dtype = 'float16' on the CPU: half-precision kernels are missing or very slow there.",
            fix='use runtime.dtype = "auto" or "float32" on the CPU.',
        )
    return dtype


def onnx_providers(requested: OnnxProviders) -> list[str]:
    """The provider list to ask ONNX Runtime for."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "auto":
        preferred = [p for p in ("CUDAExecutionProvider", "CoreMLExecutionProvider") if p in available]
        return [*preferred[:1], "CPUExecutionProvider"]
    name = _PROVIDER_NAMES[requested]
    if name not in available:
        raise RuntimeSetupError(
            f"runtime.onnx_providers = {requested!r} but this onnxruntime {ort.__version__} offers only "
            f"{', '.join(available)}.",
            fix=_GPU_HINT if requested == "cuda" else 'use runtime.onnx_providers = "auto".',
        )
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def check_session_providers(session: Any, requested: Sequence[str], model: Path) -> list[str]:
    """Log the providers a session really uses; an accelerator asked for but not active is an error."""
    active = list(session.get_providers())
    logger.info("%s runs on %s", Path(model).name, ", ".join(active))
    lost = [p for p in requested if p != "CPUExecutionProvider" and p not in active]
    if lost:
        raise RuntimeSetupError(
            f"{Path(model).name}: requested {', '.join(lost)} but ONNX Runtime fell back to "
            f"{', '.join(active)}.",
            fix=_GPU_HINT,
        )
    return active


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once; the CPU affinity respected)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def resolve_threads(threads: int) -> int:
    """``runtime.threads``: the number given, or (0) one per physical core."""
    return threads if threads > 0 else physical_cores()


def apply_threads(threads: int) -> int:
    """Set torch's and OpenCV's intra-op threads to ``runtime.threads`` (resolved); returns the number."""
    import cv2
    import torch

    count = resolve_threads(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    cv2.setNumThreads(count)
    return count


def session_options(threads: int = 0) -> ort.SessionOptions:
    """ORT session options: ``runtime.threads`` intra-op threads (0: one per physical core), one inter-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    return options


def create_session(model: Path, requested: Sequence[str], threads: int = 0) -> ort.InferenceSession:
    """An ORT session for ``model`` on exactly the requested providers."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), session_options(threads), providers=list(requested))
    check_session_providers(session, requested, model)
    return session


def load_insightface_model(model: Path, requested: Sequence[str], threads: int = 0) -> Any:
    """An insightface model-zoo object (SCRFD, ArcFaceONNX, INSwapper, ...) on the requested providers."""
    from insightface.model_zoo import get_model  # heavy import, only when a face model is needed

    # insightface's INSwapper print()s its input shape while loading: keep the terminal for our own output
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        loaded = get_model(str(model), providers=list(requested), sess_options=session_options(threads))
    if chatter.getvalue().strip():
        logger.debug("insightface: %s", chatter.getvalue().strip())
    if loaded is None:
        raise RuntimeSetupError(
            f"insightface does not recognise {Path(model).name} as a detector, recognizer or swapper.",
            fix="check the catalogue entry points at the right ONNX file.",
        )
    check_session_providers(loaded.session, requested, model)
    return loaded
