"""LoRA and ControlNet requests on a compiled engine: right images, no compile on a request.

Starts an :class:`inference.Engine` on the built-in tiny-sdxl with ``--compile`` (the given scope
and shapes), then runs, one request at a time and twice each: plain, with the tiny LoRA, plain
again, with the tiny canny ControlNet, plain again. Each line of ``$OUT/compile_features.jsonl``
has the request's wall time, its mean absolute pixel difference from the first plain image, and
the warm-up and request-path compile counts, and the running count of batches that ran eagerly.
Expected: LoRA and ControlNet images differ from plain ones, plain images after them equal the
first, request-path compiles stay 0, and only LoRA and ControlNet batches run eagerly.

    python -m bench.compile_features --scope full --shapes batch    # CPU: a few minutes cold

Runs on a GPU as well (device and dtype automatic); it checks behaviour, not speed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import lines


def square() -> bytes:
    """A white square on black, as PNG: an edge map for the canny ControlNet."""
    a = np.zeros((64, 64, 3), dtype=np.uint8)
    a[16:48, 16:48] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


async def run(scope: str, shapes: str, cache: Path) -> None:
    """Start the engine, run the request sequence, emit one line per request."""
    from inference import ControlUnit, Engine, EngineConfig, GenerationRequest, Lora
    from inference.tiny import TINY_LORA
    from observability.metrics import Metrics

    metrics = Metrics()
    engine = Engine(EngineConfig(cache_dir=cache, warmup_sizes=((64, 64),), compile=True,
                                 compile_scope=scope, compile_shapes=shapes,
                                 max_batch_images=2), metrics)
    started = time.perf_counter()
    await engine.start()
    ready_s = time.perf_counter() - started

    def compiles(reason: str) -> float:
        return metrics.registry.get_sample_value("imagegate_compiles_total",
                                                 {"reason": reason}) or 0.0

    control = (ControlUnit(kind="canny", image=square(), preprocess=False),)
    sequence = [("plain", {}), ("lora", {"loras": (Lora(name=TINY_LORA),)}), ("plain", {}),
                ("control", {"control": control}), ("plain", {})]
    first: np.ndarray | None = None
    try:
        for label, extra in sequence:
            for _ in range(2):
                t = time.perf_counter()
                res = await engine.generate(GenerationRequest(
                    prompt="a cat", width=64, height=64, steps=4, seed=1, **extra))
                seconds = time.perf_counter() - t
                px = np.asarray(Image.open(io.BytesIO(res.images[0].data)).convert("RGB"),
                                dtype=np.float64)
                first = px if first is None else first
                line = dict(scope=scope, shapes=shapes, request=label, seconds=round(seconds, 3),
                            diff_from_plain=round(float(np.abs(px - first).mean()), 3),
                            ready_s=round(ready_s, 1), warmup_compiles=compiles("warmup"),
                            request_compiles=compiles("request"),
                            eager_batches=metrics.registry.get_sample_value(
                                "imagegate_eager_batches_total"),
                            device=engine.info.device if engine.info else "?",
                            date=time.strftime("%Y-%m-%d"))
                lines.emit("compile_features.jsonl", line)
    finally:
        await engine.drain(5)


def main() -> None:
    """Parse arguments and run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scope", default="full", choices=("blocks", "unet", "full"))
    ap.add_argument("--shapes", default="batch", choices=("dynamic", "static", "batch"))
    ap.add_argument("--cache-dir", default="/tmp/imagegate-compile-features")
    a = ap.parse_args()
    asyncio.run(run(a.scope, a.shapes, Path(a.cache_dir)))


if __name__ == "__main__":
    main()
