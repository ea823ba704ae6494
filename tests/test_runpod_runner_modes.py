"""DiffusersRunner's refiner modes, checked on the pipeline calls they make (no model needed)."""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from inference import GenerationRequest, InitImage, Refine
from inference.batch import Batch, BatchKey, Slot, Ticket
from inference.runner import DiffusersRunner
from inference.samplers import SamplerRegistry


class Sched:
    config: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_config(cls, config: Any) -> Sched:
        return cls()


class Pipe:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[dict[str, Any]] = []
        self.scheduler = Sched()
        self.tokenizer = self.tokenizer_2 = None

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        n = len(kwargs["prompt"])
        return SimpleNamespace(images=[np.zeros((8, 8, 3), np.float32) for _ in range(n)])


class Registry(SamplerRegistry):
    def build(self, name: str | None, base_config: Any) -> Any:
        return SimpleNamespace(name=name)


def batch_of(request: GenerationRequest) -> Batch:
    key = BatchKey.of(request, "m", "DDIM")
    ticket = Ticket(request=request, key=key, seed=5, future=None)  # type: ignore[arg-type]
    return Batch(key, [Slot(ticket, 0)])


def runner() -> tuple[DiffusersRunner, Pipe, Pipe]:
    base, refiner = Pipe("base"), Pipe("refiner")
    reg = Registry(SamplerRegistry.standard()._specs, "DDIM")
    return DiffusersRunner(base, reg, refiner=refiner), base, refiner


def test_txt2img_refiner_as_img2img() -> None:
    r, base, refiner = runner()
    r.run(batch_of(GenerationRequest(prompt="p", width=64, height=64, steps=3,
                                     refine=Refine(steps=10, strength=0.3))))
    assert base.calls[0]["output_type"] == "latent" and "denoising_end" not in base.calls[0]
    call = refiner.calls[0]
    assert call["strength"] == 0.3 and call["num_inference_steps"] == 10
    assert "denoising_start" not in call


def test_txt2img_ensemble_of_experts() -> None:
    r, base, refiner = runner()
    r.run(batch_of(GenerationRequest(prompt="p", width=64, height=64, steps=3,
                                     refine=Refine(steps=10, high_noise_frac=0.8))))
    assert base.calls[0]["denoising_end"] == 0.8 and base.calls[0]["output_type"] == "latent"
    call = refiner.calls[0]
    assert call["denoising_start"] == 0.8 and "strength" not in call
    assert call["num_inference_steps"] == 10


def test_img2img_runs_only_the_refiner() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "PNG")
    r, base, refiner = runner()
    r.run(batch_of(GenerationRequest(prompt="", width=64, height=64, steps=3,
                                     init_image=InitImage(data=buf.getvalue(), strength=0.4),
                                     refine=Refine(steps=10, strength=0.4))))
    assert base.calls == []
    call = refiner.calls[0]
    assert call["strength"] == 0.4 and call["image"][0].size == (64, 64)
