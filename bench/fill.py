"""Do back-to-back batches fill? The batch-fill window against real clients, on the CPU.

Issue 9 saw a mean batch of 4.8 (of 8) at concurrency 8 on an H200: the clients of a full batch
read ~4 MB of base64 PNG each before they came back, later than the fill window waited. This
reproduces that shape without a GPU: the server is the real app with a stand-in runner whose
batch takes ``--per-call + --per-image × n`` seconds (the H200's 1024² costs, scaled down by
``--scale``) and returns 1024² noise images, so responses are as large as real ones; the clients
are a separate process, ``--concurrency`` closed-loop OpenAI ``b64_json`` requests that decode
their images, as the OpenAI SDK does. Each ``--fill-ms`` value (``auto``: the server default, a
fifth of a recent batch's time, at most 1 s) gets one server and one run; the mean batch comes
from the server's own ``imagegate_batch_images`` histogram.

    python -m bench.fill --fill-ms 0,250,auto [--lead-ms 50]

Prints one JSON line per run and appends it to ``$OUT/fill.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import lines

# Measured on the H200 (docs/benchmarks.md §4.1, bare eager): b1 1.055 s, b8 6.137 s.
PER_CALL_S = 0.33
PER_IMAGE_S = 0.726


def gpu_like_runner(per_call: float, per_image: float) -> Any:
    """A fake runner whose batch time grows with its size and whose images are 1024² noise."""
    from inference.batch import Batch
    from inference.runner import StepTimes
    from tests.fakes import FakeRunner

    class GpuLikeRunner(FakeRunner):
        def run(self, batch: Batch) -> tuple[list[np.ndarray], StepTimes]:
            started = time.perf_counter()
            n = len(batch.input_slots())
            h, w = batch.key.height, batch.key.width
            out = [np.random.default_rng(s.seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
                   for s in batch.slots]
            time.sleep(max(0.0, per_call + per_image * n - (time.perf_counter() - started)))
            total = time.perf_counter() - started
            self.batches.append([(s.ticket.prompt, s.seed) for s in batch.slots])
            return out, StepTimes(denoise=total * 0.9, steps=batch.key.steps,
                                  decode=total * 0.1, total=total)

    return GpuLikeRunner()


async def clients(url: str, total: int, concurrency: int, lead_s: float = 0.0) -> dict[str, Any]:
    """``total`` requests, ``concurrency`` at a time, each decoding its base64 image.

    With ``lead_s``, the first client starts that long before the others: an idle server then
    runs its request alone while the others queue, the start that put an H200 run out of step
    (docs/benchmarks.md §4.9).
    """
    import httpx

    latencies: list[float] = []
    todo = iter(range(total))
    failures = 0

    async def worker(client: httpx.AsyncClient, delay: float) -> None:
        nonlocal failures
        await asyncio.sleep(delay)
        for i in todo:
            t = time.perf_counter()
            r = await client.post(f"{url}/v1/images/generations", json={
                "prompt": f"a lighthouse {i}", "size": "1024x1024", "n": 1,
                "response_format": "b64_json"}, timeout=600)
            if r.status_code != 200:
                failures += 1
                continue
            for item in r.json()["data"]:
                base64.b64decode(item["b64_json"])
            latencies.append(time.perf_counter() - t)

    async with httpx.AsyncClient() as client:
        t = time.perf_counter()
        await asyncio.gather(*(worker(client, lead_s if k else 0.0) for k in range(concurrency)))
        wall = time.perf_counter() - t
    latencies.sort()
    return dict(requests=total, failures=failures, wall_s=round(wall, 2),
                images_per_s=round(len(latencies) / wall, 3),
                p50_s=round(latencies[len(latencies) // 2], 2) if latencies else None)


def run_one(fill: str, args: argparse.Namespace) -> dict[str, Any]:
    """One server with this fill setting, one client process; the result line."""
    import httpx

    from bench.gpu_e2e import metric_sum
    from tests import serving
    from tests.fakes import engine_factory

    per_call, per_image = PER_CALL_S * args.scale, PER_IMAGE_S * args.scale
    runner = gpu_like_runner(per_call, per_image)
    extra = {} if fill == "auto" else {"batch_fill_ms": float(fill)}
    with (tempfile.TemporaryDirectory(prefix="imagegate-fill-") as tmp,
          serving.live_server(Path(tmp), engine_factory=engine_factory(runner, **extra),
                              max_batch_images=8, max_size=1024, max_queue_images=64,
                              request_timeout_s=600, encode_workers=2) as srv):
        out = subprocess.run(
            [sys.executable, "-m", "bench.fill", "--client", srv.url, "--requests",
             str(args.requests), "--concurrency", str(args.concurrency),
             "--lead-ms", str(args.lead_ms)],
            capture_output=True, text=True, check=True)
        load = json.loads(out.stdout.strip().splitlines()[-1])
        text = httpx.get(f"{srv.url}/metrics", timeout=60).text
    images = metric_sum(text, "imagegate_batch_images_sum")
    batches = metric_sum(text, "imagegate_batch_images_count")
    return dict(fill_ms=fill, concurrency=args.concurrency, lead_ms=args.lead_ms,
                per_call_s=round(per_call, 3),
                per_image_s=round(per_image, 3), mean_batch=round(images / max(batches, 1), 2),
                batches=int(batches), sizes=[len(b) for b in runner.batches], **load,
                cores=os.cpu_count(), date=time.strftime("%Y-%m-%d"))


def main() -> None:
    """Run every ``--fill-ms`` setting in turn (or, with ``--client``, be the client process)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fill-ms", default="0,250,auto")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--scale", type=float, default=0.5,
                    help="multiplies the H200's batch costs (1: real time)")
    ap.add_argument("--lead-ms", type=float, default=0.0,
                    help="the first client starts this long before the others")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(clients(args.client, args.requests, args.concurrency,
                                             args.lead_ms / 1000))))
        return
    for fill in args.fill_ms.split(","):
        lines.emit("fill.jsonl", run_one(fill, args))


if __name__ == "__main__":
    main()
