"""End-to-end GPU measurement: the bare diffusers pipeline and `imagegate serve`, same GPU, same run.

Grown from shared/gpu/measure_e2e.py (the reference measurement of issue 9). Phases append JSON
lines to $OUT/results.jsonl as they go, so a run cut short still reports what it measured:

  build     full-size SDXL architecture, random weights (bench.gpu_sdxl configs, seed 0), saved
            as a folder; reused by a later call on the same machine that runs no bare phase
            (same weights, so its compile cache stays warm and fp8-vs-bf16 compares alike)
  bare      eager bf16: batch 1 and batch 8, 1024², 20 steps, CFG 5 (output_type="pt")
  served    `imagegate serve --compile` (the default recipe: aot, the UNet and one image's
            decoder, built in the background; --serve-args picks another) on a cold compile
            cache: ready time; with a background build, three requests while the child
            builds, then the time until its packages serve (pending reaches 0);
            one request at a time (with the server's breakdown of it: queue,
            pipeline, mean step, decode, encode), a burst mixing n=1..8 at two warmed sizes,
            24 requests at concurrency 8; request-path compiles read from /metrics
  warm      the same server restarted on the warm compile cache: ready time
  barec     the bare pipeline compiled the same way, in this process: batch 1 and batch 8
            (under aot on copies of the served phases' packages, when there are any)
  fp8       `--quantize fp8`: ready, one request, 24 at concurrency 8, and PSNR / mean absolute
            pixel difference against the bf16 server's images on fixed seeds

--dry runs the same flow on the CPU with the built-in tiny model (256², 4 steps) to check it.
Usage on a GPU machine: OUT=/tmp/out python3 -m bench.gpu_e2e [--phases a,b] [--dry]
    [--serve-args '--compile-scope full'] [--sizes 1024] (one warm-up size: half the compiles)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import io
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import lines

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = lines.OUT
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.perf_counter()
PROMPT = "a lighthouse at dusk"


def emit(**kw):
    kw["t"] = round(time.perf_counter() - T0, 1)
    lines.emit("results.jsonl", kw)


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare_time(pipe, batch, steps, size):
    import torch

    gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        pipe(prompt=[PROMPT] * batch, generator=gens, num_inference_steps=steps, width=size,
             height=size, guidance_scale=5.0, output_type="pt")
    sync()
    return time.perf_counter() - t


def metric_sum(text, name, labels=None):
    """Sum of a metric's samples (optionally only those whose labels include ``labels``)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{([^}}]*)\}})? ([0-9.eE+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(2) or "") for k, v in (labels or {}).items()):
            total += float(m.group(3))
    return total


# Where one request's time goes, by the server's own histograms (means over the singles).
BREAKDOWN = {
    "server_s": "imagegate_generation_duration_seconds",  # admission to encoded result
    "queue_s": "imagegate_queue_wait_seconds",
    "pipeline_s": "imagegate_batch_duration_seconds",  # prompt encode, denoise, decode
    "step_s": "imagegate_denoise_step_seconds",  # a batch's mean step
    "decode_s": "imagegate_vae_decode_seconds",
    "encode_s": "imagegate_encode_seconds",  # image format and base64
}


def single_breakdown(before, after):
    """Mean per request of each BREAKDOWN histogram between two /metrics texts."""
    out = {}
    for key, name in BREAKDOWN.items():
        count = metric_sum(after, name + "_count") - metric_sum(before, name + "_count")
        total = metric_sum(after, name + "_sum") - metric_sum(before, name + "_sum")
        out[key] = round(total / count, 4) if count else None
    return out


def metrics_text(base):
    import httpx

    return httpx.get(base + "/metrics", timeout=30).text


LIVE: list[Server] = []


class Server:
    """One `imagegate serve` subprocess; stopped at exit, also when a timeout ends this run."""

    def __init__(self, name, folder, port, extra, cache):
        self.name, self.port = name, port
        self.base = f"http://127.0.0.1:{port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "gateway.cli", "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--data-dir", f"/tmp/igdata-{name}", "--cache-dir", str(cache),
               "--request-timeout-s", "900", "--max-queue-images", "256", *extra]
        self.log = open(OUT / f"server-{name}.log", "w")  # noqa: SIM115 - lives as long as the server
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(ROOT))
        LIVE.append(self)

    def wait_ready(self, limit):
        import httpx

        while time.perf_counter() - self.started < limit:
            if self.proc.poll() is not None:
                return None
            try:
                r = httpx.get(self.base + "/ready", timeout=5)
                if r.status_code == 200:
                    return round(time.perf_counter() - self.started, 1)
                if "failed" in r.text:  # the model failed to load: no point waiting
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return None

    def wait_packages(self, limit):
        """Seconds from start until no AOT package is pending (None: gave up, or none to wait)."""
        while time.perf_counter() - self.started < limit:
            if self.proc.poll() is not None:
                return None
            if metric_sum(metrics_text(self.base), "imagegate_aot_pending_packages") == 0:
                return round(time.perf_counter() - self.started, 1)
            time.sleep(1.0)
        return None

    def stop(self):
        if self in LIVE:
            LIVE.remove(self)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                # Its GPU memory must be free before the next phase's server loads.
                self.proc.wait(30)
        self.log.close()


async def post(client, base, size, steps, seed, n=1, fmt="png"):
    t = time.perf_counter()
    r = await client.post(base + "/v1/images/generations", json={
        "prompt": PROMPT, "size": f"{size}x{size}", "n": n, "response_format": "b64_json",
        "num_inference_steps": steps, "guidance_scale": 5.0, "seed": seed, "output_format": fmt,
    }, timeout=900)
    took = time.perf_counter() - t
    images = [d["b64_json"] for d in r.json().get("data", [])] if r.status_code == 200 else []
    return took, r.status_code, images


async def load(base, size, steps, total, conc, n=1):
    import httpx

    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient() as client:
        async def go(i):
            async with sem:
                return await post(client, base, size, steps, 1000 + i, n)

        t = time.perf_counter()
        res = await asyncio.gather(*(go(i) for i in range(total)))
        wall = time.perf_counter() - t
    lat = sorted(r[0] for r in res)
    ok = sum(1 for r in res if r[1] == 200 and r[2])
    return dict(total=total, conc=conc, ok=ok, wall=round(wall, 2),
                img_s=round(total * n / wall, 3), p50=round(lat[len(lat) // 2], 3),
                max=round(lat[-1], 3), codes=sorted({r[1] for r in res}))


async def burst(base, sizes, steps, ns):
    """Every (size, n) request at once; per request latency."""
    import httpx

    async with httpx.AsyncClient() as client:
        t = time.perf_counter()
        jobs = [(s, n) for s in sizes for n in ns]
        res = await asyncio.gather(*(post(client, base, s, steps, 5000 + i, n)
                                     for i, (s, n) in enumerate(jobs)))
        wall = time.perf_counter() - t
    return dict(requests=len(jobs), images=sum(n for _, n in jobs), wall=round(wall, 2),
                ok=sum(1 for r in res if r[1] == 200),
                slowest=round(max(r[0] for r in res), 2),
                per_request=[[s, n, round(r[0], 2)] for (s, n), r in zip(jobs, res, strict=True)])


def served_phase(srv, size, steps, kind, seq_n=5):
    """Single-request latency and saturation, with batch and compile figures from /metrics."""
    asyncio.run(load(srv.base, size, steps, 1, 1))  # first request after ready: not timed
    before = metrics_text(srv.base)
    singles = [asyncio.run(load(srv.base, size, steps, 1, 1))["max"] for _ in range(seq_n)]
    emit(phase=kind, kind="single", median_s=round(statistics.median(singles), 3),
         all_s=singles, **single_breakdown(before, metrics_text(srv.base)))
    before = metrics_text(srv.base)
    sat = asyncio.run(load(srv.base, size, steps, 24, 8))
    after = metrics_text(srv.base)
    images = (metric_sum(after, "imagegate_batch_images_sum")
              - metric_sum(before, "imagegate_batch_images_sum"))
    batches = (metric_sum(after, "imagegate_batch_images_count")
               - metric_sum(before, "imagegate_batch_images_count"))
    emit(phase=kind, kind="saturation", mean_batch=round(images / max(batches, 1), 2),
         request_compiles=metric_sum(after, "imagegate_compiles_total", {"reason": "request"}),
         eager_batches=metric_sum(after, "imagegate_eager_batches_total"),
         **sat)
    return after


def decode_images(b64s):
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"), dtype=np.float64)
            for b in b64s]


def quality(ref, test):
    import numpy as np

    mse = float(np.mean([np.mean((a - b) ** 2) for a, b in zip(ref, test, strict=True)]))
    mad = float(np.mean([np.mean(np.abs(a - b)) for a, b in zip(ref, test, strict=True)]))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return round(psnr, 2), round(mad, 3)


async def fixed_seed_images(base, size, steps, seeds):
    import httpx

    async with httpx.AsyncClient() as client:
        out = []
        for seed in seeds:
            _, code, images = await post(client, base, size, steps, seed)
            out.extend(images if code == 200 else [])
        return out


def _stop_servers_on_exit() -> None:
    # `timeout` (bench/gpu_device.sh session) sends SIGTERM to this process only: without this a
    # server left running would hold the GPU through the next measurement.
    atexit.register(lambda: [srv.stop() for srv in list(LIVE)])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def seed_packages(cache: Path, folder: Path) -> list[str]:
    """Copy the served phases' newest AOT packages into ``folder``; the names copied.

    So the bare pipeline runs on the very packages the server served (bare and served side by
    side on the default recipe) instead of building its own for minutes. Each package carries
    the signature of the calls it was exported for: one that does not fit the bare pipeline's
    calls is built again, in ``folder`` only.
    """
    import shutil

    from inference.aot import packages_in

    found = [d for d in (cache / "compile").glob("*/aot") if packages_in(d)]
    if not found:
        return []
    newest = max(found, key=lambda d: max(p.stat().st_mtime for p in packages_in(d)))
    for package in packages_in(newest):
        shutil.copy2(package, folder / package.name)
    return [p.name for p in packages_in(folder)]


def main():
    _stop_servers_on_exit()
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--phases", default="bare,served,warm,barec,fp8")
    ap.add_argument("--ready-limit", type=float, default=420)
    ap.add_argument("--live-limit", type=float, default=900,
                    help="seconds from a server's start to wait for its background AOT build")
    ap.add_argument("--sizes", default=None,
                    help="square sizes warmed and served, comma-separated (default 1024,768; "
                         "--dry: 256,128); one size halves a cold start's compiles, and the "
                         "burst then mixes batch sizes at that size only")
    ap.add_argument("--bare-attention", default="auto",
                    help="attention backends the bare eager phase is timed with, comma-separated "
                         "(e.g. auto,cudnn: each is moved to the front of torch's SDPA order "
                         "in turn, as --attention-backend does in the server); a name ending "
                         "in '/bench' also turns on cuDNN's convolution autotuner "
                         "(torch.backends.cudnn.benchmark) for that run")
    ap.add_argument("--serve-args", default="",
                    help="extra `imagegate serve` flags for every served phase, e.g. "
                         "'--compile-scope full'")
    a = ap.parse_args()
    phases = a.phases.split(",")
    import diffusers
    import torch

    size, size2, steps = (256, 128, 4) if a.dry else (1024, 768, 20)
    if a.sizes:
        sizes = [int(s) for s in a.sizes.split(",")]
        size, size2 = sizes[0], sizes[-1]
    cuda = torch.cuda.is_available() and not a.dry
    emit(phase="env", torch=torch.__version__, diffusers=diffusers.__version__,
         gpu=torch.cuda.get_device_name(0) if cuda else "cpu",
         date=time.strftime("%Y-%m-%d"), size=size, steps=steps)
    cache = Path("/tmp/igcache-e2e")
    if a.dry:
        from diffusers import StableDiffusionXLPipeline

        from inference.tiny import ensure_tiny

        folder = ensure_tiny(cache) / "base"
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        device = ["--device", "cpu"]
    else:
        from bench import gpu_sdxl

        folder = Path("/tmp/sdxl-rand")
        device = ["--device", "cuda"]
        if (folder / "model_index.json").is_file() and not {"bare", "barec"} & set(phases):
            # Same seed, same weights: keeping the files keeps their mtimes, so the compile
            # cache key (and a warm cache from an earlier call) still matches.
            pipe = None
            emit(phase="build", reused=str(folder))
        else:
            t = time.perf_counter()
            pipe = gpu_sdxl.build(torch.bfloat16, seed=0)
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
            pipe.save_pretrained(folder, safe_serialization=True)
            emit(phase="build", seconds=round(time.perf_counter() - t, 1))
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
    served_sizes = f"{size}x{size}" if size == size2 else f"{size}x{size},{size2}x{size2}"
    warm_flags = ["--warmup-sizes", served_sizes, "--warmup-batch-sizes",
                  "1,8", "--max-batch-images", "8", *shlex.split(a.serve_args)]

    if "bare" in phases:
        from inference.attention import prefer_attention_backend

        default_order = torch._C._get_sdp_priority_order()
        for variant in a.bare_attention.split(","):
            backend, _, bench = variant.partition("/")
            prefer_attention_backend(backend, "cuda" if cuda else "cpu")
            torch.backends.cudnn.benchmark = bench == "bench"
            bare_time(pipe, 1, 2, size)
            b1 = min(bare_time(pipe, 1, steps, size) for _ in range(2))
            b8 = bare_time(pipe, 8, steps, size)
            emit(phase="bare", mode="eager", attention=backend,
                 conv_benchmark=torch.backends.cudnn.benchmark, b1_s=round(b1, 3),
                 b8_s=round(b8, 3), b8_img_s=round(8 / b8, 3))
            # The next backend (and any later in-process phase) starts from torch's own order.
            torch._C._set_sdp_priority_order(list(default_order))
            torch.backends.cudnn.benchmark = False

    bf16_images = []
    if "served" in phases:
        srv = Server("compiled", folder, 18601, [*device, "--compile", *warm_flags], cache)
        ready = srv.wait_ready(a.ready_limit)
        text = metrics_text(srv.base) if ready else ""
        emit(phase="served", kind="ready_cold", ready_s=ready,
             warmup_compiles=metric_sum(text, "imagegate_compiles_total", {"reason": "warmup"}),
             compile_s=metric_sum(text, "imagegate_compile_seconds"),
             warmup_s=metric_sum(text, "imagegate_warmup_seconds"),
             aot_pending=metric_sum(text, "imagegate_aot_pending_packages"))
        if ready and metric_sum(text, "imagegate_aot_pending_packages"):
            # Served eagerly while the child builds (and competes for the host and the GPU).
            took = [asyncio.run(load(srv.base, size, steps, 1, 1))["max"] for _ in range(3)]
            emit(phase="served", kind="single_while_building", all_s=took)
            live = srv.wait_packages(a.live_limit)
            text = metrics_text(srv.base)
            emit(phase="served", kind="packages_live", live_s=live,
                 background_packages=metric_sum(text, "imagegate_compiles_total",
                                                {"reason": "background"}),
                 aot_pending=metric_sum(text, "imagegate_aot_pending_packages"))
        if ready:
            served_phase(srv, size, steps, "served")
            b = asyncio.run(burst(srv.base, (size, size2), steps, (1, 2, 3, 5, 8)))
            text = metrics_text(srv.base)
            emit(phase="served", kind="burst", **b,
                 request_compiles=metric_sum(text, "imagegate_compiles_total",
                                             {"reason": "request"}),
                 eager_batches=metric_sum(text, "imagegate_eager_batches_total"))
            bf16_images = asyncio.run(fixed_seed_images(srv.base, size, steps, (11, 12, 13, 14)))
            (OUT / "metrics-compiled.txt").write_text(metrics_text(srv.base))
        srv.stop()

    if "warm" in phases:
        srv = Server("warm", folder, 18602, [*device, "--compile", *warm_flags], cache)
        ready = srv.wait_ready(a.ready_limit)
        text = metrics_text(srv.base) if ready else ""
        emit(phase="warm", kind="ready_warm", ready_s=ready,
             compile_s=metric_sum(text, "imagegate_compile_seconds"),
             warmup_s=metric_sum(text, "imagegate_warmup_seconds"))
        srv.stop()

    if "barec" in phases:
        from gateway.settings import Settings
        from inference.compile import (
            CompileCache,
            CompileOptions,
            apply_compile,
            prepare_for_compile,
        )

        served = argparse.ArgumentParser(add_help=False)
        for flag in ("--compile-scope", "--compile-shapes", "--compile-method"):
            served.add_argument(flag, default="auto")
        served.add_argument("--compile-mode", default="default")
        served.add_argument("--quantize", default="none")
        served.add_argument("--attention-backend", default="auto")
        recipe, _ = served.parse_known_args(shlex.split(a.serve_args))
        if recipe.attention_backend != "auto" and cuda:
            from inference.attention import prefer_attention_backend

            prefer_attention_backend(recipe.attention_backend, "cuda")
        # The served phases' recipe, resolved as the server resolves it, for a fair comparison.
        scope, shapes, method = Settings.from_sources({
            "compile_scope": recipe.compile_scope, "compile_shapes": recipe.compile_shapes,
            "compile_method": recipe.compile_method, "compile_mode": recipe.compile_mode,
            "quantize": recipe.quantize}, environ={}).compile_recipe()
        options = CompileOptions(scope=scope, shapes=shapes, mode=recipe.compile_mode,
                                 method=method)
        CompileCache(cache / "bare-compile").activate()
        prepare_for_compile(pipe, options)
        aot_folder = None
        seeded: list[str] = []
        if options.method == "aot":
            # A folder of its own: AOT packages are named by size only, not by recipe or model.
            cache.mkdir(parents=True, exist_ok=True)
            aot_folder = Path(tempfile.mkdtemp(prefix="bare-aot-", dir=cache))
            seeded = seed_packages(cache, aot_folder)
        apply_compile(pipe, options, max_batch=16, aot_folder=aot_folder)
        t = time.perf_counter()
        for b in (1, 8):
            bare_time(pipe, b, 2, size)
        emit(phase="barec", compile_and_warm_s=round(time.perf_counter() - t, 1),
             seeded_packages=seeded)
        b1 = min(bare_time(pipe, 1, steps, size) for _ in range(3))
        b8 = bare_time(pipe, 8, steps, size)
        emit(phase="barec", mode=f"compiled ({scope}, {shapes} shapes, {method})", b1_s=round(b1, 3), b8_s=round(b8, 3),
             b8_img_s=round(8 / b8, 3))
    pipe = None
    if cuda:
        torch.cuda.empty_cache()

    if "fp8" in phases:
        srv = Server("fp8", folder, 18603, [*device, "--compile", "--quantize", "fp8",
                                            *warm_flags], cache)
        ready = srv.wait_ready(a.ready_limit)
        emit(phase="fp8", kind="ready", ready_s=ready)
        if ready:
            served_phase(srv, size, steps, "fp8", seq_n=3)
            if bf16_images:
                fp8_images = asyncio.run(fixed_seed_images(srv.base, size, steps,
                                                           (11, 12, 13, 14)))
                psnr, mad = quality(decode_images(bf16_images), decode_images(fp8_images))
                emit(phase="fp8", kind="quality_vs_bf16", psnr_db=psnr, mean_abs_diff=mad,
                     images=len(fp8_images))
        else:
            tail = (OUT / "server-fp8.log").read_text()[-1500:]
            emit(phase="fp8", kind="failed", log_tail=tail)
        srv.stop()
    emit(phase="done")


if __name__ == "__main__":
    main()
