"""What every bench script shares: its command-line knobs and a quiet, fixed-thread torch."""

from __future__ import annotations

import argparse
import logging

import torch


def bench_args(doc: str | None) -> argparse.Namespace:
    """--size, --steps, --repeats and --threads, with the script's docstring as help."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # fixed, so both sides of each ratio run alike
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return args
