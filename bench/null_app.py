"""The full imagegate stack over a null executor, for the gateway-overhead benchmark.

Run: python -m bench.null_app PORT [DATA_DIR] [smooth|noise]. Auth (one API key), quotas,
validation, metrics, the usage ledger, the scheduler, the executor thread and PNG encoding in the
pool all run; the "model" returns a fixed 64×64 image instantly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import uvicorn

from gateway.app import create_app
from gateway.settings import Settings
from inference import Engine, EngineConfig, ModelInfo
from inference.batch import Batch
from inference.runner import StepTimes
from observability.metrics import Metrics

KEY = "bench-key"


class NullRunner:
    """Returns a cached image for every slot, instantly."""

    has_refiner = False

    def __init__(self, kind: str = "smooth") -> None:
        rng = np.random.default_rng(0)
        if kind == "noise":  # what tiny-sdxl makes: incompressible, the worst case for PNG
            self.image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        else:  # picture-like: gradients and a shape, as real generations compress
            y, x = np.mgrid[0:64, 0:64] / 64.0
            rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 4 * y)], axis=-1)
            rgb[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.05] = [0.9, 0.2, 0.1]
            self.image = (rgb * 255).astype(np.uint8)

    def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
        return [self.image for _ in batch.slots], StepTimes(steps=1)

    def count_tokens(self, prompt: str, negative_prompt: str) -> int:
        return len(prompt.split())


def null_engine(config: EngineConfig, metrics: Metrics, kind: str = "smooth") -> Engine:
    """An engine whose "model" is a :class:`NullRunner`."""
    info = ModelInfo(id="null", source="null", description="null executor", makes_noise=False,
                     default_width=64, default_height=64, has_refiner=False, created=0)
    return Engine(config, metrics, runner_factory=lambda _c: (NullRunner(kind), info))


def build(port: int, data_dir: str, kind: str = "smooth") -> object:
    settings = Settings.from_sources({"port": port, "api_keys": KEY, "data_dir": data_dir,
                                      "max_queue_images": 4096}, environ={})
    metrics = Metrics()
    engine = null_engine(settings.engine_config(), metrics, kind)
    return create_app(settings, engine=engine, metrics=metrics)


if __name__ == "__main__":
    port = int(sys.argv[1])
    data = sys.argv[2] if len(sys.argv) > 2 else str(Path("/tmp/imagegate-bench"))
    kind = sys.argv[3] if len(sys.argv) > 3 else "smooth"
    uvicorn.run(build(port, data, kind), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)
