"""Benchmark harness. ``python -m bench.run [--sections encoding,load,overhead] [--quick]``.

The GPU measurement is ``python -m bench.gpu_e2e`` (``make bench-gpu``): it needs a CUDA GPU and
writes JSON lines that docs/benchmarks.md section 4 is transcribed from.

Writes its results, with the machine, versions and settings, to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{os.cpu_count()} cores ({cpu}), GPU: {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"litestar {version('litestar')}; {time.strftime('%Y-%m-%d')}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never became ready")


# -- 1. encoding -----------------------------------------------------------------------------

def bench_encoding(repeats: int) -> str:
    from PIL import Image

    from inference.encoder import encode_image

    # A photo-like 1024² test card: smooth gradients, shapes and mild noise (pure noise would
    # make PNG look far worse than on real images).
    y, x = np.mgrid[0:1024, 0:1024] / 1024.0
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 4 * y)], axis=-1)
    rgb[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.05] = [0.9, 0.2, 0.1]
    rgb += np.random.default_rng(0).normal(0, 0.02, rgb.shape)
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype("uint8"))
    cases = [("PNG level 0", "png", 100, 0), ("PNG level 1 (default)", "png", 100, 1),
             ("PNG level 6 (Pillow default)", "png", 100, 6), ("JPEG quality 90", "jpeg", 90, 1),
             ("WebP quality 90", "webp", 90, 1), ("WebP lossless (compression 100)", "webp", 100, 1)]
    rows = [f"| format | ms per 1024² image (median of {repeats}) | bytes |", "|---|---:|---:|"]
    for label, fmt, quality, level in cases:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            data = encode_image(image, fmt, compression=quality, png_level=level)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t0)
        rows.append(f"| {label} | {statistics.median(times) * 1000:.1f} | {len(data):,} |")
    return "\n".join(rows)


# -- load generation -------------------------------------------------------------------------

async def _closed_loop(url: str, body: dict, concurrency: int, duration: float,
                       headers: dict[str, str] | None = None) -> tuple[int, list[float], float]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as c:
        start = time.perf_counter()
        stop = start + duration

        async def worker(i: int) -> None:
            nonlocal errors
            n = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await c.post("/v1/images/generations",
                                 json={**body, "prompt": f"{body['prompt']} {i}-{n}", "seed": n})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                n += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return errors, latencies, elapsed


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


def bench_load(size: int, steps: int, duration: float, levels: list[int]) -> tuple[str, dict]:
    results: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    body = {"prompt": "bench", "size": f"{size}x{size}", "response_format": "b64_json",
            "num_inference_steps": steps}
    for mode, max_batch in (("batching (max_batch_images=8)", 8), ("one at a time (max_batch_images=1)", 1)):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "IMAGEGATE_PORT": str(port),
               "IMAGEGATE_MAX_BATCH_IMAGES": str(max_batch), "IMAGEGATE_MAX_QUEUE_IMAGES": "512",
               "IMAGEGATE_WARMUP_SIZES": f"{size}x{size}",
               "IMAGEGATE_WARMUP_BATCH_SIZES": "1,2,4,8" if max_batch > 1 else "1",
               "IMAGEGATE_DATA_DIR": tempfile.mkdtemp(prefix="imagegate-bench-"),
               "IMAGEGATE_LOG_LEVEL": "warning"}
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url)
            for c in levels:
                errors, lat, elapsed = asyncio.run(_closed_loop(url, body, c, duration))
                ips = len(lat) / elapsed
                results[(mode, c)] = (ips, pct(lat, 50), pct(lat, 95), pct(lat, 99))
                print(f"  {mode} c={c}: {ips:.2f} img/s p50={pct(lat, 50):.3f}s "
                      f"p99={pct(lat, 99):.3f}s errors={errors}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    rows = ["| mode | concurrency | images/s | p50 s | p95 s | p99 s |", "|---|---:|---:|---:|---:|---:|"]
    for (mode, c), (ips, p50, p95, p99) in results.items():
        rows.append(f"| {mode} | {c} | {ips:.2f} | {p50:.3f} | {p95:.3f} | {p99:.3f} |")
    return "\n".join(rows), results


# -- 2. gateway overhead ---------------------------------------------------------------------

_WRK_LUA = """
wrk.method = "POST"
wrk.body = '{"prompt": "overhead", "size": "64x64", "response_format": "b64_json"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-key"
"""


def _wrk(url: str, duration: int, connections: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", f.name,
                          url + "/v1/images/generations"], capture_output=True, text=True, check=True)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    if non2xx:
        raise RuntimeError("overhead run got errors:\n" + out.stdout)
    assert m, out.stdout
    return float(m.group(1))


def _serve_and_measure(argv: list[str], ready_path: str, duration: int) -> float:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", argv[0], str(port), *argv[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + ready_path).status_code in (200, 404, 405):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{argv} did not start")
            time.sleep(0.2)
        _wrk(url, 2, 8)  # warm
        return _wrk(url, duration, 8)
    finally:
        proc.terminate()
        proc.wait(30)


def bench_micro(repeats: int = 3000) -> str:
    """Fixed per-request costs that the bare app does not pay, measured one by one."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.null_app import NullRunner, null_engine
    from inference import EngineConfig, GenerationRequest
    from inference.encoder import encode_image, to_pil
    from observability.metrics import Metrics

    rows = ["| step | µs |", "|---|---:|"]
    for kind in ("smooth", "noise"):
        image = NullRunner(kind).image
        t0 = time.perf_counter()
        for _ in range(repeats):
            encode_image(to_pil(image), "png", png_level=1)
        rows.append(f"| PNG level 1 encode, 64×64 {kind} image | "
                    f"{(time.perf_counter() - t0) / repeats * 1e6:.0f} |")
    pool = ThreadPoolExecutor(1)

    async def hops() -> float:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for _ in range(repeats):
            await loop.run_in_executor(pool, int)
        return (time.perf_counter() - t0) / repeats * 1e6

    rows.append(f"| one hand-off to a thread and back (run_in_executor) | {asyncio.run(hops()):.0f} |")

    async def engine_only() -> tuple[float, float]:
        engine = null_engine(EngineConfig(warmup_sizes=((64, 64),)), Metrics())
        await engine.start()
        req = GenerationRequest(prompt="x", width=64, height=64, steps=2, want_base64=True)
        out = []
        for conc in (1, 8):
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 2:
                await asyncio.gather(*(engine.generate(req) for _ in range(conc)))
                n += conc
            out.append(n / (time.perf_counter() - t0))
        await engine.drain(1)
        return out[0], out[1]

    one, eight = asyncio.run(engine_only())
    rows.append(f"| engine alone, no HTTP, concurrency 1 (images/s, not µs) | {one:.0f} |")
    rows.append(f"| engine alone, no HTTP, concurrency 8 (images/s, not µs) | {eight:.0f} |")
    return "\n".join(rows)


def bench_overhead(duration: int) -> tuple[str, float]:
    data = tempfile.mkdtemp()
    full = _serve_and_measure(["bench.null_app", data, "smooth"], "/ready", duration)
    print(f"  full stack, picture-like image: {full:.0f} req/s", flush=True)
    noise = _serve_and_measure(["bench.null_app", data, "noise"], "/ready", duration)
    print(f"  full stack, noise image: {noise:.0f} req/s", flush=True)
    bare = _serve_and_measure(["bench.bare_app"], "/", duration)
    print(f"  bare Litestar: {bare:.0f} req/s", flush=True)
    table = "\n".join([
        "| server | requests/s | vs bare |", "|---|---:|---:|",
        f"| bare Litestar app, same route, cached response | {bare:.0f} | 100% |",
        f"| full stack, null executor, picture-like 64×64 image | {full:.0f} | {full / bare:.0%} |",
        f"| full stack, null executor, 64×64 noise image | {noise:.0f} | {noise / bare:.0%} |",
    ])
    return table, full / bare


# -- document --------------------------------------------------------------------------------

def replace_section(doc: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in doc:
        return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    return doc.rstrip() + f"\n\n{block}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sections", default="encoding,load,overhead")
    parser.add_argument("--quick", action="store_true", help="short runs, for trying the harness")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    stamp = f"_Machine: {machine()}._"
    if "encoding" in sections:
        print("encoding…", flush=True)
        doc = replace_section(doc, "encoding", stamp + "\n\n" + bench_encoding(3 if args.quick else 7))
    if "load" in sections:
        print("load curve…", flush=True)
        levels = [1, 2, 4, 8, 16]
        duration = 4.0 if args.quick else 15.0
        table, res = bench_load(args.size, args.steps, duration, levels)
        b8 = res[("batching (max_batch_images=8)", 8)]
        s8 = res[("one at a time (max_batch_images=1)", 8)]
        summary = (f"At concurrency 8: batching {b8[0]:.2f} img/s vs one-at-a-time {s8[0]:.2f} img/s "
                   f"= **{b8[0] / s8[0]:.2f}×** (target ≥ 2×); p99 {b8[3]:.2f} s vs {s8[3]:.2f} s "
                   f"(target: no worse).")
        settings = (f"tiny-sdxl, {args.size}×{args.size}, {args.steps} steps, b64_json PNG, closed "
                    f"loop for {duration:.0f} s per point, client in a separate process on the same machine.")
        doc = replace_section(doc, "load", f"{stamp}\n\n{settings}\n\n{table}\n\n{summary}")
    if "overhead" in sections:
        print("gateway overhead…", flush=True)
        table, ratio = bench_overhead(5 if args.quick else 15)
        note = ("wrk, 1 thread, 8 connections, 15 s per server, on the same 2-core machine as the "
                "server. Full stack = one API key (auth + quota check), JSON validation, the "
                "scheduler, the executor thread, PNG level-1 encode + base64 in the encoder pool, "
                "metrics and the usage ledger. The bare app returns a cached body. "
                f"Ratio {ratio:.0%} (target ≥ 70%).")
        micro = bench_micro()
        doc = replace_section(doc, "overhead", f"{stamp}\n\n{note}\n\n{table}\n\n"
                              f"Per-request costs measured one by one (same machine):\n\n{micro}")
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(doc)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
