"""Model loading, samplers, the executor and the batch scheduler. Knows nothing of HTTP or dialects."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("imagegate")
except PackageNotFoundError:  # a checkout used without installing
    __version__ = "0.0.0+unknown"

from inference.engine import Engine, EngineConfig, EngineState, ModelInfo
from inference.progress import Progress, ProgressSnapshot
from inference.request import (
    ControlUnit,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    InitImage,
    Lora,
    Refine,
    Timings,
)

__all__ = [
    "ControlUnit",
    "Engine",
    "EngineConfig",
    "EngineState",
    "GeneratedImage",
    "GenerationRequest",
    "GenerationResult",
    "InitImage",
    "Lora",
    "ModelInfo",
    "Progress",
    "ProgressSnapshot",
    "Refine",
    "Timings",
    "__version__",
]
