"""GPU-serving mechanics on the CPU: compile stance and counters, warm-up shapes, batches that
fill, cost-based admission, fast PNG. No real pipeline compile happens here (minutes on a CPU);
the compile tests use a small function and dynamo's eager backend, which exercises the same
guard/recompile machinery the UNet goes through."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time

import msgspec
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from inference import Engine, GenerationRequest
from inference.batch import Batch, Slot
from inference.buckets import BatchBuckets
from inference.compile import CompileWatch
from inference.cost import CostModel
from inference.encoder import EncoderPool, fpng_available
from inference.errors import InvalidRequest, QueueFull
from inference.runner import StepTimes
from tests.fakes import FakeRunner, engine_factory, fake_engine
from tests.serving import live_server


def req(prompt: str = "p", **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, width=kw.pop("width", 64), height=kw.pop("height", 64),
                             steps=kw.pop("steps", 2), **kw)


async def wait_until(cond, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.005)


# -- compile: never on the request path --------------------------------------------------------


def test_serving_stance_runs_an_unwarmed_shape_eagerly_instead_of_compiling():
    torch._dynamo.reset()

    def block(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x @ x.transpose(-1, -2)) * 2

    compiled = torch.compile(block, backend="eager", dynamic=False)
    watch = CompileWatch(enabled=True)
    before = watch.count()
    warm = torch.randn(2, 8, 8)
    compiled(warm)  # warm-up: compiles
    assert watch.count() == before + 1
    new_shape = torch.randn(3, 16, 16)
    with watch.serving():
        out = compiled(new_shape)  # would recompile (dynamic=False); runs eagerly instead
    assert watch.count() == before + 1, "a compile happened on the request path"
    assert watch.misses() == 1, "the eager call was not counted"
    torch.testing.assert_close(out, block(new_shape))
    with watch.serving():
        compiled(warm)  # the warmed shape still uses its compiled graph
    assert watch.count() == before + 1
    assert watch.misses() == 1, "a call that matched its graph was counted as eager"
    compiled(warm)
    compiled(new_shape)  # outside serving (warm-up): compiles, and is not the watch's business
    assert watch.misses() == 1


class FakeWatch(CompileWatch):
    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.compiled = 0
        self.missed = 0

    def count(self) -> int:
        return self.compiled

    def misses(self) -> int:
        return self.missed


class CompilingRunner(FakeRunner):
    """A fake runner that "compiles" the first time it sees one of ``compile_sizes``."""

    def __init__(self, compile_sizes: set[int]):
        super().__init__()
        self.compile_sizes = compile_sizes
        self.compile_watch = FakeWatch()
        self.seen: set[int] = set()

    def run(self, batch: Batch):
        size = len(batch.input_slots())  # what the graph sees: padding included
        if size in self.compile_sizes and size not in self.seen:
            self.seen.add(size)
            self.compile_watch.compiled += 1
        return super().run(batch)


async def test_compiles_are_counted_by_reason_and_logged_with_their_shape(caplog):
    runner = CompilingRunner(compile_sizes={1, 3})
    engine = fake_engine(runner)
    await engine.start()
    metrics = engine.metrics.registry
    assert metrics.get_sample_value("imagegate_compiles_total", {"reason": "warmup"}) == 1
    await engine.generate(req(n=2))
    assert metrics.get_sample_value("imagegate_compiles_total", {"reason": "request"}) == 0
    with caplog.at_level(logging.WARNING, logger="inference.executor"):
        await engine.generate(req(n=3))
    assert metrics.get_sample_value("imagegate_compiles_total", {"reason": "request"}) == 1
    assert any("ON THE REQUEST PATH" in r.message and "64x64 batch 3" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    await engine.drain(5)


class EagerOnSizeRunner(FakeRunner):
    """A fake runner whose compiled code matches no warmed graph at one image size."""

    def __init__(self, eager_width: int):
        super().__init__()
        self.eager_width = eager_width
        self.compile_watch = FakeWatch()

    def run(self, batch: Batch):
        if batch.key.width == self.eager_width:
            self.compile_watch.missed += 3
        return super().run(batch)


async def test_batches_that_run_eagerly_are_counted_and_logged(caplog):
    runner = EagerOnSizeRunner(eager_width=128)
    engine = fake_engine(runner)
    await engine.start()
    metrics = engine.metrics.registry
    await engine.generate(req(n=2))
    assert metrics.get_sample_value("imagegate_eager_batches_total") == 0
    with caplog.at_level(logging.INFO, logger="inference.executor"):
        await engine.generate(req(n=2, width=128))
    assert metrics.get_sample_value("imagegate_eager_batches_total") == 1
    assert any("ran eagerly" in r.message and "128x64 batch 2" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    assert metrics.get_sample_value("imagegate_compiles_total", {"reason": "request"}) == 0
    await engine.drain(5)


async def test_compiled_warmup_covers_batch_1_2_and_max_at_every_size_before_ready():
    runner = CompilingRunner(compile_sizes={1, 2, 4})
    engine = fake_engine(runner, max_batch_images=4, warmup_sizes=((64, 64), (128, 128)),
                         warmup_batch_sizes=(1,))
    info = engine._runner_factory(engine.config)[1]
    info.compiled = True  # as the real factory marks a model loaded with --compile
    await engine.start()
    assert engine.warmup_shapes() == [(64, 64, 1), (64, 64, 2), (64, 64, 4), (128, 128, 1),
                                      (128, 128, 2), (128, 128, 4)]
    assert engine.metrics.registry.get_sample_value(
        "imagegate_compiles_total", {"reason": "warmup"}) == 3
    runner.batches.clear()
    for n in (1, 2, 4):
        await engine.generate(req(n=n, width=128, height=128))
    assert engine.metrics.registry.get_sample_value(
        "imagegate_compiles_total", {"reason": "request"}) == 0
    await engine.drain(5)
    for top, warmed in ((8, [1, 2, 4, 8]), (6, [1, 2, 4, 6]), (1, [1])):
        wide = fake_engine(FakeRunner(), max_batch_images=top, warmup_batch_sizes=(1,))
        wide.info = msgspec.structs.replace(wide._runner_factory(wide.config)[1], compiled=True)
        assert [b for (_w, _h, b) in wide.warmup_shapes()] == warmed, top
    # CUDA graphs are recorded per batch size: every one is warmed, not only the powers of two.
    graphs = fake_engine(FakeRunner(), max_batch_images=6, warmup_batch_sizes=(1,),
                         compile_mode="reduce-overhead")
    graphs.info = msgspec.structs.replace(graphs._runner_factory(graphs.config)[1], compiled=True)
    assert [b for (_w, _h, b) in graphs.warmup_shapes()] == [1, 2, 3, 4, 5, 6]


class _StandInUNet(torch.nn.Module):
    """The UNet's call signature (batch-first tensors, some in a dict) on a few cheap layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        context = self.proj(encoder_hidden_states).mean(1) + added_cond_kwargs["text_embeds"]
        return (self.conv(sample) * timestep + context[:, :, None, None],)


class _StandInVAE(torch.nn.Module):
    def decode(self, latents, return_dict=False):
        return (torch.nn.functional.interpolate(latents, scale_factor=2.0),)


def test_batch_shapes_compile_one_graph_per_size_for_every_batch_from_two(monkeypatch):
    """``--compile-shapes batch``: the batch dimension is dynamic, height and width stay static."""
    import functools
    import types

    import torch._dynamo.config as dynamo_config

    from inference.compile import CompileOptions, apply_compile

    torch._dynamo.reset()
    # dynamo's eager backend: the same guards and recompiles as inductor, without its compile time.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    unet = _StandInUNet()
    pipe = types.SimpleNamespace(unet=unet, vae=_StandInVAE())
    with dynamo_config.patch(automatic_dynamic_shapes=True):
        apply_compile(pipe, CompileOptions(scope="full", shapes="batch"))
        # Compiled in place: still the diffusers model (its LoRA loading depends on that).
        assert pipe.unet is unet
        watch = CompileWatch(enabled=True)

        def unet_graphs(batch: int, size: int) -> int:
            before = watch.count()
            pipe.unet(torch.randn(batch, 4, size, size), torch.tensor(3.0),
                      encoder_hidden_states=torch.randn(batch, 7, 8),
                      added_cond_kwargs={"text_embeds": torch.randn(batch, 4)})
            return watch.count() - before

        def vae_graphs(batch: int, size: int) -> int:
            before = watch.count()
            pipe.vae.decode(torch.randn(batch, 4, size, size), return_dict=False)
            return watch.count() - before

        assert unet_graphs(2, 8) == 1
        # (Up to 15: on the CPU, convolution's shape rules guard the batch below 16.)
        assert [unet_graphs(b, 8) for b in (4, 6, 15)] == [0, 0, 0], "batch is not dynamic"
        assert unet_graphs(2, 12) == 1
        assert unet_graphs(6, 12) == 0
        # Had the second size turned height and width symbolic, a third would reuse that graph.
        assert unet_graphs(4, 16) == 1, "height and width became dynamic"
        assert vae_graphs(1, 8) == 1  # size-1 batches are a specialisation of their own
        assert vae_graphs(2, 8) == 1
        assert [vae_graphs(b, 8) for b in (3, 8, 1)] == [0, 0, 0]
    torch._dynamo.reset()


def test_compile_cache_key_changes_with_the_model_options_and_shape_set(tmp_path):
    from inference import EngineConfig
    from inference.compile import CompileOptions, cache_key
    from inference.engine import compile_key_extras

    def key(config: EngineConfig, options: CompileOptions | None = None, model: str = "m"
            ) -> str:
        return cache_key(str(tmp_path / model), "bfloat16", options or CompileOptions(),
                         compile_key_extras(config, None))

    base = EngineConfig(warmup_sizes=((1024, 1024),))
    assert key(base) == key(EngineConfig(warmup_sizes=((1024, 1024),)))
    others = [key(EngineConfig(warmup_sizes=((1024, 1024), (768, 768)))),
              key(EngineConfig(warmup_sizes=((1024, 1024),), max_batch_images=4)),
              key(EngineConfig(warmup_sizes=((1024, 1024),), batch_buckets=(1, 8))),
              key(EngineConfig(warmup_sizes=((1024, 1024),), attention_backend="cudnn")),
              key(EngineConfig(warmup_sizes=((1024, 1024),), quantize="fp8")),
              key(base, CompileOptions(scope="full")), key(base, model="other")]
    assert len({key(base), *others}) == 1 + len(others)


def test_batch_shapes_refuse_regional_compilation():
    from inference.compile import CompileOptions, apply_compile

    with pytest.raises(ValueError, match="scope='full' or 'unet'"):
        apply_compile(object(), CompileOptions(scope="blocks", shapes="batch"))


def test_unet_scope_compiles_the_whole_unet_and_leaves_the_decoder_eager(monkeypatch):
    """``--compile-scope unet``: the UNet's graphs as under ``full``, none for the decoder."""
    import functools
    import types

    import torch._dynamo.config as dynamo_config

    from inference.compile import CompileOptions, apply_compile, prepare_for_compile

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    unet, vae = _StandInUNet(), _StandInVAE()
    fused: list[dict[str, bool]] = []
    pipe = types.SimpleNamespace(unet=unet, vae=vae,
                                 fuse_qkv_projections=lambda **kw: fused.append(kw))
    eager_decode = vae.decode
    with dynamo_config.patch(automatic_dynamic_shapes=True):
        options = CompileOptions(scope="unet", shapes="batch")
        prepare_for_compile(pipe, options)
        assert fused == [{"unet": True, "vae": False}], "the eager VAE's attention was fused"
        apply_compile(pipe, options)
        assert pipe.unet is unet
        assert pipe.vae.decode == eager_decode, "the decoder was wrapped"
        assert unet.conv.weight.is_contiguous(memory_format=torch.channels_last)
        watch = CompileWatch(enabled=True)
        before = watch.count()
        for batch in (2, 4, 6):
            pipe.unet(torch.randn(batch, 4, 8, 8), torch.tensor(3.0),
                      encoder_hidden_states=torch.randn(batch, 7, 8),
                      added_cond_kwargs={"text_embeds": torch.randn(batch, 4)})
        assert watch.count() - before == 1, "the UNet's batch should be dynamic"
        before = watch.count()
        for batch in (1, 2, 8):
            out = pipe.vae.decode(torch.randn(batch, 4, 8, 8), return_dict=False)[0]
            assert out.shape == (batch, 4, 16, 16)
        assert watch.count() == before, "the decoder compiled"
    torch._dynamo.reset()


# -- static shapes: batch buckets -----------------------------------------------------------


def test_buckets_are_powers_of_two_up_to_the_maximum_which_is_always_one():
    assert BatchBuckets.powers_of_two(8).sizes == (1, 2, 4, 8)
    assert BatchBuckets.powers_of_two(6).sizes == (1, 2, 4, 6)
    assert BatchBuckets.powers_of_two(1).sizes == (1,)
    assert BatchBuckets.of((3, 16, 0), 8).sizes == (3, 8)
    buckets = BatchBuckets.of((2, 4), 8)
    assert [buckets.fit(n) for n in range(1, 10)] == [2, 2, 4, 4, 8, 8, 8, 8, 8]


def test_bucket_choice_pads_when_calls_cost_and_fills_a_smaller_bucket_when_images_cost():
    buckets = BatchBuckets.powers_of_two(8)
    assert buckets.choose(4) == 4 and buckets.choose(12) == 8
    assert buckets.choose(5) == 5  # no estimate yet: everything waiting starts now
    per_image = lambda k: 1.0 * k  # noqa: E731 - compute-bound: padding is pure waste
    assert [buckets.choose(n, per_image) for n in range(1, 9)] == [1, 2, 2, 4, 4, 4, 4, 8]
    per_call = lambda k: 10.0 + 0.1 * k  # noqa: E731 - overhead-bound: one call beats two
    assert [buckets.choose(n, per_call) for n in range(1, 9)] == list(range(1, 9))


def static_engine(runner: FakeRunner, **config):
    engine = fake_engine(runner, compile_shapes="static", **config)
    info = engine._runner_factory(engine.config)[1]
    info.compiled = True  # as the real factory marks a model loaded with --compile
    return engine


async def test_static_shapes_warm_every_bucket_pad_batches_and_never_compile_on_a_request():
    runner = CompilingRunner(compile_sizes={1, 2, 4, 8})
    engine = static_engine(runner, max_batch_images=8, warmup_sizes=((64, 64),))
    await engine.start()
    assert engine.warmup_shapes() == [(64, 64, 1), (64, 64, 2), (64, 64, 4), (64, 64, 8)]
    registry = engine.metrics.registry
    assert registry.get_sample_value("imagegate_compiles_total", {"reason": "warmup"}) == 4
    runner.call_sizes.clear()
    runner.batches.clear()
    results = [await engine.generate(req(n=n, seed=100 * n)) for n in (3, 5, 7)]
    assert registry.get_sample_value("imagegate_compiles_total", {"reason": "request"}) == 0
    # Every call ran a bucket; the real slots kept their own seeds and images.
    assert all(size in (1, 2, 4, 8) for size in runner.call_sizes), runner.call_sizes
    assert sorted(seed for batch in runner.batches for _, seed in batch) == sorted(
        100 * n + i for n in (3, 5, 7) for i in range(n))
    for n, result in zip((3, 5, 7), results, strict=True):
        assert len(result.images) == n
        for i, image in enumerate(result.images):
            pixel = np.asarray(Image.open(io.BytesIO(image.data)))[0, 0, 0]
            assert pixel == (100 * n + i) % 256, (n, i, pixel)
    padded = sum(runner.call_sizes) - sum(len(b) for b in runner.batches)
    assert padded > 0
    assert registry.get_sample_value("imagegate_padded_images_total") == padded
    await engine.drain(5)


async def test_static_shapes_buckets_can_be_chosen_and_the_maximum_is_always_one():
    engine = static_engine(FakeRunner(), max_batch_images=6, batch_buckets=(2, 4))
    await engine.start()
    assert engine.batch_buckets() == BatchBuckets((2, 4, 6))
    assert [b for _, _, b in engine.warmup_shapes()] == [2, 4, 6]
    await engine.drain(5)
    dynamic = fake_engine(FakeRunner(), max_batch_images=6, batch_buckets=(2, 4))
    await dynamic.start()
    assert dynamic.batch_buckets() is None  # only static-shape graphs need buckets
    await dynamic.drain(5)


class PerImageRunner(FakeRunner):
    """Reports a cost proportional to the images computed, padding included (a busy GPU)."""

    def run(self, batch: Batch):
        arrays, times = super().run(batch)
        units = len(batch.input_slots()) * batch.key.steps * batch.key.width * batch.key.height
        times.total = units / 1e6
        return arrays, times


async def test_with_a_compute_bound_cost_a_queue_of_five_runs_as_four_then_one_unpadded():
    runner = PerImageRunner()
    engine = static_engine(runner, max_batch_images=8, warmup_sizes=((64, 64), (128, 128)))
    await engine.start()
    assert engine._scheduler.cost.known
    runner.call_sizes.clear()
    runner.batches.clear()
    runner.hold()
    first = asyncio.create_task(engine.generate(req("first")))
    await asyncio.to_thread(runner.entered.wait, 30)
    rest = [asyncio.create_task(engine.generate(req(f"r{i}"))) for i in range(5)]
    await wait_until(lambda: engine.queued_images == 5, "5 images queued")
    runner.release()
    await asyncio.gather(first, *rest)
    assert [len(b) for b in runner.batches] == [1, 4, 1], runner.batches
    assert runner.call_sizes == [1, 4, 1]
    await engine.drain(5)


@pytest.mark.asyncio(loop_scope="session")
async def test_padding_leaves_the_real_images_of_the_tiny_pipeline_unchanged(tiny_engine):
    """Padded slots repeat the last real slot's inputs; the real slots' pixels do not move."""
    engine = tiny_engine
    request = engine.prepare(GenerationRequest(prompt="a red cube", n=3, width=64, height=64,
                                               steps=3, seed=11))
    ticket = engine._ticket(request, asyncio.get_running_loop().create_future())
    plain = await engine._executor.run(Batch(ticket.key, [Slot(ticket, i) for i in range(3)]))
    padded_batch = Batch(ticket.key, [Slot(ticket, i) for i in range(3)], pad_to=4)
    padded = await engine._executor.run(padded_batch)
    assert not plain.failures and not padded.failures
    assert [times.padded for _, times in padded.calls] == [1]
    assert len(padded.images) == 3
    for (slot_a, a), (slot_b, b) in zip(plain.images, padded.images, strict=True):
        assert slot_a.index == slot_b.index
        # Same seeds and prompts; batched CPU kernels may round differently by one level.
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2, slot_a.index


# -- batches that fill ----------------------------------------------------------------------


async def held_batch(engine, runner: FakeRunner, first: GenerationRequest,
                     queued: list[GenerationRequest]) -> tuple[asyncio.Task, list[asyncio.Task]]:
    """Start ``first`` on a held runner and queue ``queued`` behind it; the runner stays held."""
    runner.hold()
    running = asyncio.create_task(engine.generate(first))
    await asyncio.to_thread(runner.entered.wait, 30)
    waiting = [asyncio.create_task(engine.generate(r)) for r in queued]
    images = sum(r.n for r in queued)
    await wait_until(lambda: engine.queued_images == images,
                     f"{images} images queued behind {first.prompt!r}")
    return running, waiting


async def test_back_to_back_batches_wait_briefly_to_fill_but_a_lone_request_starts_at_once():
    # A 60 s window: a wait that should not happen would outlast the 30 s waits below.
    runner = FakeRunner()
    engine = fake_engine(runner, max_batch_images=4, batch_fill_ms=60_000)
    await engine.start()
    runner.batches.clear()
    sched = engine._scheduler
    # A lone request on an idle executor, and the same client's next one, start at once.
    for prompt in ("lone", "lone again"):
        await asyncio.wait_for(engine.generate(req(prompt)), 30)

    # Closed-loop clients out of step: "a" runs alone while b, c and d queue behind it. When it
    # ends, the next batch waits for a's client to come back (a2) instead of starting with three
    # and leaving a2 to run alone, which would repeat with every batch after.
    a, bcd = await held_batch(engine, runner, req("a"), [req(p) for p in ("b", "c", "d")])
    runner.release()
    await asyncio.wait_for(a, 30)
    key = sched._fill_key
    assert engine.queued_images == 3 and sched._fill_deadline(key) > time.monotonic(), (
        "b, c and d should wait for a's client")
    a2 = asyncio.create_task(engine.generate(req("a2")))
    await asyncio.wait_for(asyncio.gather(a2, *bcd), 30)

    # The last batch answered 4: one new request waits for the rest (the fill window) instead
    # of running alone and making the others wait a whole batch.
    x = asyncio.create_task(engine.generate(req("x")))
    await wait_until(lambda: engine.queued_images == 1, "x queued")
    assert sched._fill_deadline(key) > time.monotonic()
    efg = [asyncio.create_task(engine.generate(req(p))) for p in ("e", "f", "g")]
    await asyncio.wait_for(asyncio.gather(x, *efg), 30)
    prompts = [[p for p, _ in b] for b in runner.batches]
    assert prompts == [["lone"], ["lone again"], ["a"], ["b", "c", "d", "a2"],
                       ["x", "e", "f", "g"]], prompts
    await engine.drain(5)


async def test_the_fill_window_waits_only_for_its_own_group_and_never_while_draining():
    runner = FakeRunner()
    engine = fake_engine(runner, max_batch_images=4, batch_fill_ms=60_000)
    await engine.start()
    runner.batches.clear()
    # Requests that cannot share a batch (different steps) are in different groups. a1 waits
    # for a0's client (a0b) and they run as one batch of two; b, of another group, queued
    # behind that batch, then starts as soon as it ends: the two clients just answered come
    # back to their own group, not to b's.
    a0, (a1,) = await held_batch(engine, runner, req("a0", steps=2), [req("a1", steps=2)])
    runner.release()
    await asyncio.wait_for(a0, 30)
    a0b, (b,) = await held_batch(engine, runner, req("a0b", steps=2), [req("b", steps=3)])
    runner.release()
    await asyncio.wait_for(asyncio.gather(a1, a0b, b), 30)

    # Draining: no client comes back, so queued requests do not wait for the window either (the
    # drain's own 30 s deadline would fail them first).
    c, de = await held_batch(engine, runner, req("c"), [req("d"), req("e")])
    drain = asyncio.create_task(engine.drain(30))
    await wait_until(lambda: not engine._scheduler._accepting, "the scheduler draining")
    runner.release()
    await asyncio.wait_for(asyncio.gather(c, *de), 40)
    await asyncio.wait_for(drain, 40)
    prompts = [[p for p, _ in b] for b in runner.batches]
    assert prompts == [["a0"], ["a1", "a0b"], ["b"], ["c"], ["d", "e"]], prompts


# -- admission by cost ----------------------------------------------------------------------


class CostlyRunner(FakeRunner):
    """Reports 0.01 s per call + 2 s per megapixel-step-unit, like a slow accelerator."""

    def run(self, batch: Batch):
        arrays, _ = super().run(batch)
        key = batch.key
        units = key.width * key.height / 1024**2 * key.steps / 25 * len(batch.slots)
        mp = key.width * key.height / 1e6 * len(batch.slots)
        return arrays, StepTimes(denoise=0.0, steps=key.steps, decode=0.0,
                                 total=0.01 + 0.05 * mp + 2.0 * units)


def test_cost_model_recovers_per_call_pixel_and_step_costs():
    model = CostModel()
    assert not model.known
    for mp, units in ((0.26, 0.02), (0.26, 0.03), (1.05, 0.08), (1.05, 0.13)):
        model.observe(mp, units, 0.2 + 0.1 * mp + 3.0 * units)
    assert model.known
    per_call, per_mp, per_unit = model.coefficients()
    assert per_call == pytest.approx(0.2, abs=1e-6)
    assert per_mp == pytest.approx(0.1, abs=1e-6)
    assert per_unit == pytest.approx(3.0, abs=1e-6)


async def _costly_engine() -> tuple[CostlyRunner, Engine]:
    """An engine with a fitted cost model and a 30 s request timeout (one image per batch)."""
    runner = CostlyRunner()
    engine = fake_engine(runner, max_batch_images=1, request_timeout_s=30.0,
                         warmup_sizes=((64, 64), (128, 128)), warmup_batch_sizes=(1,))
    await engine.start()
    return runner, engine


async def _queue_behind_one_running(runner: CostlyRunner, engine: Engine) -> list[asyncio.Task]:
    """Three requests of ~8 s each: one held running, two queued (~24 s of work ahead)."""
    runner.hold()
    queued = [asyncio.create_task(engine.generate(req(f"q{i}", width=1024, height=1024,
                                                      steps=100))) for i in range(3)]
    await wait_until(lambda: runner.entered.is_set() and engine.queued_images == 2,
                     "one running, two queued")
    return queued


async def test_admission_refuses_what_cannot_finish_inside_the_request_timeout():
    runner, engine = await _costly_engine()
    assert engine._scheduler.cost.known
    # Alone: 1024², 150 steps, n=4 ≈ 2 s × 24 units ≈ 48 s > 30 s.
    with pytest.raises(InvalidRequest) as err:
        await engine.generate(req(width=1024, height=1024, steps=150, n=4))
    assert "request timeout" in err.value.message and err.value.field == "n"
    # Behind a queue: the fourth ~8 s request would finish after 30 s.
    queued = await _queue_behind_one_running(runner, engine)
    with pytest.raises(QueueFull) as full:
        await engine.generate(req("late", width=1024, height=1024, steps=100))
    assert full.value.retry_after > 1.0
    runner.release()
    await asyncio.gather(*queued)
    await engine.drain(5)


async def test_a_caller_with_its_own_time_limit_is_admitted_against_it_and_not_timed_out():
    """Async jobs: their execution timeout, not --request-timeout-s, bounds them (jobs.py)."""
    runner, engine = await _costly_engine()
    big = req(width=1024, height=1024, steps=150, n=4)  # ≈ 48 s alone: over the 30 s timeout
    with pytest.raises(InvalidRequest) as err:
        await engine.generate(big, time_limit_s=20.0)
    assert "20s left of its execution timeout" in err.value.message and err.value.field == "n"
    # Behind a queue that a synchronous request could not wait out, a job is admitted: its
    # limit counts from its own start.
    queued = await _queue_behind_one_running(runner, engine)
    job = asyncio.create_task(engine.generate(req("job", width=1024, height=1024, steps=100),
                                              time_limit_s=20.0))
    await wait_until(lambda: engine.queued_images == 3, "the job queued behind the others")
    runner.release()
    await asyncio.gather(*queued)
    assert (await job).images, "the job ran"
    await engine.drain(5)


def test_n_larger_than_the_queue_is_a_400_not_a_429(tmp_path):
    runner = FakeRunner()
    with live_server(tmp_path, engine_factory=engine_factory(runner), max_queue_images=4) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.images.generate(prompt="many", n=5, size="64x64")
        assert err.value.body["param"] == "n"
        assert "queue" in err.value.body["message"]


# -- encoding -------------------------------------------------------------------------------


@pytest.mark.skipif(not fpng_available(), reason="fpng not installed")
def test_fast_png_is_lossless_and_valid():
    pool = EncoderPool(2)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    [(image, seconds)] = pool.submit_many([(array, "png", 100, 7, True)]).result(30)
    decoded = Image.open(io.BytesIO(image.data))
    assert decoded.format == "PNG" and decoded.size == (80, 48)
    assert np.array_equal(np.asarray(decoded.convert("RGB")), array)
    assert image.b64 == base64.b64encode(image.data).decode("ascii")
    assert image.seed == 7 and seconds >= 0
    [(jpeg, _)] = pool.submit_many([(array, "jpeg", 80, 7, False)]).result(30)
    assert Image.open(io.BytesIO(jpeg.data)).format == "JPEG"
    pool.shutdown()


def test_base64_is_the_standard_librarys_whichever_writes_it(monkeypatch):
    from inference import encoder

    data = np.random.default_rng(1).integers(0, 256, 3 * 1024 + 2, dtype=np.uint8).tobytes()
    expected = base64.b64encode(data).decode("ascii")
    assert encoder.b64_string(data) == expected
    monkeypatch.setattr(encoder, "_b64_string", None)  # pybase64 not installed
    assert encoder.b64_string(data) == expected


# -- bounds the engine enforces for every dialect --------------------------------------------


async def test_refiner_steps_and_prompt_length_are_bounded_centrally():
    from inference import Refine

    engine = fake_engine(FakeRunner(), max_steps=50, max_prompt_chars=100)
    with pytest.raises(InvalidRequest) as err:
        engine.prepare(req(refine=Refine(steps=10_000_000)))
    assert err.value.field == "refine" and "50" in err.value.message
    with pytest.raises(InvalidRequest) as err:
        engine.prepare(req("x" * 101))
    assert err.value.field == "prompt"
    with pytest.raises(InvalidRequest) as err:
        engine.prepare(req("ok", negative_prompt="y" * 101))
    assert err.value.field == "negative_prompt"


# -- CUDA-only paths, checked where the CPU can ---------------------------------------------


def test_bfloat16_pipeline_output_rounds_as_diffusers_does_in_float32():
    from inference.runner import to_uint8

    values = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    as_bf16 = values.to(torch.bfloat16)
    expected = (as_bf16.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    (got,) = to_uint8(as_bf16)
    assert np.array_equal(got, expected[0].numpy())


def test_cuda_graph_modes_hand_back_copies_of_the_compiled_outputs():
    from inference.compile import _cloning_outputs, uses_cuda_graphs

    assert uses_cuda_graphs("reduce-overhead") and uses_cuda_graphs("max-autotune")
    assert not uses_cuda_graphs("default") and not uses_cuda_graphs("max-autotune-no-cudagraphs")
    pool = torch.arange(6.0)  # stands in for a CUDA graph's output buffer, reused each replay

    def replay(x):
        pool.copy_(x)
        return (pool, {"sample": pool})

    first = _cloning_outputs(replay)(torch.ones(6))
    _cloning_outputs(replay)(torch.zeros(6))
    assert torch.equal(first[0], torch.ones(6)) and torch.equal(first[1]["sample"], torch.ones(6))


def test_graphs_inductor_ran_without_cuda_graphs_are_reported(monkeypatch, caplog):
    """Inductor says it skipped CUDA graphs only on a log artifact that is off by default; the
    engine reads its counter after warm-up and warns, naming the count and where the reasons are."""
    from torch._dynamo.utils import counters

    from inference.compile import report_cuda_graph_skips

    monkeypatch.setitem(counters, "inductor", counters["inductor"].copy())
    counters["inductor"]["cudagraph_skips"] = 0
    with caplog.at_level(logging.WARNING, logger="inference.compile"):
        assert report_cuda_graph_skips() == 0
        assert not caplog.records, "a warning with nothing skipped"
        counters["inductor"]["cudagraph_skips"] = 2  # as log_cudagraph_skip_and_bump_counter does
        assert report_cuda_graph_skips() == 2
    assert "2 compiled graph(s) without CUDA graphs" in caplog.text
    assert "TORCH_LOGS=cudagraphs" in caplog.text


def test_the_executor_thread_binds_only_an_explicit_cuda_index(monkeypatch):
    from inference.executor import Executor

    bound: list[object] = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    for device, expected in (("cpu", []), ("cuda", []), ("cuda:1", [1])):
        bound.clear()
        ex = Executor(FakeRunner(), device=device)
        try:
            assert ex._thread.submit(lambda: "ran").result(30) == "ran", device
        finally:
            ex._thread.shutdown()
        assert bound == expected, device


def test_sdxl_decoder_batches_past_32_bit_indexing_are_decoded_in_even_chunks():
    from inference.compile import decode_chunk_sizes, decoder_peak_elements

    class SdxlVaeConfig:
        block_out_channels = (128, 256, 512, 512)

    # 1024²: 256 channels at full resolution is the largest activation, 2**28 per image.
    per_image = decoder_peak_elements(SdxlVaeConfig, 128, 128)
    assert per_image == 256 * 1024 * 1024
    assert decode_chunk_sizes(7, per_image) == [7]
    assert decode_chunk_sizes(8, per_image) == [4, 4]  # 8 × 2**28 = 2**31: one too many
    assert decode_chunk_sizes(9, per_image) == [5, 4]
    assert decode_chunk_sizes(8, decoder_peak_elements(SdxlVaeConfig, 96, 96)) == [8]  # 768²
    assert decode_chunk_sizes(8, None) == [8]  # a decoder of unknown shape is left alone
    # 1152²: the mid-block attention's (144²)² scores outgrow the activations.
    assert decoder_peak_elements(SdxlVaeConfig, 144, 144) == (144 * 144) ** 2
    assert decode_chunk_sizes(5, decoder_peak_elements(SdxlVaeConfig, 144, 144)) == [3, 2]


@pytest.mark.parametrize("return_dict", [False, True])
def test_a_decode_in_chunks_gives_the_images_of_one_decode(monkeypatch, return_dict):
    from diffusers import AutoencoderKL

    from inference import compile as compile_module

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=4, sample_size=32).eval()
    latents = torch.randn(5, 4, 8, 8)
    calls: list[int] = []

    def decode(z, return_dict=True):
        calls.append(z.shape[0])
        return vae.decode(z, return_dict=return_dict)

    # 16 channels at 16×16 per image: a limit of 2 images' worth makes chunks of 2, 2 and 1.
    monkeypatch.setattr(compile_module, "INT32_ELEMENTS", 2 * 16 * 16 * 16)
    chunked = compile_module._decoding_in_chunks(decode, vae)
    with torch.no_grad():
        whole = vae.decode(latents, return_dict=False)[0]
        out = chunked(latents, return_dict=return_dict)
    assert calls == [2, 2, 1]
    images = out.sample if return_dict else out[0]
    assert images.shape == whole.shape
    torch.testing.assert_close(images, whole, rtol=1e-5, atol=1e-5)
