"""How long opening an AOTInductor package takes, by the two ways torch offers, in new processes.

``torch._inductor.aoti_load_package`` compares the host with the package's before it loads,
for a warning only, and finds the host's CPU vector ISA by compiling and ``dlopen``-ing probe
libraries in child processes. On an H200 host the UNet package's load took 32-36 s of a 58-63 s
warm start (docs/benchmarks.md §4.14); since then ``inference.aot`` calls the loader directly.
This times, each in a fresh process (as a server start is): the direct loader, the comparison
alone, and ``aoti_load_package``, on a small two-convolution package built first (its build
also probes, as a background build does, so the probes' libraries are cached as on a warm
start). One JSON line per step on stdout and in ``$OUT/aoti_load.jsonl``::

    python -m bench.aoti_load            # the device's GPU if it has one, else the CPU
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench import lines

PACKAGE = Path("/tmp/aoti-load-bench/small.pt2")
# Each step in its own process, bounded: a probe that hangs must not take the device call.
STEP_LIMIT_S = 150


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build() -> None:
    """Export and package a two-convolution model on this host's device."""
    import torch

    device = _device()
    started = time.perf_counter()
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(8, 4, 3, padding=1)).to(device).eval()
    example = torch.randn(2, 4, 32, 32, device=device)
    PACKAGE.parent.mkdir(parents=True, exist_ok=True)
    torch._inductor.aoti_compile_and_package(torch.export.export(model, (example,)),
                                             package_path=str(PACKAGE))
    lines.emit("aoti_load.jsonl", {"step": "build", "device": device,
                                   "torch": torch.__version__,
                                   "s": round(time.perf_counter() - started, 2)})


def load(how: str) -> None:
    """Open the package one way (or only compare the host), then call it once."""
    started = time.perf_counter()
    import torch

    device = _device()
    if device == "cuda":
        torch.cuda.init()
    imported = time.perf_counter()
    if how == "direct":
        from torch.export.pt2_archive._package import AOTICompiledModel

        model = AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(
            str(PACKAGE), "model", False, 1, -1))
    elif how == "aoti_load_package":
        model = torch._inductor.aoti_load_package(str(PACKAGE))
    else:
        from torch._inductor.codecache import get_device_information

        model = None
        get_device_information(device)
    took = time.perf_counter() - imported
    if model is not None:
        model(torch.randn(2, 4, 32, 32, device=device))
    lines.emit("aoti_load.jsonl", {"step": how, "device": device, "s": round(took, 3),
                                   "import_s": round(imported - started, 2)})


def main() -> None:
    """Build, then each way in a new process: direct first, so a slow probe cannot hide it."""
    if sys.argv[1:2] == ["build"]:
        return build()
    if sys.argv[1:2] == ["load"]:
        return load(sys.argv[2])
    for args in (["build"], ["load", "direct"], ["load", "compare"], ["load", "direct"],
                 ["load", "aoti_load_package"]):
        try:
            subprocess.run([sys.executable, "-m", "bench.aoti_load", *args], check=False,
                           timeout=STEP_LIMIT_S)
        except subprocess.TimeoutExpired:
            lines.emit("aoti_load.jsonl", {"step": " ".join(args), "timed_out_s": STEP_LIMIT_S})
    return None


if __name__ == "__main__":
    main()
