"""Face-adapter cost on the tiny profile: draft time with and without the identity adapter, as ratios.

    uv run python bench/adapter_bench.py [--size 256] [--steps 20] [--repeats 5] [--threads 1]

Both sides render the same prompt, seed, size and steps on the same loaded pipeline, interleaved; the
adapter side adds the FACT resampler and one gated attention per transformer block (and, reported apart,
IP-Adapter-FaceID). The ratio is what to compare: the tiny UNet is small, so the adapter's share of its
work is larger than on SD 1.5, where the fusers are a few percent of the UNet's FLOPs.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import cv2
from _common import bench_args
from skimage import data

from studio.config import load_config
from studio.imageio import write_image
from studio.pipeline import Studio
from studio.request import GenerateRequest


def main() -> None:
    args = bench_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(
            load_config(
                "tiny",
                overrides=[
                    f"output_dir={tmp!r}",
                    f"refine.identities_dir={str(Path(tmp) / 'ids')!r}",
                    "refine.enabled=false",
                ],
            )
        )
        photo = Path(tmp) / "anna.png"
        write_image(photo, cv2.resize(data.astronaut()[:, :, ::-1], (256, 256)))  # RGB -> BGR
        studio.enrol("anna", [photo], consent="benchmark")
        request = GenerateRequest(
            prompt="portrait, rim light",
            seed=3,
            width=args.size,
            height=args.size,
            steps=args.steps,
            sampler="DPM++ 2M Karras",
        )
        sides = {
            "none": request,
            "fact": GenerateRequest(
                **{**vars(request), "identity": "anna", "adapter": "fact", "adapter_scale": 1.0}
            ),
            "faceid": GenerateRequest(
                **{**vars(request), "identity": "anna", "adapter": "ipadapter-faceid", "adapter_scale": 1.0}
            ),
        }
        times = {name: [] for name in sides}
        for req in sides.values():  # warm-up: loads, conversions, attach
            studio.generate(req)
        for _ in range(args.repeats):
            for name, req in sides.items():
                times[name].append(studio.generate(req).timings["draft"])
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(
            f"draft {name:7s}: {value * 1000:8.1f} ms "
            f"(median of {args.repeats}, min {min(times[name]) * 1000:.1f})"
        )
    fact, faceid = medians["fact"] / medians["none"], medians["faceid"] / medians["none"]
    print(f"FACT adapter: {fact:.3f} x the plain draft; IP-Adapter-FaceID: {faceid:.3f} x")
    print(f"RESULT adapter_overhead_ratio={fact:.4f} faceid_overhead_ratio={faceid:.4f}")


if __name__ == "__main__":
    main()
