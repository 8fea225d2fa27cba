"""GPU figures at the REAL model dimensions, in one unattended run (about 5 minutes on an H200).

    .venv/bin/python bench/gpu_bench.py [--steps 30] [--short-steps 10] [--rounds 3]
        [--variants sdpa,channels_last,compile] [--compile-mode reduce-overhead] [--refines 20]
        [--budget-s 540] [--root DIR] [--rebuild]

Without a CUDA device it prints why and ``RESULT skipped=no_cuda`` and exits 0 (nothing is built).
With one, it prints the environment (GPU, driver, torch, CUDA, cuDNN, diffusers, transformers,
onnxruntime and its providers; whether the ``onnxruntime-gpu`` wheel is installed), builds the random-weight
models at real dimensions once (``bench/_fullsize.py``: speed does not depend on weight values) and loads
them through the studio (``Studio`` on the tiny profile, ``draft.model`` = the SD 1.5 folder, cuda,
float16 by ``runtime.dtype = "auto"``). Then:

SD 1.5 512x512 fp16, DPM++ 2M Karras, cfg 7 (UNet batch 2), per variant of the same loaded model:
  sdpa           ``performance.channels_last = "off"``: diffusers' default attention processor (SDPA);
  channels_last  ``performance.channels_last = "on"`` (what the studio's "auto" does on cuda);
  compile        channels_last + ``torch.compile(unet, mode=--compile-mode)`` put on the studio's loaded
                 UNet (``--compile-mode default`` uses the studio's own ``performance.compile = true``,
                 which compiles with torch's default mode). Compile time is the warm-up, reported apart.
  Both sides run on the same pipeline object: S = ``Studio.draft``; B = bare ``pipeline.__call__`` with
  the same prompt, negative, seed, size and cfg. Each round is the palindrome S30 B30 S10 B10 B10 S10 B30
  S30 (--steps / --short-steps; drift cancels). Figures, medians over rounds:
    <variant>_its_studio / _its_bare: denoising it/s = (30 - 10) / (t(30) - t(10)): per-call fixed costs
      (text encoding, VAE decode, image conversion) cancel, so this is the UNet loop's rate, the number
      public anchors quote (DESIGN: 4090 40-75, A100 22-60, H100 55-105 it/s);
    <variant>_studio_over_bare: bare it/s / studio it/s (time per step, studio over bare; target <= 1.03);
    <variant>_image_s_studio / _image_s_bare: one whole 30-step 512² image, seconds;
    compile_warmup_s: the compiled variant's warm-up calls (compilation, CUDA graph capture).
fact_overhead_gpu: the FACT adapter's cost per step: one UNet forward (512², batch 2) with the face
  context the studio passed in a ``Studio.draft(identity=..., adapter="fact")`` call, over the same
  forward without it (channels_last variant; rounds of off on on off).
Refine stage: ``Studio.refine`` of the astronaut photo at 1024x1024 (one real face, ~300 px, so the
  full-size Real-ESRGAN x2 runs on its crop, fp16 on cuda) onto an identity enrolled from the same photo:
    refine_ms_per_face: median wall ms per swapped face (detect, embed, swap, upscale, blend, QA);
    refine_provider: the ONNX Runtime provider used: "cuda" (``runtime.onnx_providers = "cuda"``) when
      onnxruntime offers CUDAExecutionProvider, else "cpu" (the CPU provider is measured instead and
      the output says that onnxruntime-gpu is missing);
    face_models: "real" when det_10g, w600k_r50 and inswapper_128 are in the default models folders,
      else "tiny" (the tiny kit's stand-ins: same input/output shapes, much smaller networks, and a
      fixture detector; their ms are NOT those of the real models);
    esrgan_x2_256_ms: the full RRDBNet x2 upscaler alone on a 256x256 crop, fp16.
Sections run in that order, the compile variant last; a section that would overrun --budget-s is skipped
(and the compile warm-up interrupted) so the RESULT line is always printed. It ends with one line:
RESULT gpu=... <variant>_its_studio=... ... fact_overhead_gpu=... refine_ms_per_face=... with "na" for a
figure not measured and <section>_status=skipped_budget|timeout|error for a section that did not finish.
``--device cpu --size 64 --variants sdpa`` runs the same code on the CPU, for checking the script only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import logging
import platform
import signal
import statistics
import subprocess
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from _fullsize import (
    NEGATIVE,
    PROMPT,
    SEED,
    FullsizeKit,
    astronaut_bgr,
    draft_pipeline,
    enrol_astronaut,
    ensure_fullsize,
    open_studio,
)

from studio.config import load_config
from studio.faces.stage import load_face_models, refine_models
from studio.models import open_catalogue
from studio.models.store import locate
from studio.pipeline import Studio
from studio.request import GenerateRequest

VARIANTS = ("sdpa", "channels_last", "compile")
REAL_FACE_MODELS = {"detector": "det_10g", "recognizer": "w600k_r50", "swapper": "inswapper_128"}
NEEDS_S = {"sdpa": 60, "channels_last": 90, "refine": 60, "compile": 150}  # least time left to start one


class _OutOfTime(Exception):
    """The section's share of --budget-s ran out."""


def main() -> None:
    args = _args()
    for name in ("diffusers", "transformers", "peft", "studio", "torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.device == "cuda" and not torch.cuda.is_available():
        _no_cuda()
        return
    started = time.perf_counter()
    deadline = started + args.budget_s
    results = {"gpu": _env(args.device), **_unmeasured(args.variants)}
    kit = ensure_fullsize(args.root, rebuild=args.rebuild)
    print(
        f"models ready in {time.perf_counter() - started:.0f} s (random weights, real dimensions)", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        for variant in [v for v in args.variants if v != "compile"]:
            _section(variant, deadline, results, lambda v=variant: _variant(kit, work, v, args))
        _section("refine", deadline, results, lambda: _refine(kit, work, args))
        if "compile" in args.variants:
            _section("compile", deadline, results, lambda: _variant(kit, work, "compile", args), alarm=True)
    print(f"bench wall time: {(time.perf_counter() - started) / 60:.1f} min")
    print("RESULT " + " ".join(f"{key}={value}" for key, value in results.items()), flush=True)


def _unmeasured(variants: list[str]) -> dict[str, str]:
    """Every figure the RESULT line carries, "na" until its section measures it."""
    keys = [f"{v}_{figure}" for v in variants for figure in ("its_studio", "its_bare", "studio_over_bare")]
    keys += [f"{v}_image_s_{side}" for v in variants for side in ("studio", "bare")]
    keys += ["compile_warmup_s"] if "compile" in variants else []
    keys += ["fact_overhead_gpu"] if "channels_last" in variants else []
    keys += ["refine_ms_per_face", "refine_provider", "face_models", "esrgan_x2_256_ms"]
    return dict.fromkeys(keys, "na")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="steps of the long calls")
    parser.add_argument("--short-steps", type=int, default=10, help="steps of the short calls")
    parser.add_argument("--rounds", type=int, default=3, help="palindromic rounds of 8 calls per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        choices=("reduce-overhead", "max-autotune-no-cudagraphs", "default"),
        help="torch.compile mode for the compile variant (default: the studio's performance.compile)",
    )
    parser.add_argument("--fact-rounds", type=int, default=10, help="rounds of off on on off UNet forwards")
    parser.add_argument("--refines", type=int, default=20, help="timed refines of the 1024² photo")
    parser.add_argument("--esrgan-repeats", type=int, default=20, help="timed upscales of a 256² crop")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip sections that would overrun")
    parser.add_argument("--size", type=int, default=512, help="draft size in px (512: SD 1.5's own)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: check the script")
    parser.add_argument("--root", type=Path, default=None, help="model cache (default: the builder's)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the random-weight models")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if not 1 <= args.short_steps < args.steps or min(args.rounds, args.fact_rounds, args.refines) < 1:
        parser.error("need 1 <= --short-steps < --steps and --rounds, --fact-rounds, --refines >= 1")
    return args


# -- environment ------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "insightface"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def _no_cuda() -> None:
    versions = _versions()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    print(
        f"gpu_bench: no CUDA device: torch {torch.__version__} ({build}) reports torch.cuda.is_available() "
        f"= False on {platform.node() or 'this machine'} (device count {torch.cuda.device_count()})."
    )
    print(
        f"  diffusers {versions['diffusers']}, onnxruntime {versions['onnxruntime']} "
        f"(onnxruntime-gpu: {versions['onnxruntime-gpu']}), providers: {', '.join(_ort_providers())}"
    )
    print("  nothing was built or measured; run this on a machine with an NVIDIA GPU.")
    print("RESULT skipped=no_cuda", flush=True)


def _env(device: str) -> str:
    """Print the environment; returns the GPU's name for the RESULT line (spaces as underscores)."""
    versions = _versions()
    providers = _ort_providers()
    print(f"gpu_bench on {platform.node()}, Python {platform.python_version()}")
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        print(
            f"GPU: {name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
            f"{props.major}.{props.minor}, {torch.cuda.device_count()} device(s); driver {_driver()}"
        )
    else:
        name = f"cpu-{platform.machine()}"
        print("device: cpu (script check only: these are not GPU figures)")
    print(
        f"torch {versions['torch']} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
        f"diffusers {versions['diffusers']}, transformers {versions['transformers']}, "
        f"insightface {versions['insightface']}"
    )
    print(
        f"onnxruntime {versions['onnxruntime']}, onnxruntime-gpu {versions['onnxruntime-gpu']}; "
        f"providers: {', '.join(providers) or 'none'}"
    )
    if "CUDAExecutionProvider" not in providers:
        wheel = versions["onnxruntime-gpu"]
        why = (
            "not installed" if wheel == "not installed" else f"{wheel}, shadowed or unable to load CUDA/cuDNN"
        )
        print(
            f"  note: onnxruntime offers no CUDAExecutionProvider (the onnxruntime-gpu wheel: {why}); the "
            "refine stage is measured on the CPU provider instead."
        )
    return name.replace(" ", "_")


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi not available)"


# -- sections ---------------------------------------------------------------------------------------------


def _section(
    name: str,
    deadline: float,
    results: dict[str, str],
    run: Callable[[], dict[str, str]],
    *,
    alarm: bool = False,
) -> None:
    """Run one section if there is time; its figures (or why there are none) go into ``results``."""
    left = deadline - time.perf_counter()
    if left < NEEDS_S.get(name, 60):
        print(
            f"\n[{name}] skipped: {left:.0f} s of --budget-s left, it needs about {NEEDS_S.get(name, 60)} s"
        )
        results[f"{name}_status"] = "skipped_budget"
        return
    print(f"\n[{name}] ({left:.0f} s of budget left)", flush=True)
    try:
        with _alarm(max(1, int(left) - 15) if alarm else 0):
            results.update(run())
    except _OutOfTime:
        print(f"[{name}] interrupted: out of --budget-s")
        results[f"{name}_status"] = "timeout"
    except Exception as err:  # unattended: report it, keep the other sections' figures
        traceback.print_exc()
        print(f"[{name}] failed: {type(err).__name__}: {err}")
        results[f"{name}_status"] = "error"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    """Raise _OutOfTime in the main thread after ``seconds`` (0: no limit)."""
    if seconds <= 0:
        yield
        return

    def ring(_signum: int, _frame: Any) -> None:
        raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(max(1, seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(call: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    call()
    _sync()
    return time.perf_counter() - start


# -- SD 1.5 variants --------------------------------------------------------------------------------------


@dataclass
class _Sides:
    """The studio's draft call and the bare diffusers call on the same pipeline object."""

    studio: Studio
    pipe: Any
    size: int

    def request(self, steps: int, **changes: Any) -> GenerateRequest:
        base = GenerateRequest(
            prompt=PROMPT,
            negative=NEGATIVE,
            seed=SEED,
            width=self.size,
            height=self.size,
            steps=steps,
            cfg=7.0,
        )
        return replace(base, **changes)

    def studio_call(self, steps: int) -> None:
        self.studio.draft(self.request(steps))

    def bare_call(self, steps: int) -> None:
        self.pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            width=self.size,
            height=self.size,
            num_inference_steps=steps,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(SEED),
        )


def _variant(kit: FullsizeKit, work: Path, name: str, args: argparse.Namespace) -> dict[str, str]:
    """Studio vs bare it/s for one variant (and, on channels_last, the FACT step cost)."""
    extra = [f"performance.channels_last={'off' if name == 'sdpa' else 'on'!r}"]
    if name == "compile" and args.compile_mode == "default":
        extra.append("performance.compile=true")  # the studio's own switch: torch's default mode
    studio, load_s = open_studio(
        kit, work / name, threads=0, device=args.device, size=args.size, steps=args.steps, extra=extra
    )
    pipe = draft_pipeline(studio)
    if name == "compile" and args.compile_mode != "default":
        pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode)
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    print(
        f"loaded through the studio in {load_s:.1f} s: {pipe.unet.dtype}, on {pipe.unet.device}, attention "
        f"{', '.join(processors)}, channels_last {name != 'sdpa'}"
        + (f", torch.compile mode {args.compile_mode}" if name == "compile" else ""),
        flush=True,
    )
    sides = _Sides(studio, pipe, args.size)
    long, short = args.steps, args.short_steps
    calls: dict[str, Callable[[], None]] = {
        "S_long": lambda: sides.studio_call(long),
        "B_long": lambda: sides.bare_call(long),
        "S_short": lambda: sides.studio_call(short),
        "B_short": lambda: sides.bare_call(short),
    }
    start = time.perf_counter()
    for key in ("S_short", "B_short", "S_long", "B_long"):  # compile / graph capture happen here
        print(f"  warm-up {key:8s} {_timed(calls[key]):7.2f} s", flush=True)
    warmup_s = time.perf_counter() - start
    order = ("S_long", "B_long", "S_short", "B_short", "B_short", "S_short", "B_long", "S_long")
    per_round: dict[str, list[float]] = {"S_its": [], "B_its": [], "S_image": [], "B_image": []}
    for k in range(args.rounds):
        got: dict[str, list[float]] = {key: [] for key in calls}
        for key in order:
            got[key].append(_timed(calls[key]))
        for side in ("S", "B"):
            t_long, t_short = statistics.mean(got[f"{side}_long"]), statistics.mean(got[f"{side}_short"])
            per_round[f"{side}_its"].append((long - short) / (t_long - t_short))
            per_round[f"{side}_image"].append(t_long)
        print(
            f"  round {k + 1}/{args.rounds}: studio {per_round['S_its'][-1]:6.2f} it/s "
            f"({per_round['S_image'][-1]:.3f} s/image), bare {per_round['B_its'][-1]:6.2f} it/s "
            f"({per_round['B_image'][-1]:.3f} s/image)",
            flush=True,
        )
    med = {key: statistics.median(values) for key, values in per_round.items()}
    ratio = statistics.median([b / s for s, b in zip(per_round["S_its"], per_round["B_its"], strict=True)])
    print(
        f"  {name}: studio {med['S_its']:.2f} it/s, bare {med['B_its']:.2f} it/s -> studio/bare time per "
        f"step {ratio:.4f}; whole {long}-step image studio {med['S_image']:.3f} s, bare "
        f"{med['B_image']:.3f} s (ratio {med['S_image'] / med['B_image']:.4f}); warm-up {warmup_s:.1f} s"
    )
    figures = {
        f"{name}_its_studio": f"{med['S_its']:.2f}",
        f"{name}_its_bare": f"{med['B_its']:.2f}",
        f"{name}_studio_over_bare": f"{ratio:.4f}",
        f"{name}_image_s_studio": f"{med['S_image']:.3f}",
        f"{name}_image_s_bare": f"{med['B_image']:.3f}",
    }
    if name == "compile":
        figures["compile_warmup_s"] = f"{warmup_s:.1f}"
    if name == "channels_last":
        figures |= _fact(sides, work / name, args)
    if name == "compile":
        torch._dynamo.reset()  # drop compiled graphs with the model
    return figures


def _fact(sides: _Sides, work: Path, args: argparse.Namespace) -> dict[str, str]:
    """One UNet forward with the studio's FACT context over the same forward without it."""
    enrol_astronaut(sides.studio, work)
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    handle = sides.pipe.unet.register_forward_pre_hook(
        lambda _m, a, kw: captured.append((a, dict(kw))), with_kwargs=True
    )
    try:  # the studio loads and attaches the adapter, and passes the face context to the UNet
        sides.studio.draft(sides.request(1, identity="anna", adapter="fact", adapter_scale=1.0))
    finally:
        handle.remove()
    call_args, kwargs = captured[-1]
    if "gligen" not in (kwargs.get("cross_attention_kwargs") or {}):
        raise RuntimeError("the studio's FACT draft passed no face context to the UNet")
    sample = call_args[0]  # [2, 4, h, w], the studio's own latents, dtype and device
    sides_kwargs = {"on": kwargs, "off": {**kwargs, "cross_attention_kwargs": None}}

    def forward(side: str) -> float:
        with torch.no_grad():
            return _timed(lambda: sides.pipe.unet(sample, *call_args[1:], **sides_kwargs[side]))

    for side in ("on", "off", "on", "off"):
        forward(side)  # warm-up
    ratios = []
    for _ in range(args.fact_rounds):
        got = {side: 0.0 for side in sides_kwargs}
        for side in ("off", "on", "on", "off"):
            got[side] += forward(side)
        ratios.append(got["on"] / got["off"])
    ratio = statistics.median(ratios)
    print(
        f"  FACT on / off, one UNet forward {tuple(sample.shape)} {sample.dtype}: {ratio:.4f} "
        f"(median of {args.fact_rounds} rounds; min {min(ratios):.4f}, max {max(ratios):.4f})"
    )
    return {"fact_overhead_gpu": f"{ratio:.4f}"}


# -- refine stage ------------------------------------------------------------------------------------------


def _real_face_paths() -> dict[str, Path] | None:
    """The real detector, recognizer and swapper files, if all three are in the default model folders."""
    config = load_config("default")
    catalogue = open_catalogue(config)
    found = {role: locate(catalogue[name], config.models) for role, name in REAL_FACE_MODELS.items()}
    if any(path is None for path in found.values()):
        return None
    return {role: path for role, path in found.items() if path is not None}


def _refine(kit: FullsizeKit, work: Path, args: argparse.Namespace) -> dict[str, str]:
    """ms per face of ``Studio.refine`` on the CUDA provider (else the CPU one, said so), and the upscaler."""
    provider = "cuda" if "CUDAExecutionProvider" in _ort_providers() else "cpu"
    real = _real_face_paths()
    extra = [f"runtime.onnx_providers={provider!r}"]
    if real is not None:
        folders = sorted({str(path.parent) for path in real.values()})
        extra += [f"models.search_paths={folders!r}"]
        extra += [f"refine.{role}={name!r}" for role, name in REAL_FACE_MODELS.items()]
    models = "real" if real else "tiny"
    if real:
        which = ", ".join(REAL_FACE_MODELS.values())
    else:
        which = (
            "the tiny kit's tiny-det, tiny-arcface, tiny-inswapper: small stand-ins with the real inputs and "
            "outputs; NOT the real models' speed"
        )
    missing = (
        ""
        if provider == "cuda"
        else " (onnxruntime offers no CUDAExecutionProvider: onnxruntime-gpu missing)"
    )
    print(
        f"face models: {models} ({which}); upscaler: the full-size RRDBNet x2; ONNX Runtime provider: "
        f"{provider}{missing}"
    )
    overrides = [*kit.overrides(work / "refine", threads=0, device=args.device), *extra]
    studio = Studio(load_config("tiny", overrides=overrides))
    enrol_astronaut(studio, work / "refine")
    picture = astronaut_bgr(1024)
    for _ in range(2):
        refined = studio.refine(picture, "anna")  # loads the models, ORT sessions, cuDNN plans
    times = []
    for _ in range(args.refines):
        start = time.perf_counter()
        refined = studio.refine(picture, "anna")
        times.append((time.perf_counter() - start) * 1000.0)
    record = refined.recipe.refine
    faces = len(refined.qa)
    per_refine = statistics.median(times)
    print(
        f"  refine 1024² -> status {refined.status}, faces swapped {faces}, upscaled "
        f"{list(record.upscaled) if record else []}, last timings (ms) "
        f"{dict(record.timings_ms) if record else {}}"
    )
    print(f"  Studio.refine: {per_refine:.1f} ms per call (median of {args.refines}; min {min(times):.1f})")
    figures = {
        "refine_ms_per_face": f"{per_refine / faces:.1f}" if faces else "na",
        "refine_provider": provider,
        "face_models": models,
    }
    config = studio.config
    upscaler = load_face_models(refine_models(config, studio.catalogue), config, studio.cache).upscaler
    if upscaler is not None:
        crop = astronaut_bgr(256)
        for _ in range(3):
            upscaler.upscale(crop)  # warm-up
        ms = [_timed(lambda: upscaler.upscale(crop)) * 1000.0 for _ in range(args.esrgan_repeats)]
        print(
            f"  Real-ESRGAN x2 (full RRDBNet) on 256²: {statistics.median(ms):.2f} ms (median of {len(ms)})"
        )
        figures["esrgan_x2_256_ms"] = f"{statistics.median(ms):.2f}"
    return figures


if __name__ == "__main__":
    with warnings.catch_warnings():
        # skimage's SimilarityTransform.estimate, called by insightface during enrolment
        warnings.simplefilter("ignore", FutureWarning)
        main()
