"""AOT packages built by a child process while the server already serves (``--aot-build background``).

Why: AOTInductor took 255 s to build the full-size UNet's package on an H200, and the server
that waited for it reached ``/ready`` after 283 s (docs/benchmarks.md §4.12): past the 240 s the
reference measurement waits, and four minutes in which a fresh replica serves nothing. With a
background build, a cold start is ready once warm-up has run eagerly; the sizes without a
package run eagerly until the child has built them, and the executor then adopts them between
batches (:meth:`inference.aot.AotRouter.adopt`). A warm start finds its packages and starts no
child.

Why a child process and not a thread: the build is minutes of Python (``torch.export``,
inductor's lowering) that would hold the GIL against the executor thread's kernel launches, and
whatever the compiler leaks or crashes on stays in the child. The child costs a second copy of
the model in accelerator memory while it builds (SDXL in bf16: about 7 GB), released when it
exits; ``--aot-build foreground`` builds in warm-up instead, before ready, for a card without
that room.

The child is the engine itself, started headless on the same settings with ``aot_build`` set
to ``foreground``: the same loader and the same warm-up calls, so the packages it saves under
the same keyed cache folder carry the signatures the parent's warm-up expects. It runs at a
lower CPU priority, holds a lock so that replicas sharing a cache folder on one host build one
at a time (the second then finds the packages and loads them), and exits when its parent dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from inference.engine import EngineConfig

logger = logging.getLogger(__name__)

# The child's CPU niceness: its compile workers must not starve the server's launch thread.
NICENESS = 10
# The child's log, next to the packages it builds (each build appends, after a header line).
LOG_NAME = "build.log"
# The child's entry point; its arguments follow in sys.argv[1:].
CHILD_MAIN = "import sys; from inference.aot_background import main; sys.exit(main())"
LOCK_NAME = ".build.lock"
# After SIGTERM, how long the child (and its compile workers) get before SIGKILL.
STOP_GRACE_S = 5.0

# Builds the packages ``config``'s warm-up needs into ``folder``; True when it succeeded.
Builder = Callable[["EngineConfig", Path], Awaitable[bool]]


async def build_in_child(config: EngineConfig, folder: Path) -> bool:
    """Run the headless engine in a child process until its warm-up has built the packages.

    Returns True when the child exits cleanly, having built every package (status 1: it could
    not build one; its log says which and why). Cancelling this stops the child and its
    compile workers (their own process group), so a draining server leaves no build behind;
    what it leaves is a temporary package file (and, from a server killed outright, its
    settings file), which :func:`inference.aot.remove_stale_temporaries` clears later.
    """
    folder.mkdir(parents=True, exist_ok=True)
    # Replicas sharing the folder may all be pid 1 in their containers.
    spec = folder / f"build-{os.getpid()}-{secrets.token_hex(4)}.json"
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    log_path = folder / LOG_NAME
    try:
        spec.write_bytes(encode_config(config))  # in the try: a full disk leaves no part of it
        # Appended to: another replica's build may be writing to it too.
        with log_path.open("ab") as log:
            log.write(f"--- background AOT build for pid {os.getpid()} at "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            # Not ``-m inference.aot_background``: the package's import of the engine imports
            # this module too, and runpy would then warn of, and run, a second copy of it.
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CHILD_MAIN, str(spec), str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env=env, start_new_session=True)
        logger.info("background AOT build started (pid %d); its log: %s", process.pid, log_path)
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            await _stop(process)
            raise
    finally:
        spec.unlink(missing_ok=True)
    if code != 0:
        logger.error("the background AOT build exited with status %d; its log: %s", code,
                     log_path)
    return code == 0


def encode_config(config: EngineConfig) -> bytes:
    """The engine's settings as JSON for the child (paths as strings)."""
    return msgspec.json.encode(config, enc_hook=_encode_path)


def decode_config(data: bytes, kind: type[EngineConfig]) -> EngineConfig:
    """:func:`encode_config`'s output read back."""
    return msgspec.json.decode(data, type=kind, dec_hook=_decode_path)


def _encode_path(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def _decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError(f"cannot decode {kind}")


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the child's process group (the child and its compile workers), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        if process.returncode is not None:
            return  # reaped: its process-group id may belong to another process by now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), wait)
            return
        except TimeoutError:
            continue


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One build at a time per cache folder on this host (replicas may share the folder)."""
    with (folder / LOCK_NAME).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _exit_with(parent: int) -> None:
    """End this process when ``parent`` is gone: a killed server must not leave a build running."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        logging.getLogger(__name__).error("the server (pid %d) is gone; stopping the build",
                                          parent)
        os._exit(3)

    threading.Thread(target=watch, name="imagegate-parent-watch", daemon=True).start()


async def warm_up_headless(config: EngineConfig, runner_factory: Any = None) -> list[str]:
    """What the child runs: the engine's start (load, warm-up: the foreground builds), then stop.

    Returns the packages (``name HxW``) it could not build. ``runner_factory`` replaces the
    model loader (tests); the child uses the engine's own.
    """
    from inference.engine import Engine
    from observability.metrics import Metrics

    # Foreground: the child is where the packages are built. Only the warm-up calls packages
    # are exported from (less time, and less memory beside the server's). No ControlNets:
    # warm-up does not use them, they are not part of the compile cache's key, and they cost
    # memory.
    config = msgspec.structs.replace(config, aot_build="foreground", warmup_build_only=True,
                                     controlnets=())
    engine = (Engine(config, Metrics()) if runner_factory is None
              else Engine(config, Metrics(), runner_factory=runner_factory))
    try:
        await engine.start()
        return engine.failed_packages()
    finally:
        await engine.drain(timeout=30.0)


def main(argv: list[str] | None = None) -> int:
    """The child, started by :func:`build_in_child` with ``CONFIG.json PARENT_PID`` as arguments."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m inference.aot_background CONFIG.json PARENT_PID", file=sys.stderr)
        return 2
    spec, parent = Path(args[0]), int(args[1])
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _exit_with(parent)
    os.nice(NICENESS)
    from inference.engine import EngineConfig

    config = decode_config(spec.read_bytes(), EngineConfig)
    started = time.perf_counter()
    with _build_lock(spec.parent):
        failed = asyncio.run(warm_up_headless(config))
    if failed:
        # A status the server logs, pointing at this log and the traceback above.
        logger.error("background AOT build failed in %.1fs: could not build or run %s",
                     time.perf_counter() - started, ", ".join(failed))
        return 1
    logger.info("background AOT build done in %.1fs", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
