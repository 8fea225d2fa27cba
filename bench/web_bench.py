"""A Generate round trip through the web studio against the same request through the Python API.

    uv run python bench/web_bench.py [--repeats 15] [--threads 1]

One process: a WebStudio on the tiny profile (64x64, 4 steps) served by uvicorn on a loopback port (the
real app: ``create_app``, Gradio queue and all), and the same resident ``Studio`` called directly —
``studio.generate(request)``, exactly what ``studio generate`` runs after start-up. Both write their PNG
through the same output sink (watermark and C2PA off: the bench times the web layer, not the marks).
  web:   gradio_client ``predict(..., api_name="/run_generate")``: HTTP upload of the inputs, the queue,
         the handler, the result files copied into Gradio's cache, the answer back over SSE.
  cli:   ``Studio.generate`` in this process (the CLI's own start-up, ~seconds of imports, is excluded).
Order: ``bench._common.interleave`` (A B B A blocks, median paired ratio) with an A/A arm (cli against cli).
RESULT keys: web_ms, cli_ms, web_over_cli (median paired ratio), web_overhead_ms, aa_pct.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from _common import bench_args, interleave, work_overrides

from studio.config import load_config
from studio.models.tiny import make_tiny_kit
from studio.request import GenerateRequest
from studio.web.app import serving
from studio.web.service import WebStudio

PROMPT = "a lighthouse keeper, 70 years old"


def main() -> None:
    args = bench_args(__doc__, repeats=15)
    logging.getLogger("studio").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="web-bench-"))
    kit = make_tiny_kit(work / "kit")
    overrides = work_overrides(args, work, kit)
    service = WebStudio(load_config("tiny", overrides=overrides), profile="tiny", overrides=overrides)
    request = GenerateRequest(PROMPT)
    inputs = [PROMPT, "", "", "", "", None, "", "", "", "", "", 42, 1, None, "", "", 0]  # the Generate tab

    from gradio_client import Client

    with serving(service) as url:
        client = Client(url, verbose=False)

        def web() -> float:
            start = time.perf_counter()
            client.predict(*inputs, api_name="/run_generate")
            return time.perf_counter() - start

        def cli() -> float:
            start = time.perf_counter()
            service.studio.generate(request)
            return time.perf_counter() - start

        web(), cli()  # warm: models loaded, the queue and the client connected
        got = interleave({"web": web, "A/A": cli}, cli, args.repeats)
    web_ms, cli_ms = got["web"].arm_ms, got["web"].reference_ms
    ratio, aa_pct = got["web"].ratio, got["A/A"].pct
    print(f"tiny profile (64x64, 4 steps), {args.threads} thread(s), {args.repeats} A B B A rounds per arm")
    print(got["web"].describe("web round trip (gradio_client -> queue -> Studio.generate -> files)", "cli"))
    print(got["A/A"].describe("A/A", "cli"))
    print(f"web round trip: {web_ms:.0f} ms median")
    print(f"same request through the Python API (what `studio generate` calls):    {cli_ms:.0f} ms median")
    print(
        f"web / cli: {ratio:.2f} (median paired ratio); web layer ≈ {web_ms - cli_ms:.0f} ms; "
        f"A/A {aa_pct:+.1f} %"
    )
    print(
        f"RESULT web_ms={web_ms:.0f} cli_ms={cli_ms:.0f} web_over_cli={ratio:.2f} "
        f"web_overhead_ms={web_ms - cli_ms:.0f} aa_pct={aa_pct:.1f}"
    )


if __name__ == "__main__":
    main()
