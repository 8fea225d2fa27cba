"""Draft-stage benchmark on the tiny profile; prints figures and ratios measured in one run.

    uv run python bench/draft_bench.py [--size 64] [--steps 4] [--batch 4] [--repeats 20] [--threads 1]

The defaults are the conditions of the issue's target "studio / bare <= 1.05": 64x64, 4 steps, a batch of
4 images per call, one process, one thread; the RESULT line is measured under whatever the flags say.

(a) overhead: the studio's draft call (``DraftPipeline.render`` of one batch of --batch images: lock,
    scheduler, compel prompt encoding, LoRA/face state, PIL -> BGR conversion) against the bare diffusers
    call a user would write for the same images (``pipe(prompt, negative_prompt, num_images_per_prompt,
    generator=[one per seed])``, PIL images out) on the same loaded pipeline, sampler, seeds and size.
    Timed with ``_common.interleave``: A B B A blocks (studio, bare, bare, studio / bare, studio, studio,
    bare), --repeats blocks per arm; the figure is the MEDIAN PAIRED RATIO studio / bare (each studio call
    over the bare call next to it). The A/A control times bare against bare in the same way, interleaved
    with the studio blocks: its distance from 1.0 (aa_pct) is the noise floor of the ratio. Both sides are
    checked to give the same pixels first, so the ratio compares the same work.
(b) UNet evaluations per image, counted with a forward hook: steps x 2 with CFG, steps x 1 without;
(c) switching between two resident LoRA styles against loading the base pipeline;
(d) base pipeline loads in one process across several requests (styles, LoRAs, samplers).

RESULT keys: studio_over_bare (median paired ratio; target <= 1.05), overhead_pct ((ratio - 1) x 100, % of
the bare call's time), aa_pct (A/A control, same method, bare against bare), unet_calls_exact (b),
lora_switch_ratio (c), base_loads (d). Timings on a shared CPU are noisy; compare overhead_pct with aa_pct.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import Paired, bench_args, interleave, wall, work_overrides

from studio.compat import quiet_model_libraries
from studio.config import StudioConfig, load_config
from studio.draft import DraftPipeline, DraftRequest
from studio.draft.base import resolve_base
from studio.draft.loras import apply_loras
from studio.models import open_catalogue
from studio.models.cache import ModelCache
from studio.models.resolve import resolve
from studio.pipeline import Studio
from studio.request import GenerateRequest


def main() -> None:
    args = bench_args(__doc__, size=64, steps=4, repeats=20, batch=4)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            "tiny",
            overrides=work_overrides(args, Path(tmp)),  # (d) counts loads: no marks or local CA
        )
        catalogue = open_catalogue(config)
        base = resolve_base(config.draft.model, catalogue, config)
        # (c, part 1) base load time, from a fresh cache
        cache = ModelCache()
        start = time.perf_counter()
        pipeline = DraftPipeline(base, config, cache)
        base_load_s = time.perf_counter() - start
        request = DraftRequest(
            prompt="portrait of a lighthouse keeper, rim light",
            negative="blurry",
            seed=7,
            count=args.batch,
            batch_size=args.batch,
            width=args.size,
            height=args.size,
            steps=args.steps,
            cfg=7.0,
            sampler="DPM++ 2M Karras",
        )
        print(
            f"draft_bench: tiny profile, {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, "
            f"{args.threads} thread(s), {args.repeats} A B B A rounds per arm, one process"
        )
        print(f"base pipeline load: {base_load_s * 1000:.1f} ms")
        overhead, control = _overhead(pipeline, request, args.repeats)
        exact = _unet_counts(pipeline, request)
        switch_s, first_lora_s = _lora_switch(pipeline.diffusers_pipeline, catalogue, config, args.repeats)
        base_loads = _base_loads(config)
    ratio = switch_s / base_load_s
    print(
        f"(a) studio / bare diffusers: {overhead.ratio:.4f} (median paired ratio, target <= 1.05) = "
        f"{overhead.pct:+.2f} % of the bare call; A/A control (bare / bare): {control.pct:+.2f} %"
    )
    print(f"(b) UNet evaluations exact (steps x 2 with CFG, x 1 without): {exact}")
    print(
        f"(c) LoRA first load {first_lora_s * 1000:.1f} ms; "
        f"switch between two styles {switch_s * 1000:.2f} ms "
        f"= {ratio:.4f} x base load"
    )
    print(f"(d) base pipeline loads for 4 requests in one process: {base_loads}")
    print(
        f"RESULT studio_over_bare={overhead.ratio:.4f} overhead_pct={overhead.pct:.3f} "
        f"aa_pct={control.pct:.3f} unet_calls_exact={int(exact)} "
        f"lora_switch_ratio={ratio:.5f} base_loads={base_loads}"
    )


def _overhead(pipeline: DraftPipeline, request: DraftRequest, rounds: int) -> tuple[Paired, Paired]:
    """(studio against bare, bare against bare), interleaved A B B A, paired ratios."""
    pipe = pipeline.diffusers_pipeline
    seeds = [request.seed + k for k in range(request.batch_size)]

    def studio_call() -> list[tuple[int, np.ndarray]]:
        return list(pipeline.render(request))

    def bare_call() -> list[Any]:
        return pipe(
            prompt=request.prompt,
            negative_prompt=request.negative,
            num_images_per_prompt=len(seeds),
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        ).images

    # warm-up (scheduler tables, allocator, prompt caches) and the same-work check: render sets the
    # request's sampler on this very pipeline object, which the bare call then uses as it stands
    studio_images = [image for _, image in studio_call()]
    bare_images = [np.asarray(image)[:, :, ::-1] for image in bare_call()]  # PIL RGB -> BGR
    pairs = zip(studio_images, bare_images, strict=True)
    differ = max(int(np.abs(s.astype(int) - b.astype(int)).max()) for s, b in pairs)
    print(f"    same work: {len(bare_images)} images each, max |studio - bare| = {differ} levels")
    studio_call(), bare_call()
    paired = interleave({"studio": wall(studio_call), "A/A": wall(bare_call)}, wall(bare_call), rounds)
    overhead, control = paired["studio"], paired["A/A"]
    print("    " + overhead.describe("studio", "bare"))
    print("    " + control.describe("A/A bare", "bare"))
    print(
        f"    ratio of medians {overhead.arm_ms / overhead.reference_ms:.4f} (A/A "
        f"{control.arm_ms / control.reference_ms:.4f}); median paired difference "
        f"{overhead.diff_ms:+.2f} ms (A/A {control.diff_ms:+.2f} ms)"
    )
    return overhead, control


def _unet_counts(pipeline: DraftPipeline, request: DraftRequest) -> bool:
    evaluations: list[int] = []
    unet = pipeline.diffusers_pipeline.unet
    handle = unet.register_forward_hook(lambda mod, args, out: evaluations.append(int(args[0].shape[0])))
    ok = True
    try:
        for sampler in ("DPM++ 2M Karras", "Euler a", "DPM++ 2M SDE Karras", "DDIM", "UniPC"):
            for cfg, per_step in ((7.0, 2), (1.0, 1)):
                for count in (1, 2):
                    evaluations.clear()
                    varied = DraftRequest(
                        **{
                            **vars(request),
                            "sampler": sampler,
                            "cfg": cfg,
                            "count": count,
                            "batch_size": count,
                            "steps": 6,
                            "width": 64,
                            "height": 64,
                        }
                    )
                    list(pipeline.render(varied))
                    got, want = sum(evaluations) / count, 6 * per_step
                    ok &= got == want
                    print(
                        f"    {sampler:16s} cfg {cfg:3.1f} batch {count}: {got:g} UNet evaluations per image "
                        f"in {len(evaluations)} calls (expected {want})"
                    )
    finally:
        handle.remove()
    return ok


def _lora_switch(pipe: Any, catalogue: Any, config: StudioConfig, repeats: int) -> tuple[float, float]:
    kohya = resolve("tiny-style-kohya", "lora", config, catalogue)
    diffusers_layout = resolve("tiny-style-diffusers", "lora", config, catalogue)
    resident: OrderedDict[str, None] = OrderedDict()
    with quiet_model_libraries():  # as DraftPipeline does: no third-party loading chatter
        first = wall(lambda: apply_loras(pipe, [(kohya, 0.8)], resident, config))()
        apply_loras(pipe, [(diffusers_layout, 0.6)], resident, config)
    switches = []
    for i in range(2 * repeats):
        style = [(kohya, 0.8)] if i % 2 else [(diffusers_layout, 0.6)]
        switches.append(wall(lambda s=style: apply_loras(pipe, s, resident, config))())
    return statistics.median(switches), first


def _base_loads(config: StudioConfig) -> int:
    studio = Studio(config)
    requests = [
        GenerateRequest(prompt="a", steps=2),
        GenerateRequest(prompt="b", steps=2, style="film-noir", width=64, height=64),
        GenerateRequest(prompt="c", steps=2, loras=(("tiny-style-kohya", 0.7),)),
        GenerateRequest(prompt="d", steps=2, loras=(("tiny-style-diffusers", 0.5),), sampler="Euler a"),
    ]
    for request in requests:
        studio.generate(request)
    return sum(n for key, n in studio.cache.loads.items() if key[0] == "draft-pipeline")


if __name__ == "__main__":
    main()
