"""Honest CPU figures at the REAL model dimensions: SD 1.5 at 512x512, a full FACT adapter, Real-ESRGAN x2.

    .venv/bin/python bench/fullsize_bench.py [--threads 2] [--rounds 1] [--adapter-rounds 3]
                                             [--esrgan-repeats 3] [--retries 3] [--root DIR]
                                             [--rebuild] [--sdxl]

The models are random-weight copies of the real architectures (``bench/_fullsize.py`` builds them once
into ``~/.cache/portrait-studio/fullsize``: 4.5 GB, about a minute; ``--rebuild`` builds them again);
speed does not depend on weight values. The studio loads them through its real code: ``Studio`` on the
tiny profile with ``draft.model`` = the SD 1.5 diffusers folder, 512x512, 1 step, cfg 7 (so the UNet runs
on a batch of 2), upscaler and adapter from the kit's catalogue, the identity enrolled from scikit-image's
astronaut with the tiny profile's detector and recognizer. torch runs ``--threads`` intra-op threads and
ONNX Runtime (enrolment) as many (``runtime.threads``).

Every timing is taken twice: wall clock (what a user waits; the RESULT line) and the process's CPU time
(``time.process_time``, all threads), which other work on a shared machine inflates far less. CPU time
counts single-threaded Python glue once but multi-threaded model compute ``--threads`` times, so it
understates the studio's serial overhead: read it only when the wall-clock A/A control says the machine
was busy (the bench prints a note then). Forward hooks time the text encoder, the UNet and the VAE
decoder inside each call; what is left ("rest") is glue. Each timed call also reports the CPU cores it
kept busy: one that kept fewer than 85 % of its threads busy was slowed by other work on the machine and
is measured again in its place (at most ``--retries`` times per run; the report counts them).

(a) studio_over_bare_fullsize: whole calls, median over rounds of the round's ratio; each round runs
    S B B' B' B S (so S/B and B'/B are both A B B A, and drift cancels):
      S   ``Studio.draft``: prompt embeddings (compel; cached after the first call, as in real use), one
          UNet step on batch 2, VAE decode, PIL -> BGR array;
      B   a bare ``StableDiffusionPipeline.__call__`` on the SAME loaded components (the studio's own
          diffusers pipeline object and scheduler), same prompt, negative, seed, size, steps and cfg:
          CLIP text encoding of prompt and negative, one UNet step on batch 2, VAE decode, PIL image;
      B'  the same bare call again: aa_pct = 100 * (B'/B - 1) is the noise floor of (a).
    Target <= 1.03. The UNet step alone (studio / bare) is printed too.
(b) adapter_overhead_fullsize: one UNet forward (512x512, batch 2) with the FACT face context the studio
    itself passed to the UNet in a ``Studio.draft(identity=..., adapter="fact")`` call (captured by a hook;
    the adapter loaded and attached by the studio), against the same forward without it, in rounds of
    off on on off: what every denoising step costs. Compass <= 1.25; the FLOPs counted below give ~1.22.
(c) esrgan_x2_256_ms: Real-ESRGAN x2 (full RRDBNet: 64 features, 23 blocks) on one 256x256 BGR crop
    through the studio's ``Upscaler.upscale`` (loaded by ``load_face_models``): median wall ms.
FLOPs: the UNet step (with and without FACT) and the VAE decode are also counted on the meta device
(``torch.utils.flop_counter``, no compute): the noise-free size of what is timed.
With ``--sdxl`` SDXL is built too (7 GB disk) and one S B B S round at 1024x1024 prints the SDXL studio /
bare ratio (not in the RESULT line; float32 on the CPU: 14 GB of RAM and minutes per call).
The run ends with one line (wall-clock figures):
RESULT studio_over_bare_fullsize=... adapter_overhead_fullsize=... aa_pct=... esrgan_x2_256_ms=...
Defaults take about 7 minutes on 2 CPU cores (one SD 1.5 call is about 30 s here), more when they are busy.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

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

from studio.adapter import FaceAdapter, FaceContext, attach
from studio.adapter.weights import read_adapter_spec
from studio.faces.stage import load_face_models, refine_models
from studio.pipeline import Studio
from studio.request import GenerateRequest

SIZE = 512
ROUND_A = ("S", "B", "B2", "B2", "B", "S")  # palindrome: every side has the same mean position
ROUND_B = ("off", "on", "on", "off")
SIDE_NAMES = {"S": "studio draft", "B": "bare diffusers", "B2": "bare again (A/A)"}
CLOCKS = ("wall", "cpu")
MIN_SHARE = 0.85  # of the torch threads a timed call keeps busy; less: other work slowed it (see _Retries)
BUSY_AA_PCT = 3.0  # an A/A control further from 0 than this: other work on the machine swamped the wall clock


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)  # fixed, so both sides of each ratio run alike
    for name in ("diffusers", "transformers", "peft", "studio"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started = time.perf_counter()
    print(f"fullsize_bench: torch {torch.__version__}, {args.threads} torch threads (ONNX Runtime alike)")
    kit = ensure_fullsize(args.root, sdxl=args.sdxl, rebuild=args.rebuild)
    flops = _count_flops(kit)
    print(
        f"FLOPs counted (meta device): UNet step, batch 2 at {SIZE}²: {flops['unet'] / 1e12:.2f} T, "
        f"with FACT {flops['fact'] / 1e12:.2f} T (x{flops['fact'] / flops['unet']:.3f}); VAE decode {SIZE}²: "
        f"{flops['vae'] / 1e12:.2f} T"
    )
    with tempfile.TemporaryDirectory(prefix="fullsize-bench-") as tmp:
        studio, load_s = open_studio(kit, Path(tmp), threads=args.threads, size=SIZE)
        print(f"loaded SD 1.5 (random weights, real dims) through the studio in {load_s:.1f} s", flush=True)
        enrol_astronaut(studio, Path(tmp))
        bench = _DraftBench(studio, SIZE, args.retries)
        bench.warm_up()
        rounds_a = bench.studio_vs_bare(args.rounds)
        rounds_b = bench.adapter_on_off(args.adapter_rounds)
        esrgan_ms = _measure_esrgan(studio, args.esrgan_repeats)
        finite, retries = bench.probe.finite, bench.retries
        del studio, bench
        gc.collect()
        sdxl = _measure_sdxl(kit, Path(tmp), args.threads) if args.sdxl else None
    _report(rounds_a, rounds_b, esrgan_ms, sdxl, flops, finite, retries, args, time.perf_counter() - started)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--rounds", type=int, default=1, help="(a): rounds of S B B' B' B S whole calls")
    parser.add_argument("--adapter-rounds", type=int, default=3, help="(b): rounds of off on on off")
    parser.add_argument("--esrgan-repeats", type=int, default=3, help="(c): timed upscales of the crop")
    parser.add_argument(
        "--retries", type=int, default=3, help="(a), (b): calls measured again when other work slowed them"
    )
    parser.add_argument("--root", type=Path, default=None, help="model cache (default: the builder's)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the random-weight models")
    parser.add_argument("--sdxl", action="store_true", help="also build SDXL and time studio/bare at 1024²")
    args = parser.parse_args()
    if min(args.rounds, args.adapter_rounds, args.esrgan_repeats, args.threads) < 1 or args.retries < 0:
        parser.error("--rounds, --adapter-rounds, --esrgan-repeats, --threads must be >= 1, --retries >= 0")
    return args


# -- setup ----------------------------------------------------------------------------------------------


def _count_flops(kit: FullsizeKit) -> dict[str, float]:
    """FLOPs of one UNet step (batch 2, with and without FACT) and one VAE decode, on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    latent = SIZE // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(kit.sd15 / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(kit.sd15 / "vae"))
        adapter = FaceAdapter(read_adapter_spec(kit.adapter_path))
        sample = torch.empty(2, 4, latent, latent)
        text = torch.empty(2, 77, unet.config.cross_attention_dim)
        context = FaceContext(torch.empty(2, adapter.spec.num_queries, adapter.spec.cross_attention_dim), 1.0)
    timestep = torch.tensor(999, device="meta")

    def count(call: Callable[[], Any]) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            call()
        return float(counter.get_total_flops())

    flops = {"unet": count(lambda: unet(sample, timestep, encoder_hidden_states=text))}
    attach(adapter, unet)
    gligen = {"gligen": {"objs": context}}
    flops["fact"] = count(
        lambda: unet(sample, timestep, encoder_hidden_states=text, cross_attention_kwargs=gligen)
    )
    flops["vae"] = count(lambda: vae.decode(torch.empty(1, 4, latent, latent, device="meta")))
    return flops


# -- timing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clock:
    """Wall and CPU seconds."""

    wall: float
    cpu: float

    @staticmethod
    def now() -> _Clock:
        return _Clock(time.perf_counter(), time.process_time())

    def __sub__(self, other: _Clock) -> _Clock:
        return _Clock(self.wall - other.wall, self.cpu - other.cpu)

    def __add__(self, other: _Clock) -> _Clock:
        return _Clock(self.wall + other.wall, self.cpu + other.cpu)

    def get(self, clock: str) -> float:
        return self.wall if clock == "wall" else self.cpu

    @property
    def cores(self) -> float:
        """CPU cores this process kept busy on average (at most its threads, when nothing else runs)."""
        return self.cpu / self.wall if self.wall > 0 else 0.0


ZERO = _Clock(0.0, 0.0)
T = TypeVar("T")


class _Retries:
    """An allowance of repeats for timed calls that ran beside other work on the machine.

    A call that kept fewer than MIN_SHARE of its threads busy was slowed by another process (or the
    hypervisor): it is measured again, in the same place of its round, while the allowance lasts.
    """

    def __init__(self, allowance: int) -> None:
        self.left = allowance
        self.repeated = 0
        self.kept_disturbed = 0

    def run(self, measure: Callable[[], T], clock: Callable[[T], _Clock]) -> T:
        threads = torch.get_num_threads()
        while True:
            result = measure()
            cores = clock(result).cores
            if cores >= MIN_SHARE * threads:
                return result
            if self.left <= 0:
                self.kept_disturbed += 1
                return result
            self.left -= 1
            self.repeated += 1
            print(
                f"    (that call kept {cores:.2f} of {threads} cores busy: other work ran; measuring again)"
            )


@dataclass
class _Probe:
    """Time spent inside the text encoder(s), the UNet and the VAE decoder during one call."""

    modules: dict[str, torch.nn.Module]
    spent: dict[str, _Clock] = field(default_factory=dict)
    finite: bool = True
    _open: dict[str, _Clock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, module in self.modules.items():
            module.register_forward_pre_hook(lambda *_, n=name: self._enter(n))
            module.register_forward_hook(lambda _m, _a, out, n=name: self._leave(n, out))
        self.reset()

    def _enter(self, name: str) -> None:
        self._open[name] = _Clock.now()

    def _leave(self, name: str, out: Any) -> None:
        self.spent[name] = self.spent[name] + (_Clock.now() - self._open.pop(name))
        if name == "unet":
            sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
            self.finite &= bool(torch.isfinite(sample).all())

    def reset(self) -> None:
        self.spent = dict.fromkeys(self.modules, ZERO)


@dataclass(frozen=True)
class _Timing:
    """One timed call: its total and the time inside each probed module."""

    total: _Clock
    parts: dict[str, _Clock]

    def part(self, name: str) -> _Clock:
        if name == "text":
            return self.parts.get("text", ZERO) + self.parts.get("text2", ZERO)
        if name == "rest":
            inside = sum(self.parts.values(), ZERO)
            return self.total - inside
        return self.total if name == "total" else self.parts[name]


def _timed(call: Callable[[], Any], probe: _Probe) -> _Timing:
    probe.reset()
    start = _Clock.now()
    call()
    total = _Clock.now() - start
    return _Timing(total, dict(probe.spent))


def _total(timing: _Timing) -> _Clock:
    return timing.total


def _probe(pipe: Any) -> _Probe:
    modules = {"text": pipe.text_encoder, "unet": pipe.unet, "vae": pipe.vae.decoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        modules["text2"] = pipe.text_encoder_2
    return _Probe(modules)


def _line(label: str, timing: _Timing) -> str:
    wall = {part: timing.part(part).wall for part in ("text", "unet", "vae", "rest")}
    return (
        f"{label} {timing.total.wall:6.2f} s wall, {timing.total.cores:4.2f} cores (text "
        f"{wall['text']:5.2f}, unet {wall['unet']:5.2f}, vae {wall['vae']:5.2f}, rest {wall['rest']:5.2f} s)"
    )


# -- (a) and (b) ----------------------------------------------------------------------------------------


class _DraftBench:
    """The studio's draft calls against bare diffusers, and the FACT UNet step, on one loaded pipeline."""

    def __init__(self, studio: Studio, size: int, retries: int = 0) -> None:
        self.studio = studio
        self.retries = _Retries(retries)
        self.size = size
        self.pipe = draft_pipeline(studio)
        self.probe = _probe(self.pipe)
        self.plain = GenerateRequest(
            prompt=PROMPT, negative=NEGATIVE, seed=SEED, width=size, height=size, steps=1, cfg=7.0
        )
        self.fact = replace(self.plain, identity="anna", adapter="fact", adapter_scale=1.0)
        self.unet_call: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # the studio's, with FACT

    def bare(self) -> None:
        generator = torch.Generator("cpu").manual_seed(SEED)
        self.pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            width=self.size,
            height=self.size,
            num_inference_steps=1,
            guidance_scale=7.0,
            generator=generator,
        )

    def warm_up(self) -> None:
        """Prompt cache and adapter load at 64² (cheap), then one full-size bare call for the kernels."""
        print("warm-up (untimed) ...", flush=True)
        small = {"width": 64, "height": 64}
        self.studio.draft(replace(self.plain, **small))  # compel providers, the prompt's embeddings
        handle = self.pipe.unet.register_forward_pre_hook(self._capture, with_kwargs=True)
        try:  # loads and attaches the adapter; the hook keeps the UNet call it makes
            self.studio.draft(replace(self.fact, **small))
        finally:
            handle.remove()
        print(_line("  warm-up bare diffusers 512²", _timed(self.bare, self.probe)), flush=True)

    def _capture(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.unet_call = (args, dict(kwargs))

    def studio_vs_bare(self, rounds: int) -> list[dict[str, list[_Timing]]]:
        """(a): rounds of S B B' B' B S whole calls."""
        calls: dict[str, Callable[[], Any]] = {
            "S": lambda: self.studio.draft(self.plain),
            "B": self.bare,
            "B2": self.bare,
        }
        print(f"(a) {rounds} round(s) of S B B' B' B S, SD 1.5 {self.size}², 1 step, cfg 7:", flush=True)
        results = []
        for k in range(rounds):
            got: dict[str, list[_Timing]] = {side: [] for side in SIDE_NAMES}
            for position, side in enumerate(ROUND_A, 1):
                got[side].append(self.retries.run(lambda s=side: _timed(calls[s], self.probe), _total))
                label = f"  round {k + 1}/{rounds} call {position}/{len(ROUND_A)} {SIDE_NAMES[side]:17s}"
                print(_line(label, got[side][-1]), flush=True)
            results.append(got)
        return results

    def adapter_on_off(self, rounds: int) -> list[dict[str, list[_Clock]]]:
        """(b): one UNet forward at full size with the studio's FACT context, and without; off on on off."""
        assert self.unet_call is not None, "warm_up captures the studio's UNet call"
        args, kwargs = self.unet_call
        latent = self.size // 8
        generator = torch.Generator("cpu").manual_seed(SEED)
        sample = torch.randn(2, 4, latent, latent, generator=generator).to(self.pipe.unet.dtype)
        face = kwargs.get("cross_attention_kwargs") or {}
        if "gligen" not in face:
            raise RuntimeError("the studio's FACT draft passed no face context to the UNet")
        sides = {
            "on": {**kwargs, "cross_attention_kwargs": face},
            "off": {**kwargs, "cross_attention_kwargs": None},
        }

        def forward(side: str) -> _Clock:
            start = _Clock.now()
            with torch.no_grad():
                self.pipe.unet(sample, *args[1:], **sides[side])
            return _Clock.now() - start

        print(
            f"(b) FACT on/off, one UNet forward {self.size}² batch 2 (the studio's face context):", flush=True
        )
        print(f"  warm-up (untimed) on: {forward('on').wall:.2f} s wall", flush=True)
        results = []
        for k in range(rounds):
            got: dict[str, list[_Clock]] = {"on": [], "off": []}
            for side in ROUND_B:
                got[side].append(self.retries.run(lambda s=side: forward(s), lambda c: c))
                print(f"  round {k + 1}/{rounds} FACT {side:3s} {got[side][-1].wall:6.2f} s wall, "
                      f"{got[side][-1].cores:4.2f} cores", flush=True)  # fmt: skip
            results.append(got)
        return results


# -- (c) ------------------------------------------------------------------------------------------------


def _measure_esrgan(studio: Studio, repeats: int) -> list[float]:
    """Wall ms per 256x256 crop through the studio's upscaler, loaded as the refine stage loads it."""
    config = replace(studio.config, refine=replace(studio.config.refine, upscale="on"))
    upscaler = load_face_models(refine_models(config, studio.catalogue), config, studio.cache).upscaler
    assert upscaler is not None  # upscale = "on" puts it in refine_models
    crop = astronaut_bgr(256)
    start = time.perf_counter()
    upscaler.upscale(crop)  # warm-up: allocator, oneDNN kernels
    print(f"(c) Real-ESRGAN x2 ({upscaler.name}), 256² crop: warm-up {time.perf_counter() - start:.2f} s")
    times = []
    for k in range(repeats):
        start = _Clock.now()
        out = upscaler.upscale(crop)
        spent = _Clock.now() - start
        times.append(spent.wall * 1000.0)
        print(f"  upscale {k + 1}/{repeats}: {times[-1]:.0f} ms ({spent.cores:.2f} cores) -> "
              f"{out.shape[1]}x{out.shape[0]}", flush=True)  # fmt: skip
    return times


# -- SDXL (optional) --------------------------------------------------------------------------------------


def _measure_sdxl(kit: FullsizeKit, work: Path, threads: int, size: int = 1024) -> dict[str, float]:
    """One S B B S round at ``size``² (SDXL's own 1024 by default), 1 step: studio / bare, whole calls."""
    studio, load_s = open_studio(kit, work / "sdxl", threads=threads, family="sdxl", size=size)
    print(f"SDXL: loaded (random weights, real dims) through the studio in {load_s:.1f} s", flush=True)
    bench = _DraftBench(studio, size)
    studio.draft(replace(bench.plain, width=64, height=64))  # the prompt cache
    print(_line(f"  SDXL warm-up bare {size}²", _timed(bench.bare, bench.probe)), flush=True)
    calls: dict[str, Callable[[], Any]] = {"S": lambda: studio.draft(bench.plain), "B": bench.bare}
    got: dict[str, list[_Timing]] = {"S": [], "B": []}
    for side in ("S", "B", "B", "S"):
        got[side].append(_timed(calls[side], bench.probe))
        print(_line(f"  SDXL {SIDE_NAMES[side]:17s}", got[side][-1]), flush=True)
    return {clock: _ratio(got, "S", "B", clock) for clock in CLOCKS}


# -- report ---------------------------------------------------------------------------------------------


def _ratio(got: dict[str, list[_Timing]], top: str, bottom: str, clock: str, part: str = "total") -> float:
    """sum(top) / sum(bottom) over one round, for whole calls or one module (``part``)."""
    return sum(t.part(part).get(clock) for t in got[top]) / sum(t.part(part).get(clock) for t in got[bottom])


def _report(
    rounds_a: Sequence[dict[str, list[_Timing]]],
    rounds_b: Sequence[dict[str, list[_Clock]]],
    esrgan_ms: list[float],
    sdxl: dict[str, float] | None,
    flops: dict[str, float],
    finite: bool,
    retries: _Retries,
    args: argparse.Namespace,
    wall_s: float,
) -> None:
    med = statistics.median

    def ratios(top: str, bottom: str, clock: str, part: str = "total") -> list[float]:
        return [_ratio(got, top, bottom, clock, part) for got in rounds_a]

    def typical(side: str, part: str, clock: str) -> float:
        return med([t.part(part).get(clock) for got in rounds_a for t in got[side]])

    def fact(clock: str) -> list[float]:
        on_off = [(got["on"], got["off"]) for got in rounds_b]
        return [sum(c.get(clock) for c in on) / sum(c.get(clock) for c in off) for on, off in on_off]

    def listed(values: list[float]) -> str:
        return ", ".join(f"{v:.4f}" for v in values)

    def aa_pct(clock: str) -> float:
        return med([100.0 * (r - 1.0) for r in ratios("B2", "B", clock)])

    print(
        f"\nSD 1.5 {SIZE}x{SIZE}, 1 step, cfg 7 (UNet batch 2), {args.threads} threads; medians of "
        f"{len(rounds_a)} round(s) (a), {len(rounds_b)} round(s) (b)"
    )
    for clock in CLOCKS:
        print(f"median s per call ({clock:4s})  total   text enc.   UNet step   VAE decode   rest (glue)")
        for side, name in SIDE_NAMES.items():
            cells = [typical(side, part, clock) for part in ("total", "text", "unet", "vae", "rest")]
            print(f"  {name:18s} {cells[0]:9.2f} {cells[1]:11.3f} {cells[2]:11.2f} {cells[3]:12.2f} "
                  f"{cells[4]:13.3f}")  # fmt: skip
    print(
        "  both sides run one UNet step on batch 2 (cfg 7) and the VAE decode of one 512² image. The studio "
        "also builds its scheduler, checks the request and converts PIL -> BGR, and encodes its prompt "
        "only on the first call (cached); the bare call encodes prompt + negative with CLIP every time."
    )
    glue = typical("S", "rest", "wall") - typical("B", "rest", "wall")
    print(f"  glue outside the models, studio - bare: {glue * 1000:+.1f} ms per call (wall)")
    for clock in CLOCKS:
        whole, unet = ratios("S", "B", clock), ratios("S", "B", clock, "unet")
        print(
            f"(a) [{clock:4s}] studio / bare, whole call: {med(whole):.4f} (target <= 1.03; rounds "
            f"{listed(whole)}); UNet step alone {med(unet):.4f}; A/A bare'/bare {aa_pct(clock):+.2f} %"
        )
    fastest_a = {side: min(t.total.wall for got in rounds_a for t in got[side]) for side in ("S", "B", "B2")}
    print(
        f"    fastest studio / fastest bare (wall): {fastest_a['S'] / fastest_a['B']:.4f}; A/A "
        f"{100.0 * (fastest_a['B2'] / fastest_a['B'] - 1.0):+.2f} %"
    )
    for clock in CLOCKS:
        on_off = fact(clock)
        print(f"(b) [{clock:4s}] FACT on / off, one UNet step: {med(on_off):.4f} (compass <= 1.25; rounds "
              f"{listed(on_off)})")  # fmt: skip
    fastest = {side: min(c.wall for got in rounds_b for c in got[side]) for side in ("on", "off")}
    print(f"    fastest on / fastest off (wall; load only adds time): {fastest['on'] / fastest['off']:.4f}")
    print(f"    FLOPs counted: x{flops['fact'] / flops['unet']:.3f} per UNet step (DESIGN's estimate ~1.2)")
    print(
        f"(c) Real-ESRGAN x2, full RRDBNet, 256x256 crop: {med(esrgan_ms):.0f} ms wall "
        f"(median of {len(esrgan_ms)}; min {min(esrgan_ms):.0f})"
    )
    if sdxl is not None:
        print(
            f"SDXL 1024², 1 step, studio / bare, whole call: wall {sdxl['wall']:.4f}, cpu {sdxl['cpu']:.4f}"
        )
    print(
        f"calls measured again because other work slowed them: {retries.repeated}; kept although slowed "
        f"(allowance of --retries {args.retries} spent): {retries.kept_disturbed}"
    )
    if abs(aa_pct("wall")) > BUSY_AA_PCT or retries.kept_disturbed:
        print(
            f"note: the A/A control is {aa_pct('wall'):+.1f} % in wall time and {retries.kept_disturbed} "
            "timed call(s) ran beside other work: the machine was busy and the wall-clock ratios carry that "
            "noise; the cpu lines are steadier. Rerun when it is quiet (or with more --rounds / --retries)."
        )
    if not finite:
        print("note: the random-weight UNet produced non-finite values (timings may not be representative)")
    print(f"bench wall time: {wall_s / 60:.1f} min")
    print(
        f"RESULT studio_over_bare_fullsize={med(ratios('S', 'B', 'wall')):.4f} "
        f"adapter_overhead_fullsize={med(fact('wall')):.4f} aa_pct={aa_pct('wall'):.3f} "
        f"esrgan_x2_256_ms={med(esrgan_ms):.1f}",
        flush=True,
    )


if __name__ == "__main__":
    with warnings.catch_warnings():
        # skimage's SimilarityTransform.estimate, called by insightface during enrolment
        warnings.simplefilter("ignore", FutureWarning)
        main()
