"""Batch scheduler behaviour, with a fake runner (no model) unless the test says otherwise."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from inference import GenerationRequest
from inference.batch import Batch, Slot
from inference.errors import DeadlineExceeded, OutOfMemory, QueueFull, ShuttingDown
from tests.fakes import FakeRunner, fake_engine


def req(prompt: str = "p", **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, width=kw.pop("width", 64), height=kw.pop("height", 64),
                             steps=kw.pop("steps", 2), **kw)


async def started(runner: FakeRunner, **config):
    engine = fake_engine(runner, **config)
    await engine.start()
    runner.batches.clear()
    return engine


async def wait_until(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition never became true"
        await asyncio.sleep(0.005)


async def test_idle_start_then_accumulate_group_by_key_oldest_first():
    runner = FakeRunner()
    engine = await started(runner, max_batch_images=4)
    runner.hold()
    first = asyncio.create_task(engine.generate(req("first", seed=1)))
    await asyncio.to_thread(runner.entered.wait, 5)  # started at once, alone
    small = [asyncio.create_task(engine.generate(req(f"s{i}", seed=10 * i))) for i in range(3)]
    await asyncio.sleep(0.01)
    big = [asyncio.create_task(engine.generate(req(f"b{i}", width=128, seed=100 + i)))
           for i in range(2)]
    await asyncio.sleep(0.01)
    # A 3-image request of the first key: it arrives after the 128-wide group but its key's
    # oldest request is older, so it rides with the first key's batch (4 images max).
    wide_n = asyncio.create_task(engine.generate(req("n3", n=3, seed=500)))
    await wait_until(lambda: engine.queued_images == 8)
    runner.release()
    await asyncio.gather(first, *small, *big, wide_n)
    prompts = [[p for p, _ in b] for b in runner.batches]
    assert prompts[0] == ["first"]
    assert prompts[1] == ["s0", "s1", "s2", "n3"]  # oldest group first, packed to 4 images
    assert prompts[2] == ["b0", "b1"]               # then the other key
    assert prompts[3] == ["n3", "n3"]               # rest of the n=3 request
    # Seeds: image i of seed s is s+i, across batch boundaries too.
    n3_seeds = [s for b in runner.batches for p, s in b if p == "n3"]
    assert n3_seeds == [500, 501, 502]
    result = wide_n.result()
    assert [img.seed for img in result.images] == [500, 501, 502]
    assert len(set(img.data for img in result.images)) == 3
    await engine.drain(1)


async def test_queue_bound_refuses_at_once():
    runner = FakeRunner()
    engine = await started(runner, max_queue_images=3)
    runner.hold()
    running = asyncio.create_task(engine.generate(req("run")))
    await asyncio.to_thread(runner.entered.wait, 5)
    queued = asyncio.create_task(engine.generate(req("q", n=3)))
    await wait_until(lambda: engine.queued_images == 3)
    with pytest.raises(QueueFull) as err:
        await engine.generate(req("over"))
    assert err.value.retry_after > 0
    runner.release()
    await asyncio.gather(running, queued)
    await engine.drain(1)


async def test_deadline_fails_and_leaves_the_queue():
    runner = FakeRunner()
    engine = await started(runner, request_timeout_s=0.2)
    runner.hold()
    running = asyncio.create_task(engine.generate(req("run")))
    await asyncio.to_thread(runner.entered.wait, 5)
    with pytest.raises(DeadlineExceeded, match="did not finish within"):
        await engine.generate(req("late", n=2))
    assert engine.queued_images == 0
    runner.release()
    with pytest.raises(DeadlineExceeded):
        await running  # it too ran out of time while held
    await asyncio.sleep(0.05)
    assert all(p != "late" for b in runner.batches for p, _ in b)
    await engine.drain(1)


async def test_cancelled_request_is_never_computed():
    runner = FakeRunner()
    engine = await started(runner)
    runner.hold()
    running = asyncio.create_task(engine.generate(req("run")))
    await asyncio.to_thread(runner.entered.wait, 5)
    gone = asyncio.create_task(engine.generate(req("gone")))
    await wait_until(lambda: engine.queued_images == 1)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert engine.queued_images == 0
    runner.release()
    await running
    assert [p for b in runner.batches for p, _ in b] == ["run"]
    await engine.drain(1)


def _oom_over(limit: int, poison: str | None = None):
    def fail(batch: Batch):
        if len(batch.slots) > limit:
            return torch.OutOfMemoryError("CUDA out of memory (fake)")
        if poison and any(s.ticket.prompt == poison for s in batch.slots):
            return torch.OutOfMemoryError("CUDA out of memory (fake)")
        return None
    return fail


async def test_oom_splits_in_halves_and_fails_only_what_it_must():
    runner = FakeRunner(fail=_oom_over(2, poison="huge"))
    engine = await started(runner, max_batch_images=8)
    runner.hold()
    blocker = asyncio.create_task(engine.generate(req("run")))
    await asyncio.to_thread(runner.entered.wait, 5)
    tasks = [asyncio.create_task(engine.generate(req(f"r{i}", seed=i))) for i in range(3)]
    tasks.append(asyncio.create_task(engine.generate(req("huge", seed=9))))
    await wait_until(lambda: engine.queued_images == 4)
    runner.release()
    results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
    assert isinstance(results[-1], OutOfMemory)
    assert all(not isinstance(r, BaseException) for r in results[:-1])
    sizes = [len(b) for b in runner.batches]
    assert max(sizes) <= 2 and sum(sizes) == 4  # blocker + r0..r2, huge never succeeded
    assert engine.metrics.registry.get_sample_value("imagegate_oom_splits_total") >= 1
    # The server keeps serving.
    assert (await engine.generate(req("after"))).images
    await engine.drain(1)


async def test_drain_fails_queued_and_running_work_at_its_timeout():
    runner = FakeRunner()
    engine = await started(runner)
    runner.hold()
    running = asyncio.create_task(engine.generate(req("run")))
    await asyncio.to_thread(runner.entered.wait, 5)
    queued = asyncio.create_task(engine.generate(req("queued", width=128)))
    await wait_until(lambda: engine.queued_images == 1)
    drain = asyncio.create_task(engine.drain(0.2))
    await asyncio.sleep(0.05)
    with pytest.raises(ShuttingDown):
        await engine.generate(req("new"))
    await asyncio.sleep(0.3)
    runner.release()
    await drain
    with pytest.raises(ShuttingDown, match="stopped this request"):
        await running
    with pytest.raises(ShuttingDown, match="not started"):
        await queued


async def test_drain_lets_queued_work_finish_within_the_timeout():
    runner = FakeRunner(delay=0.05)
    engine = await started(runner, max_batch_images=1)
    tasks = [asyncio.create_task(engine.generate(req(f"r{i}"))) for i in range(3)]
    await asyncio.sleep(0.01)
    await engine.drain(5)
    assert all(t.result().images for t in tasks)


async def test_metrics_after_requests():
    runner = FakeRunner()
    engine = await started(runner)
    await asyncio.gather(*(engine.generate(req(f"m{i}", n=2)) for i in range(3)))
    value = engine.metrics.registry.get_sample_value
    assert value("imagegate_images_generated_total") >= 6
    assert value("imagegate_batches_total") >= 1
    assert value("imagegate_encode_seconds_count", {"format": "png"}) >= 6
    assert value("imagegate_queue_wait_seconds_count") >= 3
    assert value("imagegate_generation_duration_seconds_count") >= 3
    assert value("imagegate_ready") == 1
    assert value("imagegate_queue_images") == 0
    await engine.drain(1)
    assert value("imagegate_ready") == 0


# -- with the real tiny SDXL ---------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M SDE Karras"])
async def test_same_seed_same_image_alone_or_in_a_mixed_batch(tiny_engine, sampler):
    engine = tiny_engine
    runner = engine._runner

    def ticket(prompt: str, seed: int, negative: str = ""):
        r = engine.prepare(req(prompt, seed=seed, steps=4, sampler=sampler, width=96, height=96,
                               negative_prompt=negative))
        return engine._ticket(r, asyncio.get_running_loop().create_future())

    target = ticket("a red bicycle", 42)
    alone, _ = await asyncio.to_thread(runner.run, Batch(target.key, [Slot(target, 0)]))
    others = [ticket("a blue whale", 7, "blurry"), ticket("x", 99), ticket("zzz", 3)]
    mixed_slots = [Slot(others[0], 0), Slot(others[1], 0), Slot(target, 0), Slot(others[2], 0)]
    mixed, _ = await asyncio.to_thread(runner.run, Batch(target.key, mixed_slots))
    a = alone[0].astype(int)
    b = mixed[2].astype(int)
    assert np.abs(a - b).max() <= 2
    # And the other images really are different ones.
    assert np.abs(a - mixed[0].astype(int)).max() > 2
