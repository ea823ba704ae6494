"""Every registered sampler name builds a fresh scheduler that runs one tiny generation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inference.batch import Batch, Slot
from inference.errors import UnknownSampler
from inference.samplers import SamplerRegistry

REGISTRY = SamplerRegistry.standard()
RUNPOD = ["PNDM", "KLMS", "DDIM", "K_EULER", "K_EULER_ANCESTRAL", "DPMSolverMultistep",
          "DPMSolverSinglestep"]
A1111 = ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LMS Karras", "DPM++ SDE",
         "DPM++ SDE Karras", "DPM2 a Karras", "Heun", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM2",
         "DPM2 Karras", "DPM2 a", "LMS"]


def test_required_names_are_registered():
    names = set(REGISTRY.names())
    assert set(RUNPOD) <= names
    assert set(A1111) <= names
    assert {"DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler",
            "UniPCMultistepScheduler", "KDPM2AncestralDiscreteScheduler"} <= names


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownSampler) as err:
        REGISTRY.resolve("Euler b")
    assert err.value.field == "sampler"
    assert "Euler a" in err.value.message and "K_EULER" in err.value.message


def test_lookup_is_case_insensitive_and_instances_are_fresh():
    assert REGISTRY.canonical_name("euler A") == "Euler a"
    from diffusers import EulerDiscreteScheduler

    base = EulerDiscreteScheduler().config
    one, two = REGISTRY.build("DPM++ 2M Karras", base), REGISTRY.build("DPM++ 2M Karras", base)
    assert one is not two
    assert one.config.use_karras_sigmas is True
    assert REGISTRY.build("DPM++ 2M SDE", base).config.algorithm_type == "sde-dpmsolver++"


@pytest.mark.parametrize("name", REGISTRY.names())
async def test_every_sampler_runs_a_tiny_generation(tiny_engine, name):
    from inference import GenerationRequest

    tiny = tiny_engine
    request = tiny.prepare(GenerationRequest(prompt="a cube", width=64, height=64, steps=3,
                                             sampler=name, seed=1))
    ticket = tiny._ticket(request, asyncio.get_running_loop().create_future())
    images, times = await asyncio.to_thread(tiny._runner.run, Batch(ticket.key, [Slot(ticket, 0)]))
    assert images[0].shape == (64, 64, 3)
    assert times.steps >= 1
    assert images[0].dtype == np.uint8 and images[0].std() > 0
