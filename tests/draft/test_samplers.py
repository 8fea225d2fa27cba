"""Every A1111 sampler name reaches the draft as its own scheduler: same seed, different pixels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from studio.config import StudioConfig
from studio.draft import DraftRequest, open_draft_pipeline
from studio.models import open_catalogue
from studio.models.cache import ModelCache
from studio.types import SAMPLERS, Sampler

# 3 steps is the fewest at which every pair of samplers differs on the tiny SD 1.5 model. At 1 step most
# coincide: every solver's only step lands on sigma 0 and returns the model's x0 prediction (ancestral
# noise is 0 there too). At 2 steps several pairs differ by under 0.1 grey level (below 15 steps the
# multistep solvers run first-order updates only, diffusers' lower_order_final). At 3 steps the closest
# pair ("Euler" and "DPM++ 2M Karras") differs by about 1.2 grey levels on average.
STEPS = 3
MIN_MEAN_DIFFERENCE = 0.5  # grey levels: a real difference, not float rounding


def _request(sampler: Sampler) -> DraftRequest:
    return DraftRequest(
        prompt="a portrait, studio light",
        negative="blurry",
        seed=7,
        count=1,
        width=64,
        height=64,
        steps=STEPS,
        cfg=7.0,
        sampler=sampler,
    )


@pytest.fixture(scope="module")
def drafts(tiny_config: StudioConfig) -> dict[Sampler, tuple[np.ndarray, np.ndarray]]:
    """Two renders per sampler (same seed), in one pipeline that switches samplers between requests."""
    pipeline = open_draft_pipeline(
        tiny_config.draft.model, open_catalogue(tiny_config), tiny_config, ModelCache()
    )
    renders: dict[Sampler, list[np.ndarray]] = {s: [] for s in SAMPLERS}
    for _ in range(2):  # the second round comes after every other sampler was set on the pipeline
        for sampler in SAMPLERS:
            [(_, image)] = list(pipeline.render(_request(sampler)))
            renders[sampler].append(image.astype(np.int16))  # 64x64x3 BGR; int16 for differences
    return {s: (first, second) for s, (first, second) in renders.items()}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_sampler_renders_the_same_pixels_again(
    drafts: dict[Sampler, tuple[np.ndarray, np.ndarray]], sampler: Sampler
) -> None:
    first, second = drafts[sampler]
    assert first.shape == (64, 64, 3) and first.std() > 0
    assert np.array_equal(first, second)  # so the differences below come from the samplers alone


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(SAMPLERS, 2)))
def test_every_sampler_differs_from_every_other(
    drafts: dict[Sampler, tuple[np.ndarray, np.ndarray]], a: Sampler, b: Sampler
) -> None:
    difference = np.abs(drafts[a][0] - drafts[b][0]).mean()
    assert difference >= MIN_MEAN_DIFFERENCE, f"{a!r} and {b!r} differ by {difference:.3f} grey levels"
