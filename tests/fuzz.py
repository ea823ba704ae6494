"""Fuzz every dialect's routes with schemathesis, driven by the served ``/openapi.json``.

A live server (real socket) with the fake runner (tests/fakes.py), so generation is instant and
the run measures the HTTP layer: every response must be non-5xx and match what the document
declares (including each dialect's error envelope). ``make fuzz`` runs it large; the suite runs a
small one (tests/test_openapi.py).

    python -m tests.fuzz --max-examples 400
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests import serving
from tests.fakes import FakeRunner, engine_factory

CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance"


def run_fuzz(max_examples: int, *, seed: int | None = None, workers: int = 1,
             extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """Start a server with the fake runner and run ``st run`` against it; return the result."""
    # Small images and a short deadline keep each case fast; limits stay the defaults.
    with (tempfile.TemporaryDirectory(prefix="imagegate-fuzz-") as tmp,
          serving.live_server(Path(tmp), engine_factory=engine_factory(FakeRunner()),
                              request_timeout_s=30, job_execution_timeout_s=30) as srv):
        cmd = [str(Path(sys.executable).parent / "st"), "run", srv.url + "/openapi.json",
               "--checks", CHECKS, "--max-examples", str(max_examples),
               "--workers", str(workers), "--request-timeout", "60",
               "--generation-database", "none", "--no-color",
               "--phases", "examples,coverage,fuzzing",
               "--suppress-health-check", "all", *(extra or [])]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        env = {**os.environ, "SCHEMATHESIS_TELEMETRY": "false"}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)


def main() -> int:
    """``python -m tests.fuzz``: print schemathesis' report; exit non-zero on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=400,
                        help="cases per operation (each dialect has 3+ operations)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    res = run_fuzz(args.max_examples, seed=args.seed, workers=args.workers)
    print(res.stdout)
    print(res.stderr, file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
