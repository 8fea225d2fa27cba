"""Draft-stage benchmark on the tiny profile; prints figures and ratios measured in one run.

    uv run python bench/draft_bench.py [--size 256] [--steps 20] [--repeats 5] [--threads 1]

(a) overhead: the studio's draft call (render_draft: scheduler, prompt weighting, LoRA state, image
    conversion) against a bare diffusers call on the same loaded components, steps and seed;
(b) UNet evaluations per image, counted with a forward hook: steps x 2 with CFG, steps x 1 without;
(c) switching between two resident LoRA styles against loading the base pipeline;
(d) base pipeline loads in one process across several requests (styles, LoRAs, samplers).
Timings on a shared CPU are noisy; the ratios are what to compare.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import bench_args

from studio.config import load_config
from studio.draft import DraftRequest, render_draft
from studio.draft.load import load_pipeline, resolve_base
from studio.draft.loras import apply_loras, resolve_lora
from studio.models import open_catalogue
from studio.models.cache import ModelCache
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
        pipe = load_pipeline(base, "txt2img", None, config, cache)
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
        overhead_pct = _overhead(pipe, request, base, config, cache, args.repeats)
        exact = _unet_counts(pipe, request, base, config, cache)
        switch_s, first_lora_s = _lora_switch(pipe, catalogue, config, cache, args.repeats)
        base_loads = _base_loads(config)
    ratio = switch_s / base_load_s
    print(f"base pipeline load: {base_load_s * 1000:.1f} ms")
    print(f"(a) studio draft overhead over bare diffusers: {overhead_pct:.2f} % of wall time")
    print(f"(b) UNet evaluations exact (steps x 2 with CFG, x 1 without): {exact}")
    print(
        f"(c) LoRA first load {first_lora_s * 1000:.1f} ms; "
        f"switch between two styles {switch_s * 1000:.2f} ms "
        f"= {ratio:.4f} x base load"
    )
    print(f"(d) base pipeline loads for 4 requests in one process: {base_loads}")
    print(
        f"RESULT overhead_pct={overhead_pct:.3f} unet_calls_exact={int(exact)} lora_switch_ratio={ratio:.5f} "
        f"base_loads={base_loads}"
    )


def _overhead(pipe, request, base, config, cache, repeats: int) -> float:
    def studio_call() -> None:
        list(render_draft(request, base, config, cache))

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
    studio_t, bare_t = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both sides alike
        studio_t.append(_time(studio_call))
        bare_t.append(_time(bare_call))
    studio_s, bare_s = statistics.median(studio_t), statistics.median(bare_t)
    print(
        f"    studio draft {studio_s * 1000:.1f} ms, bare diffusers {bare_s * 1000:.1f} ms "
        f"(medians of {repeats})"
    )
    return 100.0 * (studio_s - bare_s) / studio_s


def _unet_counts(pipe, request, base, config, cache) -> bool:
    evaluations: list[int] = []
    handle = pipe.unet.register_forward_hook(lambda mod, args, out: evaluations.append(int(args[0].shape[0])))
    ok = True
    try:
        for sampler in ("DPM++ 2M Karras", "Euler a", "DPM++ SDE Karras", "DDIM", "UniPC"):
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
                    list(render_draft(varied, base, config, cache))
                    got, want = sum(evaluations) / count, 6 * per_step
                    ok &= got == want
                    print(
                        f"    {sampler:16s} cfg {cfg:3.1f} batch {count}: {got:g} UNet evaluations per image "
                        f"in {len(evaluations)} calls (expected {want})"
                    )
    finally:
        handle.remove()
    return ok


def _lora_switch(pipe, catalogue, config, cache, repeats: int) -> tuple[float, float]:
    kohya = resolve_lora("tiny-style-kohya", catalogue, config)
    diffusers_layout = resolve_lora("tiny-style-diffusers", catalogue, config)
    first = _time(lambda: apply_loras(pipe, [(kohya, 0.8)], config, cache))
    apply_loras(pipe, [(diffusers_layout, 0.6)], config, cache)
    switches = []
    for i in range(2 * repeats):
        style = [(kohya, 0.8)] if i % 2 else [(diffusers_layout, 0.6)]
        switches.append(_time(lambda s=style: apply_loras(pipe, s, config, cache)))
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
    return sum(n for key, n in studio.cache.loads.items() if key[0] == "draft-base")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
