"""The same request gives the same picture, whatever ran before it."""

from __future__ import annotations

import random

import httpx
import numpy as np

from tests.api import image
from tests.contract import SAMPLER_VALUES


async def test_a_sampler_gives_the_same_pixels_whatever_sampler_ran_before(
    loaded_client: httpx.AsyncClient,
) -> None:
    # Each request's scheduler is built from the model's own scheduler config, never from
    # the one the previous request left in the pipeline (a Karras sampler used to make a
    # later EULER request run with Karras sigmas).
    first = {s: await image(loaded_client, sampler=s, steps=3) for s in SAMPLER_VALUES}
    order = list(SAMPLER_VALUES)
    random.Random(10).shuffle(order)
    for sampler in order:
        again = await image(loaded_client, sampler=sampler, steps=3)
        assert np.array_equal(again, first[sampler]), sampler
    # And right after each Karras sampler in particular:
    for karras in [s for s in SAMPLER_VALUES if "KARRAS" in s]:
        await image(loaded_client, sampler=karras, steps=3)
        assert np.array_equal(await image(loaded_client, steps=3), first["EULER"]), karras
