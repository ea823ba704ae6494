"""Sampler registry: every sampler or scheduler name the supported APIs send.

Each name maps to a diffusers scheduler class plus the config overrides that make it that sampler.

Schedulers are stateful (``set_timesteps`` mutates them), so the registry never hands out a shared
instance: :meth:`SamplerRegistry.build` makes a fresh one with ``from_config`` for every batch.
"""

from __future__ import annotations

from typing import Any

import msgspec

from inference.errors import UnknownSampler


class SamplerSpec(msgspec.Struct, frozen=True):
    """A diffusers scheduler class name and the config overrides applied on top of the model's."""

    scheduler: str
    overrides: dict[str, Any] = {}


_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}
# Stable Diffusion's own PNDM config: PLMS steps only (the Runge-Kutta warm-up needs many steps).
_PLMS = {"skip_prk_steps": True}

# AUTOMATIC1111 names (Baidu, Alibaba), following diffusers' own A1111 equivalence table.
_A1111: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec("EulerDiscreteScheduler"),
    "Euler a": SamplerSpec("EulerAncestralDiscreteScheduler"),
    "LMS": SamplerSpec("LMSDiscreteScheduler"),
    "LMS Karras": SamplerSpec("LMSDiscreteScheduler", _KARRAS),
    "Heun": SamplerSpec("HeunDiscreteScheduler"),
    "DPM2": SamplerSpec("KDPM2DiscreteScheduler"),
    "DPM2 Karras": SamplerSpec("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": SamplerSpec("KDPM2AncestralDiscreteScheduler"),
    "DPM2 a Karras": SamplerSpec("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": SamplerSpec("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": SamplerSpec("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M SDE": SamplerSpec("DPMSolverMultistepScheduler", _SDE),
    "DPM++ 2M SDE Karras": SamplerSpec("DPMSolverMultistepScheduler", {**_SDE, **_KARRAS}),
    "DPM++ 2M SDE Heun": SamplerSpec(
        "DPMSolverMultistepScheduler", {**_SDE, "solver_type": "heun"}
    ),
    "DPM++ 3M SDE": SamplerSpec("DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3}),
    "DPM++ SDE": SamplerSpec("DPMSolverSDEScheduler"),
    "DPM++ SDE Karras": SamplerSpec("DPMSolverSDEScheduler", _KARRAS),
    # diffusers has no exact 2S ancestral; the single-step DPM-Solver++ is its documented stand-in.
    "DPM++ 2S a": SamplerSpec("DPMSolverSinglestepScheduler"),
    "DDIM": SamplerSpec("DDIMScheduler"),
    "PLMS": SamplerSpec("PNDMScheduler", _PLMS),
    "UniPC": SamplerSpec("UniPCMultistepScheduler"),
    "LCM": SamplerSpec("LCMScheduler"),
}

# RunPod worker-sdxl's scheduler names (its README and handler).
_RUNPOD: dict[str, SamplerSpec] = {
    "PNDM": SamplerSpec("PNDMScheduler", _PLMS),
    "KLMS": SamplerSpec("LMSDiscreteScheduler"),
    "K_EULER": SamplerSpec("EulerDiscreteScheduler"),
    "K_EULER_ANCESTRAL": SamplerSpec("EulerAncestralDiscreteScheduler"),
    "DPMSolverMultistep": SamplerSpec("DPMSolverMultistepScheduler"),
    "DPMSolverSinglestep": SamplerSpec("DPMSolverSinglestepScheduler"),
}

# diffusers class names, as ModelsLab and Hugging Face send them. Inverse, variance-exploding and
# consistency-distillation-only schedulers are absent: they do not sample an SDXL epsilon model.
_DIFFUSERS_CLASSES = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
)


class SamplerRegistry:
    """Maps names to :class:`SamplerSpec` and builds fresh scheduler instances."""

    def __init__(self, specs: dict[str, SamplerSpec], default: str) -> None:
        self._specs = dict(specs)
        self._folded = {name.casefold(): name for name in specs}
        self.default = default
        self.resolve(default)

    @classmethod
    def standard(cls, default: str = "EulerDiscreteScheduler") -> SamplerRegistry:
        """The registry with every name from the supported APIs."""
        specs: dict[str, SamplerSpec] = {name: SamplerSpec(name) for name in _DIFFUSERS_CLASSES}
        specs["PNDMScheduler"] = SamplerSpec("PNDMScheduler", _PLMS)
        specs.update(_A1111)
        specs.update(_RUNPOD)
        return cls(specs, default)

    def names(self) -> list[str]:
        """All accepted names, in registration order."""
        return list(self._specs)

    def canonical_name(self, name: str | None) -> str:
        """The registered spelling of ``name`` (case-insensitive); raises :class:`UnknownSampler`."""
        if name is None:
            return self.default
        found = self._folded.get(name.strip().casefold())
        if found is None:
            raise UnknownSampler(name, self.names())
        return found

    def resolve(self, name: str | None) -> SamplerSpec:
        """The spec for ``name``; ``None`` is the default sampler."""
        return self._specs[self.canonical_name(name)]

    def build(self, name: str | None, base_config: Any) -> Any:
        """A new scheduler instance for ``name``, configured from the model's scheduler config."""
        import diffusers

        spec = self.resolve(name)
        scheduler_cls = getattr(diffusers, spec.scheduler)
        return scheduler_cls.from_config(base_config, **spec.overrides)
