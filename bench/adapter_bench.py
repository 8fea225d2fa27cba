"""Face-adapter cost on the tiny profile: draft time with and without an identity adapter, as ratios.

    uv run python bench/adapter_bench.py [--size 128] [--steps 4] [--repeats 6] [--threads 1]

Every request renders the same prompt, seed, size and steps; the figure is ``GenerateResult.timings
["draft"]`` (prompt encoding, adapter state, denoising, decoding; refine off). Five ``Studio`` objects in
one process, each with its own model cache, so each holds its own draft pipeline and no request changes the
state another side is timed in:
  plain   no adapter: the reference of (1);
  twin    no adapter, a second pipeline: the A/A control (plain's work on another instance);
  fact    FACT requests only (resampler + one gated attention per transformer block);
  faceid  IP-Adapter-FaceID requests only: FaceID is loaded once and stays loaded, so this is its steady
          cost per request, WITHOUT the unload/reload ``studio/draft/face.py`` does when requests switch;
  mixed   FACT and FaceID requests in turn (FACT, FaceID, FACT, ...), as a web UI or campaign may send them.
(1) steady cost: FACT, FaceID and twin each against plain, interleaved (``_common.interleave``: A B B A
    blocks, arms rotated per round), MEDIAN PAIRED RATIOS; the A/A ratio (twin / plain) is the noise floor.
(2) alternation cost: one FACT + one FaceID request on ``mixed`` against the same two requests on ``fact``
    and ``faceid`` (no switching), interleaved A B B A; the median paired difference is what switching
    between the two adapters costs per FACT -> FaceID -> FACT round trip (today a FaceID unload on the FACT
    request and a reload on the FaceID one). Keeping FaceID loaded across FACT requests drives it to ~0.
The ratios are what to compare: the tiny UNet is small, so an adapter's share of its work is larger than on
SD 1.5, where the fusers are a few percent of the UNet's FLOPs; --size and --steps change that share.
RESULT keys: adapter_overhead_ratio (FACT / plain), faceid_overhead_ratio (FaceID / plain, steady),
aa_pct (twin / plain - 1, in %), faceid_alternation_ms ((2), per round trip), alternation_ratio ((2), mixed
pair / steady pair).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
from _common import bench_args, interleave, work_overrides
from skimage import data

from studio.config import load_config
from studio.imageio import write_image
from studio.pipeline import Studio
from studio.request import GenerateRequest


def main() -> None:
    args = bench_args(__doc__, size=128, steps=4, repeats=6)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*work_overrides(args, Path(tmp)), "refine.enabled=false"]
        config = load_config("tiny", overrides=overrides)
        studios = {name: Studio(config) for name in ("plain", "twin", "fact", "faceid", "mixed")}
        photo = Path(tmp) / "anna.png"
        write_image(photo, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR
        studios["plain"].enrol("anna", [photo], consent="benchmark")  # one identity file, read by all five
        plain = GenerateRequest(
            prompt="portrait, rim light",
            seed=3,
            width=args.size,
            height=args.size,
            steps=args.steps,
            sampler="DPM++ 2M Karras",
        )
        fact = GenerateRequest(**{**vars(plain), "identity": "anna", "adapter": "fact", "adapter_scale": 1.0})
        faceid = GenerateRequest(
            **{**vars(plain), "identity": "anna", "adapter": "ipadapter-faceid", "adapter_scale": 1.0}
        )

        def draft(name: str, request: GenerateRequest, log: list[float] | None = None) -> Callable[[], float]:
            def timed() -> float:
                seconds = studios[name].generate(request).timings["draft"]
                if log is not None:
                    log.append(seconds)
                return seconds

            return timed

        # warm-up: loads, conversions, attach, prompt caches; mixed ends on FaceID, as every mixed pair does
        for name, request in (("plain", plain), ("twin", plain), ("fact", fact), ("faceid", faceid)):
            draft(name, request)()
        for request in (fact, faceid, fact, faceid):
            draft("mixed", request)()

        # (1) steady: no request on these pipelines ever switches adapters
        steady = interleave(
            {"FACT": draft("fact", fact), "FaceID": draft("faceid", faceid), "A/A": draft("twin", plain)},
            draft("plain", plain),
            args.repeats,
        )
        # (2) alternating FACT / FaceID on one pipeline against the same requests without switching
        parts: dict[str, list[float]] = {key: [] for key in ("mixed fact", "mixed faceid", "fact", "faceid")}
        mixed_fact = draft("mixed", fact, parts["mixed fact"])
        mixed_faceid = draft("mixed", faceid, parts["mixed faceid"])
        steady_fact = draft("fact", fact, parts["fact"])
        steady_faceid = draft("faceid", faceid, parts["faceid"])
        switching = interleave(
            {"alternating": lambda: mixed_fact() + mixed_faceid()},
            lambda: steady_fact() + steady_faceid(),
            args.repeats,
        )["alternating"]

    print(
        f"adapter_bench: tiny profile, {args.size}x{args.size}, {args.steps} steps, "
        f"{args.threads} thread(s), {args.repeats} A B B A rounds per arm; draft time per request"
    )
    print("(1) steady cost (each adapter on its own pipeline, never switched), against no adapter:")
    for name, paired in steady.items():
        print("    " + paired.describe(name, "plain"))
    fact_ratio, faceid_ratio, aa = steady["FACT"].ratio, steady["FaceID"].ratio, steady["A/A"]
    print(
        f"    FACT adapter: {fact_ratio:.3f} x the plain draft; IP-Adapter-FaceID (no reloads): "
        f"{faceid_ratio:.3f} x; A/A control (twin / plain): {aa.pct:+.2f} %"
    )
    print("(2) FACT / FaceID requests alternating on one pipeline, against the same two on their own:")
    print("    " + switching.describe("FACT + FaceID alternating", "the same two steady"))
    median_ms = {key: statistics.median(values) * 1000.0 for key, values in parts.items()}
    print(
        f"    per request (medians): FaceID after FACT {median_ms['mixed faceid']:.1f} ms vs FaceID after "
        f"FaceID {median_ms['faceid']:.1f} ms; FACT after FaceID {median_ms['mixed fact']:.1f} ms vs FACT "
        f"after FACT {median_ms['fact']:.1f} ms"
    )
    print(
        f"    switching costs {switching.diff_ms:.1f} ms per FACT -> FaceID -> FACT round trip "
        f"(median paired difference; {switching.ratio:.3f} x the two requests without switching)"
    )
    print(
        f"RESULT adapter_overhead_ratio={fact_ratio:.4f} faceid_overhead_ratio={faceid_ratio:.4f} "
        f"aa_pct={aa.pct:.3f} faceid_alternation_ms={switching.diff_ms:.1f} "
        f"alternation_ratio={switching.ratio:.4f}"
    )


if __name__ == "__main__":
    main()
