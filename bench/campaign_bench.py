"""Campaign benchmark on the tiny profile; prints figures and ratios measured in one run.

    uv run python bench/campaign_bench.py [--items 40] [--pairs 3] [--ray-items 24] [--threads 1] [--only-ray]

Temp folders throughout; the bench enrols its own tiny identities (scikit-image's public-domain astronaut).
(a) draft reuse: one prompt x 8 identities (a plain identity axis, one seed) run by ``Campaign.run()``:
    attempts that rendered a draft (1 expected: the other 7 re-face the stored draft);
(b) engine overhead: the same N items (prompts x 4 seeds, refined to one identity) made (A) by the
    campaign engine (``Campaign.run()``: plan, store, one worker process) and (B) by direct Studio calls in
    one process (draft + refine + save per item, the plan's own requests), each as a fresh subprocess, so
    both pay Python start, imports and model loading; run in alternating order A B, B A, ... with an A/A
    control pair (engine against engine) that shows the noise floor; overhead = median paired A/B - 1;
    the engine's worker start-up and its steady per-item cost are printed apart;
(c) resume: the finished campaign of (b) run again: attempts it adds (0 expected, no worker started);
(d) Ray: ``Campaign.run("ray", workers=2)`` over ``workers=1`` on one local Ray instance started once
    before both: throughput in items per second once each actor has loaded its models (its first item),
    which is what a long campaign sees; the whole-run ratio (model loads included) is printed beside it;
    nan when Ray is absent.
Timings on a shared CPU are noisy; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

IDENTITIES = [f"bench-{i}" for i in range(8)]
PROMPTS = [
    "lighthouse keeper", "street musician", "beekeeper", "glassblower", "mountain guide", "florist",
    "astronomer", "fisherwoman", "blacksmith", "ballet teacher", "cartographer", "tailor",
]  # fmt: skip
SEEDS = 4


def main() -> None:
    args = _args()
    if args.child:
        _child(args)
        return
    with tempfile.TemporaryDirectory(prefix="campaign-bench-") as tmp:
        root = Path(tmp)
        base = [
            f"models.dir={str(root / 'models')!r}",
            f"refine.identities_dir={str(root / 'ids')!r}",
            f"audit.log={str(root / 'audit.jsonl')!r}",  # the bench's own log and signing CA, not yours
            f"provenance.data_dir={str(root / 'studio-data')!r}",
        ]
        _enrol(root, base)
        if args.only_ray:
            print(f"RESULT ray_speedup_2w={_ray_speedup(root, base, args.ray_items)[0]:.3f}")
            return
        k8 = _draft_reuse(root, base)
        overhead = _engine_overhead(root, base, args)
        resumed = _resume(root, base, overhead["last_engine_out"])
        speedup, why = _ray_speedup(root, base, args.ray_items)
    print(f"(a) drafts rendered for 1 prompt x 8 identities: {k8['rendered']} (re-used {k8['reused']}) "
          f"in {k8['seconds']:.1f} s")  # fmt: skip
    print(f"(b) engine overhead over direct Studio calls ({args.items} items, whole processes): "
          f"{overhead['pct']:.1f} % (paired ratios {overhead['ratios']})")  # fmt: skip
    print(f"    A/A control (engine against engine): {overhead['aa_pct']:.1f} %")
    print(f"    engine: plan + submit + worker start {overhead['setup_s']:.1f} s (median; overlapped), "
          f"{overhead['engine_item_ms']:.0f} ms/item from the run's start; direct: "
          f"{overhead['direct_item_ms']:.0f} ms/item (first model loads included); both single-threaded "
          f"(torch, OpenCV, ONNX Runtime) as campaign workers are")  # fmt: skip
    print(f"    steady per-item overhead (engine rendering / direct calls - 1): {overhead['item_pct']:.1f} %")
    print(f"(c) attempts added by running the finished {args.items}-item campaign again: {resumed}")
    ray_text = f"{speedup:.2f}x" if not math.isnan(speedup) else f"nan ({why})"
    print(f"(d) Ray throughput, 2 workers over 1 ({args.ray_items} items): {ray_text}")
    print(
        f"RESULT draft_renders_k8={k8['rendered']} engine_overhead_pct={overhead['pct']:.2f} "
        f"resume_rendered={resumed} ray_speedup_2w={speedup:.3f} aa_pct={overhead['aa_pct']:.2f}"
    )


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=40, help="items of (b) and (c): prompts x 4 seeds")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs of (b), besides the A/A pair")
    parser.add_argument("--ray-items", type=int, default=24, help="items of (d)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only-ray", action="store_true", help="run (d) alone")
    parser.add_argument("--child", choices=("engine", "direct"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # fixed, so both sides of each ratio run alike (workers use 1)
    for name in ("diffusers", "transformers", "peft", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return args


def _config(base: list[str], out: Path) -> Any:
    from studio.config import load_config

    return load_config("tiny", overrides=[*base, f"output_dir={str(out)!r}"])


def _campaign(manifest: Path, base: list[str], out: Path) -> Any:
    from studio.batch.campaign import Campaign

    return Campaign.load(manifest, "tiny", overrides=[*base, f"output_dir={str(out)!r}"])


def _enrol(root: Path, base: list[str]) -> None:
    from skimage import data

    from studio.imageio import write_image
    from studio.pipeline import Studio

    photo = root / "astronaut.png"
    write_image(photo, data.astronaut()[:, :, ::-1].copy())  # RGB -> BGR
    studio = Studio(_config(base, root / "out"))
    for name in IDENTITIES:
        studio.enrol(name, [photo], consent="bench: scikit-image sample photo, public domain")


def _manifest(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.toml"
    path.write_text(f'[campaign]\nname = "{name}"\n{text}', encoding="utf-8")
    return path


def _items_manifest(root: Path, name: str, items: int) -> Path:
    """``items`` items: prompts x 4 seeds, each refined to one identity."""
    prompts = [
        PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" {i}") for i in range(items // SEEDS)
    ]
    return _manifest(root, name, (
        f"seeds = {SEEDS}\n[axes]\nwho = {json.dumps(prompts)}\n"
        f'[[jobs]]\nname = "portraits"\nprompt = "portrait of a {{who}}"\nidentity = "{IDENTITIES[0]}"\n'
    ))  # fmt: skip


# -- (a) draft reuse --------------------------------------------------------------------------------------


def _draft_reuse(root: Path, base: list[str]) -> dict[str, Any]:
    manifest = _manifest(root, "reuse-k8", (
        f'[axes]\nidentity = {json.dumps(IDENTITIES)}\n'
        '[[jobs]]\nprompt = "portrait of a lighthouse keeper"\nidentity = "{identity}"\n'
    ))  # fmt: skip
    campaign = _campaign(manifest, base, root / "out-k8")
    try:
        summary = campaign.run()
        attempts = campaign.store.attempts()
        assert summary.counts["done"] == len(IDENTITIES), summary.counts
        rendered = sum(a.draft_rendered for a in attempts)
        return {"rendered": rendered, "reused": summary.drafts_reused, "seconds": summary.seconds}
    finally:
        campaign.close()


# -- (b) engine overhead, in fresh subprocesses -----------------------------------------------------------


def _engine_overhead(root: Path, base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    manifest = _items_manifest(root, "overhead", args.items)
    plan = _campaign(manifest, base, root / "out-plan").plan()
    requests = root / "requests.json"
    requests.write_text(json.dumps([dict(item.request) for item in plan.items]), encoding="utf-8")
    order = []
    for k in range(args.pairs):  # A B, B A, ...: drift hits both sides alike
        order += [("engine", k), ("direct", k)] if k % 2 == 0 else [("direct", k), ("engine", k)]
    order += [("engine", "aa1"), ("engine", "aa2")]
    runs: dict[tuple[str, Any], dict[str, Any]] = {}
    for index, (kind, key) in enumerate(order):
        out = root / f"out-{kind}-{index}"
        spec = {"manifest": str(manifest), "base": base, "out": str(out), "requests": str(requests)}
        runs[kind, key] = _run_child(root, kind, spec, args.threads)
        runs[kind, key]["out"] = out
        print(f"    run {index + 1}/{len(order)}: {kind:6s} {runs[kind, key]['wall_s']:.1f} s", flush=True)
    ratios = [runs["engine", k]["wall_s"] / runs["direct", k]["wall_s"] for k in range(args.pairs)]
    engines = [run for (kind, _), run in runs.items() if kind == "engine"]
    directs = [run for (kind, _), run in runs.items() if kind == "direct"]
    n = len(plan.items)
    engine_item = statistics.median(r["render_s"] for r in engines) / n
    direct_item = statistics.median(r["render_s"] for r in directs) / n
    return {
        "pct": 100.0 * (statistics.median(ratios) - 1.0),
        "ratios": ", ".join(f"{r:.3f}" for r in ratios),
        "aa_pct": 100.0 * (runs["engine", "aa2"]["wall_s"] / runs["engine", "aa1"]["wall_s"] - 1.0),
        "setup_s": statistics.median(r["setup_s"] for r in engines),
        "engine_item_ms": 1000 * engine_item,
        "direct_item_ms": 1000 * direct_item,
        "item_pct": 100.0 * (engine_item / direct_item - 1.0),
        "last_engine_out": runs["engine", "aa2"]["out"],
    }


def _run_child(root: Path, kind: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    path = root / f"spec-{kind}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    command = [sys.executable, __file__, "--child", kind, "--spec", str(path), "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the {kind} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def _child(args: argparse.Namespace) -> None:
    """One side of (b), in its own process: prints its timings as one JSON line."""
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    out, base = Path(spec["out"]), spec["base"]
    start = time.perf_counter()
    if args.child == "engine":  # what `studio campaign run` does: plan, submit, one worker process
        campaign = _campaign(Path(spec["manifest"]), base, out)
        summary = campaign.run()
        if summary.counts["pending"] or summary.counts["failed"]:
            raise SystemExit(f"not every item done: {summary.counts}")
        result = {"render_s": summary.seconds, "setup_s": time.perf_counter() - start - summary.seconds}
    else:
        import cv2

        from studio.output import OutputSink
        from studio.pipeline import Studio
        from studio.request import GenerateRequest

        requests = json.loads(Path(spec["requests"]).read_text(encoding="utf-8"))
        cv2.setNumThreads(args.threads)  # the campaign worker's settings: torch, OpenCV, ONNX Runtime
        studio = Studio(_config([*base, f"runtime.threads={args.threads}"], out))
        begin = time.perf_counter()
        sink = OutputSink(out)  # one run, as one script would make: its config written once
        sink.start(studio.config, {"requests": len(requests)})
        for data in requests:
            request = GenerateRequest.from_dict(data)
            picture = studio.draft(request)[0]
            result_image: Any = picture
            if request.identity:
                result_image = studio.refine(picture, request.identity, select=request.select,
                                             index=request.face_index, match=request.match)  # fmt: skip
            studio.save(result_image, sink=sink)
        result = {"setup_s": begin - start, "render_s": time.perf_counter() - begin}
    print(json.dumps(result))


# -- (c) resume -------------------------------------------------------------------------------------------


def _resume(root: Path, base: list[str], out: Path) -> int:
    campaign = _campaign(root / "overhead.toml", base, out)
    try:
        before = len(campaign.store.attempts())
        summary = campaign.run()
        added = len(campaign.store.attempts()) - before
        assert added == summary.attempts, (added, summary.attempts)
        return added
    finally:
        campaign.close()


# -- (d) Ray ----------------------------------------------------------------------------------------------


def _ray_speedup(root: Path, base: list[str], items: int) -> tuple[float, str]:
    try:
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # see studio.batch.ray_engine.UV_HOOK
        import ray

        import studio.batch.ray_engine  # noqa: F401
    except ImportError as err:
        return math.nan, f"Ray is not importable here ({err}); install it with: uv sync --extra ray"
    manifest = _items_manifest(root, "ray", items)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)  # once, before both runs
    try:
        rates, steady = {}, {}
        for workers in (1, 2):
            campaign = _campaign(manifest, base, root / f"out-ray-{workers}")
            finished: list[float] = []  # when each item finished (the progress callback's times)

            def progress(counts: Any, finished: list[float] = finished) -> None:
                finished.append(time.perf_counter())

            try:
                begin = time.perf_counter()
                summary = campaign.run("ray", workers=workers, progress=progress)
            finally:
                campaign.close()
            done = summary.counts["done"]
            rates[workers] = done / summary.seconds  # the run itself: actors' start-up excluded
            # steady: after each actor's first item (which loads its models), to the last item
            steady[workers] = (done - workers) / (finished[-1] - finished[workers - 1])
            print(f"    ray, {workers} worker(s): {done} items in {summary.seconds:.1f} s of run "
                  f"({time.perf_counter() - begin:.1f} s with actor start-up): {rates[workers]:.2f} items/s, "
                  f"{steady[workers]:.2f} items/s after each actor's first item", flush=True)  # fmt: skip
    finally:
        ray.shutdown()
    print(f"    whole runs (each actor loads its models on its first item): {rates[2] / rates[1]:.2f}x")
    print(f"    throughput, steady state (after each actor's model load): {steady[2] / steady[1]:.2f}x")
    return steady[2] / steady[1], ""


if __name__ == "__main__":
    main()
