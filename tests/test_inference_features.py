"""Inpainting, ControlNet, LoRA, progress callbacks and partial images on tiny-sdxl."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image

from inference import ControlUnit, GenerationRequest, InitImage, Lora, Progress
from inference.batch import BatchKey
from inference.controlnet import canny, parse_controlnets
from inference.errors import FeatureUnavailable, InvalidRequest
from inference.progress import partial_steps
from inference.tiny import TINY_LORA

# The tiny_engine fixture lives on the session loop; its scheduler only runs there.
on_session_loop = pytest.mark.asyncio(loop_scope="session")

BASE = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "seed": 7}


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def pixels(image: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")).astype(np.int16)


def square() -> np.ndarray:
    """A grey square on black: clear edges for the canny preprocessor."""
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 200
    return img


async def generate(engine, **fields) -> np.ndarray:
    result = await engine.generate(GenerationRequest(**{**BASE, **fields}))
    return pixels(result.images[0])


class Gate:
    """Wraps the runner's step observer: holds the executor thread at ``at_step`` until released."""

    def __init__(self, inner: Any, at_step: int) -> None:
        self.inner = inner
        self.at_step = at_step
        self.reached = threading.Event()
        self.released = threading.Event()

    def step(self, batch, step, total, latents, phase) -> None:
        self.inner.step(batch, step, total, latents, phase)
        if step == self.at_step and not self.released.is_set():
            self.reached.set()
            assert self.released.wait(120), "the test never released the gate"


class gated:
    """Context manager installing a :class:`Gate` on the tiny engine's runner."""

    def __init__(self, engine, at_step: int = 2) -> None:
        self.runner = engine._runner
        self.gate = Gate(self.runner.observer, at_step)

    def __enter__(self) -> Gate:
        self.runner.observer = self.gate
        return self.gate

    def __exit__(self, *exc: object) -> None:
        self.gate.released.set()
        self.runner.observer = self.gate.inner

    async def wait_reached(self) -> None:
        reached = await asyncio.to_thread(self.gate.reached.wait, 120)
        assert reached, "the gated batch never reached its gate step"


# -- interrupt -------------------------------------------------------------------------------


class StepRecorder(Gate):
    """A gate that also records which steps each batch ran."""

    def __init__(self, inner: Any, at_step: int) -> None:
        super().__init__(inner, at_step)
        self.steps: dict[int, list[int]] = {}

    def step(self, batch, step, total, latents, phase) -> None:
        self.steps.setdefault(id(batch), []).append(step)
        super().step(batch, step, total, latents, phase)


@on_session_loop
async def test_interrupt_cuts_the_running_request_short_and_leaves_waiting_ones(tiny_engine):
    full = await generate(tiny_engine, steps=12)
    runner = tiny_engine._runner
    recorder = StepRecorder(runner.observer, at_step=2)
    runner.observer = recorder
    try:
        running = asyncio.create_task(tiny_engine.generate(
            GenerationRequest(**{**BASE, "steps": 12}), tag="me"))
        reached = await asyncio.to_thread(recorder.reached.wait, 120)
        assert reached, "the batch never reached step 2"
        waiting = asyncio.create_task(tiny_engine.generate(
            GenerationRequest(**{**BASE, "steps": 12, "seed": 8}), tag="me"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(tiny_engine._tagged.get("me", ())) < 2:
            assert loop.time() < deadline, "the second request was never queued"
            await asyncio.sleep(0.01)
        assert tiny_engine.interrupt("someone-else") == 0
        assert tiny_engine.interrupt("me") == 1, "only the started request is cut short"
        recorder.released.set()
        cut = await running
        after = await waiting
    finally:
        recorder.released.set()
        runner.observer = recorder.inner
    first, second = recorder.steps.values()
    assert max(first) < 12 and max(second) == 12, recorder.steps
    assert np.abs(pixels(cut.images[0]) - full).mean() > 0.5, "the cut image is the full one"
    assert len(after.images) == 1 and "me" not in tiny_engine._tagged


# -- inpainting --------------------------------------------------------------------------------


@on_session_loop
async def test_drain_stops_the_running_batch_at_its_deadline():
    """Past the drain timeout the running batch stops at its next step and its request fails
    as shutting down (retryable), so a long batch cannot outlive the orchestrator's grace."""
    from inference import Engine, EngineConfig
    from inference.errors import ShuttingDown
    from observability.metrics import Metrics
    from tests import serving

    engine = Engine(EngineConfig(cache_dir=serving.CACHE_DIR, warmup_sizes=((64, 64),)),
                    Metrics())
    await engine.start()
    runner = engine._runner
    recorder = StepRecorder(runner.observer, at_step=2)
    runner.observer = recorder
    try:
        running = asyncio.create_task(engine.generate(GenerationRequest(**{**BASE, "steps": 30})))
        assert await asyncio.to_thread(recorder.reached.wait, 120), "never reached step 2"
        drain = asyncio.create_task(engine.drain(0.2))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not running.done():
            assert loop.time() < deadline, "the drain deadline never failed the running request"
            await asyncio.sleep(0.01)
        recorder.released.set()
        await asyncio.wait_for(drain, 120)
    finally:
        recorder.released.set()
        runner.observer = recorder.inner
        await engine.drain(5)
    with pytest.raises(ShuttingDown, match="stopped this request"):
        running.result()
    (steps,) = recorder.steps.values()
    assert max(steps) < 30, f"ran every step after the deadline: {steps}"


@on_session_loop
async def test_inpaint_repaints_only_the_masked_area(tiny_engine):
    init = square()
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # white = repaint the left half
    out = await generate(tiny_engine, init_image=InitImage(data=png(init), strength=1.0,
                                                           mask=png(mask)))
    assert np.abs(out[:, 32:] - init[:, 32:]).max() <= 1, "kept half changed"
    assert np.abs(out[:, :32] - init[:, :32]).mean() > 20, "masked half was not repainted"

    # OpenAI's rule: a mask with transparency repaints where alpha is 0; same area, same image.
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, :32, 3] = 0
    out_alpha = await generate(tiny_engine, init_image=InitImage(data=png(init), strength=1.0,
                                                                 mask=png(rgba, "RGBA")))
    assert np.abs(out_alpha - out).max() <= 1

    # Without a mask it is plain img2img: everything may change.
    img2img = await generate(tiny_engine, init_image=InitImage(data=png(init), strength=1.0))
    assert np.abs(img2img[:, 32:] - init[:, 32:]).mean() > 20


def test_masked_and_unmasked_requests_never_share_a_batch():
    init = InitImage(data=b"x", strength=0.5)
    masked = InitImage(data=b"x", strength=0.5, mask=b"m")
    plain = BatchKey.of(GenerationRequest(prompt="p", init_image=init), "m", "Euler")
    inpaint = BatchKey.of(GenerationRequest(prompt="p", init_image=masked), "m", "Euler")
    assert plain != inpaint and inpaint.inpaint and not plain.inpaint


@on_session_loop
async def test_bad_mask_and_strength_are_refused_naming_the_field(tiny_engine):
    init = png(square())
    with pytest.raises(InvalidRequest) as err:
        tiny_engine.prepare(GenerationRequest(**BASE, init_image=InitImage(data=init, mask=b"no")))
    assert err.value.field == "init_image.mask"
    with pytest.raises(InvalidRequest) as err:
        tiny_engine.prepare(GenerationRequest(**BASE, init_image=InitImage(data=init, strength=0)))
    assert err.value.field == "init_image.strength"


# -- ControlNet --------------------------------------------------------------------------------


def test_canny_preprocessor_finds_the_square_edges():
    edges = np.asarray(canny(Image.fromarray(square())))
    assert edges.shape == (64, 64, 3)
    on = np.argwhere(edges[..., 0] > 0)
    assert len(on) > 0
    # Every edge pixel lies on (or next to) the square's border, none in the flat areas.
    near_border = (np.minimum(np.abs(on - 16), np.abs(on - 47)) <= 1).any(axis=1)
    assert near_border.all()


@on_session_loop
async def test_control_unit_changes_the_output_and_its_weight_is_honoured(tiny_engine):
    plain = await generate(tiny_engine)
    unit = ControlUnit(kind="canny", image=png(square()))
    controlled = await generate(tiny_engine, control=(unit,))
    assert np.abs(controlled - plain).mean() > 0.5, "the ControlNet had no effect"
    off = await generate(tiny_engine, control=(ControlUnit(kind="canny", image=png(square()),
                                                           weight=0.0),))
    assert np.abs(off - plain).max() <= 2, "weight 0 should leave the image as without control"
    early = await generate(tiny_engine, control=(ControlUnit(kind="canny", image=png(square()),
                                                             guidance_end=0.5),))
    assert np.abs(early - controlled).mean() > 0.1, "guidance_end was ignored"
    two = await generate(tiny_engine, control=(unit, ControlUnit(kind="canny", image=png(square()),
                                                                  weight=0.5, guidance_start=0.5)))
    assert np.abs(two - controlled).mean() > 0.1, "the second unit had no effect"


@on_session_loop
async def test_control_on_inpaint_and_img2img_runs(tiny_engine):
    unit = ControlUnit(kind="canny", image=png(square()), preprocess=False)
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    init = png(square())
    both = await generate(tiny_engine, control=(unit,),
                          init_image=InitImage(data=init, strength=0.9, mask=png(mask)))
    assert np.abs(both[32:] - square()[32:]).max() <= 1
    img2img = await generate(tiny_engine, control=(unit,), init_image=InitImage(data=init))
    assert img2img.shape == (64, 64, 3)


@on_session_loop
async def test_unknown_control_kind_and_bad_units_are_refused(tiny_engine):
    with pytest.raises(FeatureUnavailable) as err:
        tiny_engine.prepare(GenerationRequest(**BASE, control=(
            ControlUnit(kind="depth", image=png(square()), preprocess=False),)))
    assert err.value.field == "control" and "canny" in err.value.message
    for bad in (ControlUnit(kind="canny", image=png(square()), weight=3.0),
                ControlUnit(kind="canny", image=png(square()), guidance_start=0.6,
                            guidance_end=0.4),
                ControlUnit(kind="canny", image=b"not an image")):
        with pytest.raises(InvalidRequest) as err:
            tiny_engine.prepare(GenerationRequest(**BASE, control=(bad,)))
        assert err.value.field == "control"


def test_control_settings_and_batch_key():
    assert parse_controlnets(" canny=/a , Depth=/b") == (("canny", "/a"), ("depth", "/b"))
    with pytest.raises(ValueError, match="kind=path"):
        parse_controlnets("canny")
    a = GenerationRequest(prompt="p", control=(ControlUnit(kind="canny", image=b"1"),))
    b = GenerationRequest(prompt="p", control=(ControlUnit(kind="canny", image=b"2"),))
    c = GenerationRequest(prompt="p", control=(ControlUnit(kind="canny", image=b"1", weight=0.5),))
    key = BatchKey.of
    assert key(a, "m", "Euler") == key(b, "m", "Euler")  # images may differ within a batch
    assert key(a, "m", "Euler") != key(c, "m", "Euler")
    assert key(a, "m", "Euler") != key(GenerationRequest(prompt="p"), "m", "Euler")


# -- LoRA --------------------------------------------------------------------------------------


@on_session_loop
async def test_lora_changes_the_output_and_switches_off_again(tiny_engine):
    plain = await generate(tiny_engine)
    with_lora = await generate(tiny_engine, loras=(Lora(name=TINY_LORA),))
    assert np.abs(with_lora - plain).mean() > 0.5, "the LoRA had no effect"
    zero = await generate(tiny_engine, loras=(Lora(name=TINY_LORA, weight=0.0),))
    assert np.abs(zero - plain).max() <= 2, "LoRA weight 0 should leave the image unchanged"
    again = await generate(tiny_engine)
    assert np.abs(again - plain).max() == 0, "the adapter stayed active after its batch"


def test_a_lora_on_fused_qkv_projections_applies_in_full():
    """``--compile-scope full`` fuses Q/K/V; diffusers puts LoRA weights on the unfused layers,
    which fused attention never calls. Loading an adapter unfuses first (the engine also skips
    fusing when LoRAs are possible), so the output equals the unfused pipeline's."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from inference.lora import LoraAdapters, LoraLibrary
    from inference.tiny import ensure_tiny
    from tests import serving

    root = ensure_tiny(serving.CACHE_DIR)

    def with_lora(fuse: bool) -> np.ndarray:
        pipe = StableDiffusionXLPipeline.from_pretrained(root / "base")
        pipe.set_progress_bar_config(disable=True)
        if fuse:
            pipe.fuse_qkv_projections()
        LoraAdapters(pipe, LoraLibrary(root / "loras")).apply((Lora(name=TINY_LORA),))
        out = pipe(prompt="a cat", num_inference_steps=3, width=64, height=64,
                   generator=torch.Generator().manual_seed(1), output_type="np").images[0]
        return out * 255

    unfused = with_lora(fuse=False)
    fused = with_lora(fuse=True)
    assert np.abs(fused - unfused).mean() < 0.05, "the adapter missed the fused projections"


def test_plain_batches_after_a_lora_use_the_compiled_graphs_again(monkeypatch):
    """On a compiled pipeline, LoRA layers left in the UNet (even switched off) fail the warmed
    graphs' guards, and the serving stance would run every later batch eagerly. A plain batch
    unloads them instead: the next plain batch reuses the graph and gives the same pixels."""
    import functools

    import torch
    from diffusers import StableDiffusionXLPipeline

    from inference.compile import CompileOptions, CompileWatch, apply_compile
    from inference.loader import freeze
    from inference.lora import LoraAdapters, LoraLibrary
    from inference.tiny import ensure_tiny
    from tests import serving

    torch._dynamo.reset()
    # dynamo's eager backend: the same guards as inductor, without its compile time.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    root = ensure_tiny(serving.CACHE_DIR)
    pipe = StableDiffusionXLPipeline.from_pretrained(root / "base")
    pipe.set_progress_bar_config(disable=True)
    freeze(pipe)  # as the loader does
    # The UNet alone (as `full` compiles it): the adapters live there, and tracing the decoder
    # too would only add seconds.
    apply_compile(pipe, CompileOptions(scope="unet"))
    adapters = LoraAdapters(pipe, LoraLibrary(root / "loras"), unload_when_off=True)
    watch = CompileWatch(enabled=True)

    def run() -> np.ndarray:
        return pipe(prompt="a cat", num_inference_steps=2, width=64, height=64,
                    generator=torch.Generator().manual_seed(1), output_type="np").images[0] * 255

    try:
        plain = run()
        adapters.apply((Lora(name=TINY_LORA),))
        with_lora = run()
        adapters.apply(())
        graphs = watch.count()
        again = run()
        assert watch.count() == graphs, "a plain batch after a LoRA missed the warmed graphs"
    finally:
        torch._dynamo.reset()
    assert np.abs(with_lora - plain).mean() > 0.5, "the LoRA had no effect"
    assert np.abs(again - plain).max() < 1e-3


@on_session_loop
async def test_unknown_lora_is_refused_listing_what_is_there(tiny_engine):
    with pytest.raises(FeatureUnavailable) as err:
        tiny_engine.prepare(GenerationRequest(**BASE, loras=(Lora(name="nope"),)))
    assert err.value.field == "loras" and TINY_LORA in err.value.message
    with pytest.raises(InvalidRequest) as err:
        tiny_engine.prepare(GenerationRequest(**BASE, loras=(Lora(name=TINY_LORA, weight=9.0),)))
    assert err.value.field == "loras"
    assert tiny_engine.lora_names() == [TINY_LORA]


@on_session_loop
async def test_configured_lora_dir_and_controlnets(tmp_path):
    """--lora-dir replaces tiny-sdxl's own folder; --controlnet adds kinds next to tiny's canny."""
    import shutil

    from inference import Engine, EngineConfig
    from inference.tiny import ensure_tiny
    from observability.metrics import Metrics
    from tests import serving

    root = ensure_tiny(serving.CACHE_DIR)
    shutil.copy(root / "loras" / f"{TINY_LORA}.safetensors", tmp_path / "my.style-v1.safetensors")
    engine = Engine(EngineConfig(cache_dir=serving.CACHE_DIR, warmup_sizes=((64, 64),),
                                 lora_dir=tmp_path,
                                 controlnets=(("edges", str(root / "controlnet-canny")),)),
                    Metrics())
    await engine.start()
    try:
        assert engine.info.control_kinds == ("canny", "edges")
        assert engine.lora_names() == ["my.style-v1"]
        out = await generate(engine, loras=(Lora(name="my.style-v1"),), control=(
            ControlUnit(kind="edges", image=png(square()), preprocess=False),))
        assert out.shape == (64, 64, 3)
    finally:
        await engine.drain(5)


# -- progress and partial images ---------------------------------------------------------------


def test_partial_steps_are_evenly_spaced_and_always_complete():
    assert partial_steps(2, 4) == [2, 3]
    assert partial_steps(3, 30) == [8, 15, 23]
    assert partial_steps(3, 2) == [1, 1, 2]
    assert partial_steps(0, 10) == []


@on_session_loop
async def test_partial_images_and_started_callback(tiny_engine):
    events: list[Progress] = []
    result = await tiny_engine.generate(GenerationRequest(**{**BASE, "steps": 6},
                                                          partial_images=2),
                                        on_progress=events.append)
    assert events[0].started and events[0].step == 0 and events[0].total_steps == 6
    assert not any(e.started for e in events[1:])
    partials = [e for e in events if e.partial is not None]
    assert [p.partial_index for p in partials] == [0, 1]
    for p in partials:
        image = Image.open(io.BytesIO(p.partial.data))
        assert image.format == "PNG" and image.size == (64, 64)
        assert 1 <= p.step <= 6
    assert [e.step for e in events] == sorted(e.step for e in events)
    assert len(result.images) == 1


@on_session_loop
async def test_streaming_and_plain_requests_share_a_batch(tiny_engine):
    alone_stream = await generate(tiny_engine, seed=11)
    alone_plain = await generate(tiny_engine, seed=12)
    events: list[Progress] = []
    streaming = asyncio.create_task(tiny_engine.generate(
        GenerationRequest(**{**BASE, "seed": 11}, partial_images=1), on_progress=events.append))
    plain = asyncio.create_task(tiny_engine.generate(GenerationRequest(**{**BASE, "seed": 12})))
    a, b = await asyncio.gather(streaming, plain)
    assert a.timings.batch_images == 2 and b.timings.batch_images == 2, "they were not batched"
    assert np.abs(pixels(a.images[0]) - alone_stream).max() <= 2
    assert np.abs(pixels(b.images[0]) - alone_plain).max() <= 2
    assert [e.partial_index for e in events if e.partial is not None] == [0]


@on_session_loop
async def test_progress_snapshot_shows_the_running_batch(tiny_engine):
    idle = tiny_engine.progress()
    assert not idle.active and idle.fraction == 0.0
    control = gated(tiny_engine, at_step=3)
    with control as gate:
        task = asyncio.create_task(generate(tiny_engine, steps=8))
        await control.wait_reached()
        snap = tiny_engine.progress()
        assert snap.active and snap.step == 3 and snap.total_steps == 8
        assert snap.fraction == pytest.approx(3 / 8)
        assert snap.eta_seconds is not None and snap.eta_seconds >= 0
        gate.released.set()
        await task
    # Previews are made once someone asks: a second gated run has one while it is held.
    control = gated(tiny_engine, at_step=3)
    with control as gate:
        tiny_engine.progress()
        task = asyncio.create_task(generate(tiny_engine, steps=8))
        await control.wait_reached()
        preview = None
        for _ in range(1200):
            preview = tiny_engine.progress().preview
            if preview is not None:
                break
            await asyncio.sleep(0.05)
        assert preview is not None, "no preview appeared within 60 s while the batch was held"
        assert Image.open(io.BytesIO(preview)).size == (64, 64)
        gate.released.set()
        await task
    assert not tiny_engine.progress().active


@on_session_loop
async def test_cancelled_streaming_request_gets_no_more_callbacks(tiny_engine):
    events: list[Progress] = []
    control = gated(tiny_engine, at_step=2)
    with control as gate:
        streaming = asyncio.create_task(tiny_engine.generate(
            GenerationRequest(**{**BASE, "steps": 6, "seed": 21}, partial_images=3),
            on_progress=events.append))
        plain = asyncio.create_task(tiny_engine.generate(
            GenerationRequest(**{**BASE, "steps": 6, "seed": 22})))
        await control.wait_reached()
        streaming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await streaming
        seen = len(events)
        assert events and events[0].started
        gate.released.set()
        result = await plain
    assert result.timings.batch_images == 2
    assert len(events) == seen, "a cancelled request still got progress callbacks"
