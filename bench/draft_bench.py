"""Draft-stage benchmark on the tiny profile; prints figures and ratios measured in one run.

    uv run python bench/draft_bench.py [--size 256] [--steps 20] [--repeats 5] [--threads 1]

(a) overhead: the studio's draft call (DraftPipeline.render: lock, scheduler, prompt weighting, LoRA
    state, image conversion) against a bare diffusers call on the same loaded components, steps and seed,
    interleaved in alternating order, with an A/A control (bare against bare) that shows the noise floor;
(b) UNet evaluations per image, counted with a forward hook: steps x 2 with CFG, steps x 1 without;
(c) switching between two resident LoRA styles against loading the base pipeline;
(d) base pipeline loads in one process across several requests (styles, LoRAs, samplers).
Timings on a shared CPU are noisy; the ratios are what to compare.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from _common import bench_args

from studio.compat import quiet_model_libraries
from studio.config import load_config
from studio.draft import DraftPipeline, DraftRequest
from studio.draft.base import resolve_base
from studio.draft.loras import apply_loras
from studio.models import open_catalogue
from studio.models.cache import ModelCache
from studio.models.resolve import resolve
from studio.pipeline import Studio
from studio.request import GenerateRequest


def main() -> None:
    args = bench_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            "tiny", overrides=[f"output_dir={tmp!r}", f"models.dir={str(Path(tmp) / 'm')!r}"]
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
            count=1,
            width=args.size,
            height=args.size,
            steps=args.steps,
            cfg=7.0,
            sampler="DPM++ 2M Karras",
        )
        overhead_pct, aa_pct = _overhead(pipeline, request, args.repeats)
        exact = _unet_counts(pipeline, request)
        switch_s, first_lora_s = _lora_switch(pipeline.diffusers_pipeline, catalogue, config, args.repeats)
        base_loads = _base_loads(config)
    ratio = switch_s / base_load_s
    print(f"base pipeline load: {base_load_s * 1000:.1f} ms")
    print(f"(a) studio draft overhead over bare diffusers: {overhead_pct:.2f} % of wall time")
    print(f"    A/A control (bare against bare): {aa_pct:.2f} %")
    print(f"(b) UNet evaluations exact (steps x 2 with CFG, x 1 without): {exact}")
    print(
        f"(c) LoRA first load {first_lora_s * 1000:.1f} ms; "
        f"switch between two styles {switch_s * 1000:.2f} ms "
        f"= {ratio:.4f} x base load"
    )
    print(f"(d) base pipeline loads for 4 requests in one process: {base_loads}")
    print(
        f"RESULT overhead_pct={overhead_pct:.3f} aa_pct={aa_pct:.3f} unet_calls_exact={int(exact)} "
        f"lora_switch_ratio={ratio:.5f} base_loads={base_loads}"
    )


def _overhead(pipeline, request, repeats: int) -> tuple[float, float]:
    pipe = pipeline.diffusers_pipeline

    def studio_call() -> None:
        list(pipeline.render(request))

    def bare_call() -> None:
        generator = torch.Generator("cpu").manual_seed(request.seed)
        pipe(
            prompt=request.prompt,
            negative_prompt=request.negative,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg,
            generator=generator,
        )

    studio_call(), bare_call()  # warm-up: scheduler tables, allocator
    times: dict[str, list[float]] = {"studio": [], "bare": [], "bare2": []}
    calls = {"studio": studio_call, "bare": bare_call, "bare2": bare_call}
    for k in range(repeats):  # interleaved, order rotated each round: drift hits every side alike
        order = ["studio", "bare", "bare2"]
        for name in order[k % 3 :] + order[: k % 3]:
            times[name].append(_time(calls[name]))
    studio_s, bare_s, bare2_s = (statistics.median(times[n]) for n in ("studio", "bare", "bare2"))
    print(
        f"    studio draft {studio_s * 1000:.1f} ms, bare diffusers {bare_s * 1000:.1f} ms and "
        f"{bare2_s * 1000:.1f} ms (medians of {repeats})"
    )
    return 100.0 * (studio_s - bare_s) / studio_s, 100.0 * (bare2_s - bare_s) / bare2_s


def _unet_counts(pipeline, request) -> bool:
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


def _lora_switch(pipe, catalogue, config, repeats: int) -> tuple[float, float]:
    kohya = resolve("tiny-style-kohya", "lora", config, catalogue)
    diffusers_layout = resolve("tiny-style-diffusers", "lora", config, catalogue)
    resident: OrderedDict[str, None] = OrderedDict()
    with quiet_model_libraries():  # as DraftPipeline does: no third-party loading chatter
        first = _time(lambda: apply_loras(pipe, [(kohya, 0.8)], resident, config))
        apply_loras(pipe, [(diffusers_layout, 0.6)], resident, config)
    switches = []
    for i in range(2 * repeats):
        style = [(kohya, 0.8)] if i % 2 else [(diffusers_layout, 0.6)]
        switches.append(_time(lambda s=style: apply_loras(pipe, s, resident, config)))
    return statistics.median(switches), first


def _base_loads(config) -> int:
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


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
