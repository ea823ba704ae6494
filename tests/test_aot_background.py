"""AOT packages built in the background (``--aot-build background``, inference.aot_background).

The router and engine tests use the stand-in compiler of tests/test_aot.py (a package is a file
with a signature; "running" it runs the eager UNet, counted), so no test here compiles: the
background build is simulated by what the child really runs, the headless engine with
foreground builds, in this process. Two tests start the real child process, with compile off,
to check its plumbing: it starts, runs the headless engine, exits, and dies when cancelled.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from inference import aot
from inference.aot_background import (
    build_in_child,
    decode_config,
    encode_config,
    warm_up_headless,
)
from inference.engine import Engine, EngineConfig, diffusers_runner_factory
from inference.request import GenerationRequest
from observability.metrics import Metrics
from tests import serving
from tests.test_aot import StandInCompiler, eager, inputs, routed


def build_as_the_child(tmp_path: Path, compiler: StandInCompiler, unet: Any,
                       size: int = 8, **kw: Any) -> None:
    """What the child does: a foreground router over the same weights exports the package."""
    child_unet, _ = routed(tmp_path, build=compiler.build, load=compiler.load, **kw)
    child_unet.load_state_dict(unet.state_dict())
    child_unet(*inputs(2, size=size)[0], **inputs(2, size=size)[1])


def test_a_background_router_leaves_a_missing_package_pending_and_runs_its_size_eagerly(
        tmp_path):
    compiler = StandInCompiler()
    unet, router = routed(tmp_path, build=compiler.build, load=compiler.load, background=True)
    args, kwargs = inputs(2)
    torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))  # warm-up
    unet(*inputs(4)[0], **inputs(4)[1])  # a second warm-up batch: still one pending entry
    assert compiler.built == [], "warm-up built a package although builds are left to a child"
    assert router.pending() == [(8, 8)]
    with router.serving():
        for batch in (2, 8):
            args, kwargs = inputs(batch)
            torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
    assert router.misses() == 0, "a size waiting for its build counted as an unexpected miss"
    assert compiler.package_calls == 0 and router.count() == 0


def test_adopting_takes_the_package_the_child_built_and_serves_on_it(tmp_path):
    """The child is a foreground router over the same weights (what the headless engine is):
    the package it saves carries the signature the parent's warm-up recorded."""
    compiler = StandInCompiler()
    unet, parent = routed(tmp_path, build=compiler.build, load=compiler.load, background=True)
    unet(*inputs(2)[0], **inputs(2)[1])
    assert parent.adopt() == [], "adopted a package nobody built"
    assert parent.pending() == [], "a size whose build made nothing stays pending"
    # That size is now given up for this process; a fresh parent tries again.
    unet, parent = routed(tmp_path, build=compiler.build, load=compiler.load, background=True)
    unet(*inputs(2)[0], **inputs(2)[1])
    child_unet, child = routed(tmp_path, build=compiler.build, load=compiler.load)
    child_unet.load_state_dict(unet.state_dict())
    child_unet(*inputs(2)[0], **inputs(2)[1])
    assert child.count() == 1 and len(compiler.built) == 1
    calls = compiler.package_calls
    assert parent.adopt() == [(8, 8)]
    assert compiler.package_calls > calls, "adoption did not run the package once (kernel load)"
    assert parent.pending() == []
    calls = compiler.package_calls
    with parent.serving():
        for batch in (2, 5, 8):
            args, kwargs = inputs(batch)
            torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
    assert compiler.package_calls == calls + 3 and parent.misses() == 0


def test_while_the_build_runs_only_finished_packages_are_adopted(tmp_path):
    """A package is renamed into place when complete; one for other calls that warm-up found
    there is not taken for the new one until the build has replaced it."""
    compiler = StandInCompiler()
    old_unet, _ = routed(tmp_path, max_batch=16, build=compiler.build, load=compiler.load)
    old_unet(*inputs(2)[0], **inputs(2)[1])  # a package for other calls (another max batch)
    unet, parent = routed(tmp_path, build=compiler.build, load=compiler.load, background=True)
    unet(*inputs(2)[0], **inputs(2)[1])
    unet(*inputs(2, size=4)[0], **inputs(2, size=4)[1])
    assert parent.pending() == [(4, 4), (8, 8)]
    assert parent.adopt(final=False) == [], "took the old package for the one being built"
    assert parent.pending() == [(4, 4), (8, 8)]
    build_as_the_child(tmp_path, compiler, unet, size=4)  # the child's first size
    assert parent.adopt(final=False) == [(4, 4)]
    assert parent.pending() == [(8, 8)]
    assert parent.adopt(final=True) == [], "the stale package was adopted when the build ended"
    assert parent.pending() == []


def test_a_package_that_fails_while_the_build_runs_is_tried_again_when_it_ends(tmp_path):
    """The build's own process may hold the memory the first call needs: not a final verdict."""
    compiler = StandInCompiler()
    unet, parent = routed(tmp_path, build=compiler.build, load=compiler.load, background=True)
    unet(*inputs(2)[0], **inputs(2)[1])
    build_as_the_child(tmp_path, compiler, unet)
    compiler.fail_run = RuntimeError("CUDA error: out of memory")
    assert parent.adopt(final=False) == []
    assert parent.pending() == [(8, 8)]
    loaded = len(compiler.loaded)
    assert parent.adopt(final=False) == []
    assert len(compiler.loaded) == loaded, "polls retried the same package before the build ended"
    compiler.fail_run = None
    assert parent.adopt(final=True) == [(8, 8)]


def test_adopting_finds_a_lower_batch_limit_before_any_request_does(tmp_path, caplog):
    """As warm-up's largest batch does in the foreground (on a CPU inductor compiled 15 of 16)."""
    compiler = StandInCompiler(compiled_up_to=5)
    unet, parent = routed(tmp_path, max_batch=8, build=compiler.build, load=compiler.load,
                          background=True)
    unet(*inputs(2)[0], **inputs(2)[1])
    build_as_the_child(tmp_path, compiler, unet, max_batch=8)
    with caplog.at_level(logging.WARNING, logger="inference.aot"):
        assert parent.adopt() == [(8, 8)]
    assert any("up to 5" in r.getMessage() for r in caplog.records)
    calls = compiler.package_calls
    with parent.serving():
        for batch in (5, 6):
            args, kwargs = inputs(batch)
            torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
    assert compiler.package_calls == calls + 1, "batch 6 reached the package"
    assert parent.misses() == 1


def test_a_package_built_for_other_calls_is_not_adopted(tmp_path, caplog):
    compiler = StandInCompiler()
    unet, parent = routed(tmp_path, max_batch=8, build=compiler.build, load=compiler.load,
                          background=True)
    unet(*inputs(2)[0], **inputs(2)[1])
    other_unet, _ = routed(tmp_path, max_batch=16, build=compiler.build, load=compiler.load)
    other_unet(*inputs(2)[0], **inputs(2)[1])
    with caplog.at_level(logging.ERROR, logger="inference.aot"):
        assert parent.adopt() == []
    assert any("cannot serve" in r.getMessage() and "other calls" in r.getMessage()
               for r in caplog.records)
    calls = compiler.package_calls
    with parent.serving():
        unet(*inputs(2)[0], **inputs(2)[1])
    assert compiler.package_calls == calls and parent.misses() == 1


def test_a_package_another_build_left_before_warm_up_binds_after_the_deferred_layout(tmp_path):
    """A cold start defers the layout change to the first adoption; a package that another
    replica's build renamed in before warm-up is loaded there, so the layout changes first."""
    compiler = StandInCompiler()
    order: list[str] = []

    def load(path: Path, module: Any) -> Any:
        order.append("load")
        return compiler.load(path, module)

    child_unet, _ = routed(tmp_path, build=compiler.build, load=compiler.load)
    child_unet(*inputs(2)[0], **inputs(2)[1])  # the other replica's build
    unet, parent = routed(tmp_path, build=compiler.build, load=load, background=True,
                          layout=aot.run_once(lambda: order.append("layout")))
    unet.load_state_dict(child_unet.state_dict())
    unet(*inputs(2)[0], **inputs(2)[1])  # warm-up finds the package
    assert parent.pending() == [], "warm-up left a package it found to a build"
    assert order == ["layout", "load"], f"the package bound before the layout changed: {order}"


def test_no_package_is_adopted_while_lora_layers_are_in_the_unet(tmp_path):
    """A LoRA batch leaves its layers in until the next plain batch: the weights' names differ
    from the package's, which is not a reason to give the size up for this process."""
    compiler = StandInCompiler()
    unet, parent = routed(tmp_path, build=compiler.build, load=compiler.load, background=True)
    unet(*inputs(2)[0], **inputs(2)[1])
    build_as_the_child(tmp_path, compiler, unet)
    unet._hf_peft_config_loaded = True  # what peft sets while adapters are loaded
    loaded = len(compiler.loaded)
    assert parent.adopt(final=True) == []
    assert parent.pending() == [(8, 8)], "the size was given up while LoRA layers were in"
    assert len(compiler.loaded) == loaded, "a package was loaded onto the LoRA-wrapped weights"
    unet._hf_peft_config_loaded = False
    assert parent.adopt(final=True) == [(8, 8)]


def test_a_layout_change_that_failed_part_way_runs_again():
    calls: list[int] = []

    def change() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: out of memory")

    once = aot.run_once(change)
    with pytest.raises(RuntimeError):
        once()
    once()
    once()
    assert len(calls) == 2, "a failed layout change was taken as done, or a done one repeated"


# -- the engine: ready first, eager meanwhile, packages adopted between batches --------------


def _aot_config(tmp_path: Path, **overrides: Any) -> EngineConfig:
    shutil.copytree(serving.CACHE_DIR, tmp_path, dirs_exist_ok=True)
    return EngineConfig(cache_dir=tmp_path, compile=True, compile_scope="unet",
                        compile_shapes="batch", compile_method="aot", max_batch_images=2,
                        warmup_sizes=((64, 64),), **overrides)


def _factory_with(compiler: StandInCompiler) -> Any:
    def factory(config: EngineConfig) -> Any:
        runner, info = diffusers_runner_factory(config)
        for router in runner.compile_watch.routers:
            router._build = compiler.build
            router._load = compiler.load
        return runner, info
    return factory


def _fused(unet: Any) -> bool:
    """True once the UNet has the packages' layout: channels-last weights (and fused QKV,
    which tiny-sdxl does not get: its LoRA folder turns fusing off)."""
    return unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def _pixels(result: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)), dtype=np.float32)


async def _wait_for(condition: Any, what: str, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {deadline_s:.0f}s waiting for {what}"
        await asyncio.sleep(0.05)


async def _serves_one_image(engine: Engine) -> None:
    result = await engine.generate(GenerationRequest(prompt="x", width=64, height=64, steps=2))
    assert len(result.images) == 1, "the engine did not serve a plain request"


@pytest.fixture
def compile_env(monkeypatch):
    # The compile cache points inductor and Triton at its folder through the environment.
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)


async def test_the_engine_is_ready_before_the_build_and_adopts_its_packages_after(
        tmp_path, compile_env):
    parent_compiler, child_compiler = StandInCompiler(), StandInCompiler()
    release = asyncio.Event()
    seen: list[EngineConfig] = []

    async def child(config: EngineConfig, folder: Path) -> bool:
        seen.append(config)
        await release.wait()
        await warm_up_headless(config, runner_factory=_factory_with(child_compiler))
        return True

    metrics = Metrics()
    engine = Engine(_aot_config(tmp_path), metrics, runner_factory=_factory_with(parent_compiler),
                    aot_builder=child)
    await engine.start()
    try:
        assert engine.ready and parent_compiler.built == []
        assert metrics.registry.get_sample_value("imagegate_aot_pending_packages") == 1
        await _wait_for(lambda: seen, "the background build to start")
        assert seen[0].aot_build == "background", "the builder gets the server's own settings"
        unet = engine._runner.base.unet  # type: ignore[union-attr]
        assert not _fused(unet), "the layout changed before any package was adopted"
        request = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=2, seed=7)
        before = await engine.generate(request)
        assert parent_compiler.package_calls == 0, "a request ran on a package nobody built"
        assert metrics.registry.get_sample_value("imagegate_eager_batches_total") in (None, 0.0)

        release.set()
        await _wait_for(lambda: metrics.registry.get_sample_value(
            "imagegate_aot_pending_packages") == 0, "the package to be adopted")
        assert len(child_compiler.built) == 1, "the headless engine built no package"
        assert _fused(unet), "the package was adopted without the layout it was built for"
        # The headless engine ran only the run the package is exported from: 2 steps, each
        # one UNet call on the package it built (the full warm-up would make 12 more).
        assert child_compiler.package_calls == 2, "the child ran more than the export's run"
        assert metrics.registry.get_sample_value("imagegate_compiles_total",
                                                 {"reason": "background"}) == 1
        assert metrics.registry.get_sample_value("imagegate_compiles_total",
                                                 {"reason": "request"}) == 0
        calls = parent_compiler.package_calls
        after = await engine.generate(request)
        assert parent_compiler.package_calls >= calls + 2, "the request did not use the package"
        # The stand-in package runs the eager UNet: same seed, the same image up to the
        # rounding the layout change brings (fused QKV sums in another order).
        difference = np.abs(_pixels(after) - _pixels(before))
        assert difference.mean() < 1.0 and difference.max() <= 8, difference.max()
    finally:
        await engine.drain(10)


async def test_a_package_serves_as_soon_as_it_is_built_while_the_build_goes_on(
        tmp_path, compile_env, monkeypatch):
    import inference.engine

    monkeypatch.setattr(inference.engine, "AOT_POLL_S", 0.05)
    child_compiler = StandInCompiler()
    finish = asyncio.Event()

    async def child(config: EngineConfig, folder: Path) -> bool:
        await warm_up_headless(config, runner_factory=_factory_with(child_compiler))
        await finish.wait()  # a second size still building
        return True

    metrics = Metrics()
    engine = Engine(_aot_config(tmp_path), metrics,
                    runner_factory=_factory_with(StandInCompiler()), aot_builder=child)
    await engine.start()
    try:
        await _wait_for(lambda: metrics.registry.get_sample_value(
            "imagegate_compiles_total", {"reason": "background"}) == 1,
            "the package to be adopted while the build still runs")
        assert engine._background is not None and not engine._background.done()
        assert metrics.registry.get_sample_value("imagegate_aot_pending_packages") == 0
        finish.set()
        await asyncio.wait_for(engine._background, 60)
        assert metrics.registry.get_sample_value("imagegate_compiles_total",
                                                 {"reason": "background"}) == 1
    finally:
        await engine.drain(10)


async def test_a_build_that_ends_while_lora_layers_are_in_is_adopted_after_them(
        tmp_path, compile_env, monkeypatch):
    """The final adoption meets LoRA layers left by the last batch: the engine waits for a
    plain batch to unload them, then adopts, rather than serving eagerly until a restart."""
    import inference.engine

    monkeypatch.setattr(inference.engine, "AOT_POLL_S", 0.05)
    child_compiler = StandInCompiler()
    finals: list[list[str]] = []  # what each final adoption (after the build) adopted
    adopt = aot.AotWatch.adopt

    def counted(self: aot.AotWatch, *, final: bool = True) -> list[str]:
        adopted = adopt(self, final=final)
        if final:
            finals.append(adopted)
        return adopted

    monkeypatch.setattr(aot.AotWatch, "adopt", counted)
    metrics = Metrics()
    engine: Engine | None = None

    async def child(config: EngineConfig, folder: Path) -> bool:
        assert engine is not None
        # What a LoRA batch leaves in a compiled pipeline until the next plain batch.
        engine._runner.base.unet._hf_peft_config_loaded = True  # type: ignore[union-attr]
        await warm_up_headless(config, runner_factory=_factory_with(child_compiler))
        returned.set()
        return True

    returned = asyncio.Event()
    engine = Engine(_aot_config(tmp_path), metrics,
                    runner_factory=_factory_with(StandInCompiler()), aot_builder=child)
    await engine.start()
    try:
        await asyncio.wait_for(returned.wait(), 120)
        await _wait_for(lambda: len(finals) >= 3,
                        "the final adoption and two polls after it, with the layers in")
        assert finals[:3] == [[], [], []], "a package was adopted onto LoRA-wrapped weights"
        assert metrics.registry.get_sample_value("imagegate_aot_pending_packages") == 1, \
            "the size was given up (or adopted) while LoRA layers were in"
        assert not engine._background.done(), "the engine stopped waiting for the layers to go"
        engine._runner.base.unet._hf_peft_config_loaded = False  # the plain batch unloaded them
        await _wait_for(lambda: metrics.registry.get_sample_value(
            "imagegate_compiles_total", {"reason": "background"}) == 1,
            "the package to be adopted once the layers were gone")
        await asyncio.wait_for(engine._background, 60)
        assert metrics.registry.get_sample_value("imagegate_aot_pending_packages") == 0
    finally:
        await engine.drain(10)


async def test_a_drain_during_start_leaves_the_engine_stopped_and_builds_nothing(
        tmp_path, compile_env, monkeypatch):
    """SIGTERM while warm-up's compile cache is being saved: start() must not turn the
    drained engine ready again, nor start a build."""
    import threading

    import inference.engine

    saving, release = threading.Event(), threading.Event()

    def slow_save(self: Any) -> None:
        saving.set()
        release.wait(60)

    monkeypatch.setattr(inference.engine.CompileCache, "save", slow_save)
    builds: list[Path] = []

    async def child(config: EngineConfig, folder: Path) -> bool:
        builds.append(folder)
        return True

    engine = Engine(_aot_config(tmp_path), Metrics(),
                    runner_factory=_factory_with(StandInCompiler()), aot_builder=child)
    starting = asyncio.create_task(engine.start())
    await _wait_for(saving.is_set, "start() to reach the compile cache's save")
    await engine.drain(10)
    release.set()
    await asyncio.wait_for(starting, 60)
    assert not engine.ready, "start() made a drained engine ready"
    assert engine._background is None and builds == [], "a drained engine started a build"


async def test_draining_stops_a_background_build_in_progress(tmp_path, compile_env):
    started, stopped = asyncio.Event(), asyncio.Event()

    async def child(config: EngineConfig, folder: Path) -> bool:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.set()
            raise
        return True

    engine = Engine(_aot_config(tmp_path), Metrics(),
                    runner_factory=_factory_with(StandInCompiler()), aot_builder=child)
    await engine.start()
    await asyncio.wait_for(started.wait(), 60)
    await asyncio.wait_for(engine.drain(10), 60)
    assert stopped.is_set(), "drain left the background build running"


async def test_a_build_past_its_deadline_is_stopped_and_the_server_serves_on(
        tmp_path, compile_env, monkeypatch, caplog):
    import inference.engine

    monkeypatch.setattr(inference.engine, "AOT_POLL_S", 0.05)
    stopped = asyncio.Event()

    async def child(config: EngineConfig, folder: Path) -> bool:
        try:
            await asyncio.Event().wait()  # a build that hangs
        except asyncio.CancelledError:
            stopped.set()
            raise
        return True

    metrics = Metrics()
    engine = Engine(_aot_config(tmp_path, aot_build_timeout_s=0.3), metrics,
                    runner_factory=_factory_with(StandInCompiler()), aot_builder=child)
    with caplog.at_level(logging.ERROR):
        await engine.start()
        try:
            assert engine._background is not None
            await asyncio.wait_for(engine._background, 60)
            assert stopped.is_set(), "the child was left running past its deadline"
            assert not engine._background.cancelled(), "the deadline cancelled the engine's task"
            assert metrics.registry.get_sample_value("imagegate_aot_pending_packages") == 0
            await _serves_one_image(engine)
        finally:
            await engine.drain(10)
    assert any("--aot-build-timeout-s" in r.getMessage() for r in caplog.records)


async def test_a_failed_build_leaves_the_server_serving_eagerly(tmp_path, compile_env, caplog):
    async def child(config: EngineConfig, folder: Path) -> bool:
        return False

    metrics = Metrics()
    engine = Engine(_aot_config(tmp_path), metrics,
                    runner_factory=_factory_with(StandInCompiler()), aot_builder=child)
    with caplog.at_level(logging.ERROR):
        await engine.start()
        try:
            await _wait_for(lambda: metrics.registry.get_sample_value(
                "imagegate_aot_pending_packages") == 0, "the failed build to be reported")
            await _serves_one_image(engine)
        finally:
            await engine.drain(10)
    assert any("background AOT build failed" in r.getMessage() for r in caplog.records)
    assert metrics.registry.get_sample_value("imagegate_compiles_total",
                                             {"reason": "background"}) == 0


async def test_the_headless_engine_names_the_packages_it_could_not_build(tmp_path, compile_env):
    # What the child's exit status comes from: 1 when this list is not empty.
    built = StandInCompiler()
    config = _aot_config(tmp_path, aot_build="background")
    assert await warm_up_headless(config, runner_factory=_factory_with(built)) == []
    assert len(built.built) == 1
    config = _aot_config(tmp_path / "other", aot_build="background")
    failing = StandInCompiler(fail_build=True)
    assert await warm_up_headless(config, runner_factory=_factory_with(failing)) == [
        "unet 8x8"]


# -- the real child process (compile off: its plumbing, not a compile) -------------------------


def _plain_config() -> EngineConfig:
    return EngineConfig(cache_dir=serving.CACHE_DIR, compile=False, warmup_sizes=((64, 64),),
                        max_batch_images=1, warmup_batch_sizes=(1,))


async def test_the_child_runs_the_headless_engine_on_the_servers_settings_and_exits(tmp_path):
    folder = tmp_path / "aot"
    assert await asyncio.wait_for(build_in_child(_plain_config(), folder), 240)
    log = (folder / "build.log").read_text()
    assert "ready in" in log and "background AOT build done" in log, log[-2000:]
    assert "found in sys.modules" not in log, "the child ran a second copy of its module"
    assert not list(folder.glob("build-*.json")), "the settings file was left behind"


async def test_cancelling_the_build_kills_the_child(tmp_path, caplog):
    folder = tmp_path / "aot"
    with caplog.at_level(logging.INFO, logger="inference.aot_background"):
        task = asyncio.create_task(build_in_child(_plain_config(), folder))
        await _wait_for(lambda: any("started (pid" in r.getMessage() for r in caplog.records),
                        "the child to start")
    pid = int(re.search(r"pid (\d+)", next(
        r.getMessage() for r in caplog.records if "started (pid" in r.getMessage()))[1])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await _wait_for(gone, f"child {pid} to exit")


def test_the_child_reads_back_the_settings_it_is_given():
    original = EngineConfig(warmup_sizes=((64, 96),), controlnets=(("canny", "/m/c"),),
                            lora_dir=Path("/loras"), aot_build="foreground")
    decoded = decode_config(encode_config(original), EngineConfig)
    assert decoded == original and isinstance(decoded.lora_dir, Path)
