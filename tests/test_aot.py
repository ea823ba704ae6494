"""The UNet compiled ahead of time (``--compile-method aot``, inference.aot) on the CPU.

One test compiles for real, a stand-in with the UNet's call signature (a few layers: seconds,
not the minutes a pipeline's UNet takes); the others give the router a stand-in builder and
loader, and check what it runs where: the package for the calls it was exported for, the eager
UNet for everything else, and nothing built or loaded on a request.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.aot import AotRouter, AotWatch
from inference.compile import CompileOptions, apply_compile, cache_key


class StandInUNet(torch.nn.Module):
    """The UNet's call signature (batch-first tensors, some in a dict) on a few cheap layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(8, 4)
        self.register_buffer("shift", torch.tensor(0.5))

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs,
                return_dict=True, down_block_additional_residuals=None):
        context = self.proj(encoder_hidden_states).mean(1) + added_cond_kwargs["text_embeds"]
        out = self.conv(sample) * timestep + context[:, :, None, None] + self.shift
        if down_block_additional_residuals is not None:
            out = out + down_block_additional_residuals[0]
        return (out,)


def inputs(batch: int, size: int = 8, *, timestep: Any = None, dtype=torch.float32,
           tokens: int = 7) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A UNet call as the SDXL pipeline makes it (positional sample and timestep)."""
    g = torch.Generator().manual_seed(batch * 100 + size)
    sample = torch.randn(batch, 4, size, size, generator=g, dtype=dtype)
    t = torch.tensor(3.0) if timestep is None else timestep
    return (sample, t), {
        "encoder_hidden_states": torch.randn(batch, tokens, 8, generator=g, dtype=dtype),
        "added_cond_kwargs": {"text_embeds": torch.randn(batch, 4, generator=g, dtype=dtype)},
        "return_dict": False,
    }


def routed(folder: Path, *, max_batch: int = 8, **kw: Any) -> tuple[StandInUNet, AotRouter]:
    unet = StandInUNet().eval().requires_grad_(False)
    router = AotRouter(unet, folder, max_batch=max_batch, **kw)
    unet._compiled_call_impl = router
    return unet, router


def eager(unet: StandInUNet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return unet._call_impl(*args, **kwargs)[0]


class StandInCompiler:
    """A builder that writes a file and a loader whose package runs the eager UNet, counted."""

    def __init__(self, *, fail_build: bool = False, fail_run: Exception | None = None,
                 compiled_up_to: int | None = None) -> None:
        self.compiled_up_to = compiled_up_to
        self.built: list[Path] = []
        self.loaded: list[Path] = []
        self.package_calls = 0
        self.timesteps: list[torch.Tensor] = []
        self.fail_build = fail_build
        self.fail_run = fail_run

    def build(self, unet: Any, args: tuple[Any, ...], kwargs: dict[str, Any], max_batch: int,
              path: Path, signature: str) -> None:
        if self.fail_build:
            raise RuntimeError("inductor could not lower this graph")
        self.built.append(path)
        path.write_text("package\n" + signature)

    def load(self, path: Path, unet: Any) -> Any:
        kind, _, signature = path.read_text().partition("\n")
        if kind != "package":
            raise RuntimeError("not a package")
        self.loaded.append(path)

        def run(*args: Any, **kwargs: Any) -> Any:
            self.package_calls += 1
            if len(args) > 1:  # a UNet's call (the decoder's has no timestep)
                self.timesteps.append(args[1])
            if self.fail_run is not None:
                raise self.fail_run
            if self.compiled_up_to is not None and args[0].shape[0] > self.compiled_up_to:
                # AOTInductor's own input check (AOTI_RUNTIME_CHECK_INPUTS), word for word.
                raise RuntimeError(
                    f"input_handles[0]: dim value is too large at 0, expected to be <= "
                    f"{self.compiled_up_to}, but got: {args[0].shape[0]}\n")
            return unet._call_impl(*args, **kwargs)

        return run, signature


def test_a_real_package_serves_every_batch_of_its_size_and_matches_the_eager_unet(tmp_path,
                                                                                 monkeypatch):
    """Exported at warm-up's first batch of two; later batches 2 to the maximum, and an integer
    timestep (DPM-Solver's), run the package with the eager UNet's results; another size, a
    larger batch, batch 1 run eagerly, counted; a second process loads the package instead of
    building it, without probing the host's CPU (seconds, for a warning only), and the package
    reads the live weights, small ones included."""
    unet, router = routed(tmp_path, max_batch=8)
    with torch.inference_mode():
        unet(*inputs(2)[0], **inputs(2)[1])  # warm-up
        assert router.count() == 1
        assert (tmp_path / "unet-8x8.pt2").is_file()
        assert not list(tmp_path.glob("*.tmp*")), "a temporary package was left behind"
        with router.serving():
            for batch, timestep in ((2, None), (3, None), (8, None), (4, torch.tensor(3))):
                args, kwargs = inputs(batch, timestep=timestep)
                torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
            assert router.misses() == 0, "a call the package covers ran eagerly"
            # Another size; past the range; batch 1, which inductor does not compile a dynamic
            # dimension for (one image without guidance).
            for args, kwargs in (inputs(2, size=4), inputs(9), inputs(1)):
                torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
            assert router.misses() == 3
        assert router.count() == 1, "a package was built outside warm-up"

        def probed(device: str) -> dict[str, str]:
            raise AssertionError(f"loading a package probed the host ({device})")

        monkeypatch.setattr(torch._inductor.codecache, "get_device_information", probed)
        again, second = routed(tmp_path, max_batch=8)
        again.load_state_dict(unet.state_dict())
        args, kwargs = inputs(2)
        torch.testing.assert_close(again(*args, **kwargs)[0], eager(unet, args, kwargs))
        assert second.count() == 0, "the package in the cache was built again"
        with second.serving():
            again(*args, **kwargs)
        assert second.misses() == 0, "the package in the cache did not load"
        # The package reads the live weights (one copy in memory): a change shows at once,
        # in a 4-element bias too (inductor inlines tensors that small unless told not to).
        again.conv.weight.mul_(2.0)
        again.conv.bias.add_(1.0)
        again.shift.add_(1.0)
        torch.testing.assert_close(again(*args, **kwargs)[0], eager(again, args, kwargs))


def test_packages_are_built_and_loaded_only_in_warm_up(tmp_path):
    compiler = StandInCompiler()
    unet, router = routed(tmp_path, build=compiler.build, load=compiler.load)
    with torch.inference_mode(), router.serving():
        unet(*inputs(2)[0], **inputs(2)[1])
    assert compiler.built == [] and compiler.loaded == []
    assert router.misses() == 1

    unet(*inputs(1)[0], **inputs(1)[1])
    assert compiler.built == [], "exported at batch 1, the batch dimension would be constant"
    unet(*inputs(2)[0], **inputs(2)[1])
    assert len(compiler.built) == 1 and (tmp_path / "unet-8x8.pt2").read_text().startswith("package\n")
    assert compiler.package_calls == 1 and router.count() == 1

    loads = len(compiler.loaded)
    _, later = routed(tmp_path, build=compiler.build, load=compiler.load)
    with torch.inference_mode(), later.serving():
        later.module(*inputs(2)[0], **inputs(2)[1])
    assert len(compiler.loaded) == loads, "a package was loaded on a request"
    assert later.misses() == 1


@pytest.mark.parametrize("change", ["dtype", "tokens", "residuals", "layout", "lora", "size"])
def test_a_call_unlike_the_export_runs_on_the_eager_unet(tmp_path, change):
    """AOTInductor checks nothing itself: anything the package was not exported for must not
    reach it (it would compute garbage), and is counted as an eager call."""
    compiler = StandInCompiler()
    unet, router = routed(tmp_path, build=compiler.build, load=compiler.load)
    unet(*inputs(2)[0], **inputs(2)[1])
    args, kwargs = inputs(2)
    if change == "dtype":
        unet.double()
        args, kwargs = inputs(2, dtype=torch.float64)
    elif change == "tokens":
        args, kwargs = inputs(2, tokens=9)
    elif change == "residuals":  # what a ControlNet pipeline adds
        kwargs["down_block_additional_residuals"] = (torch.zeros(2, 4, 8, 8),)
    elif change == "layout":
        args = (args[0].transpose(2, 3), args[1])
    elif change == "lora":  # diffusers' mark of loaded LoRA layers, which the package lacks
        unet._hf_peft_config_loaded = True
    elif change == "size":
        args, kwargs = inputs(2, size=16)
    calls = compiler.package_calls
    with torch.inference_mode(), router.serving():
        out = unet(*args, **kwargs)[0]
    torch.testing.assert_close(out, eager(unet, args, kwargs))
    assert compiler.package_calls == calls, f"the package ran a call with another {change}"
    assert router.misses() == 1


def test_the_package_gets_an_aligned_timestep_when_the_loop_passes_a_view(tmp_path):
    """The pipeline's timestep is an element of the sampler's timesteps, a view 4·i bytes into
    them; AOTInductor copies and warns on each misaligned input (three lines in four of a
    request's steps on an H200), so the router hands it an aligned copy of the same value."""
    compiler = StandInCompiler()
    unet, router = routed(tmp_path, build=compiler.build, load=compiler.load)
    timesteps = torch.linspace(999.0, 0.0, 20)
    assert timesteps.data_ptr() % 16 == 0, "the test needs an aligned base tensor"
    with torch.inference_mode():
        for i in range(4):
            args, kwargs = inputs(2, timestep=timesteps[i])
            torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
    assert router.count() == 1
    assert compiler.package_calls == 4, "the calls did not run on the package"
    assert [t.data_ptr() % 16 for t in compiler.timesteps] == [0, 0, 0, 0]
    assert [float(t) for t in compiler.timesteps] == [float(t) for t in timesteps[:4]]


def test_a_failed_build_serves_its_size_eagerly_and_is_not_retried(tmp_path, caplog):
    compiler = StandInCompiler(fail_build=True)
    unet, router = routed(tmp_path, build=compiler.build, load=compiler.load)
    with caplog.at_level(logging.ERROR, logger="inference.aot"):
        for _ in range(2):
            args, kwargs = inputs(2)
            torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
    failures = [r for r in caplog.records if "AOT compile" in r.getMessage()]
    assert len(failures) == 1, "the failed build was tried again"
    assert "8x8" in failures[0].getMessage() and "eagerly" in failures[0].getMessage()
    assert router.count() == 0 and not list(tmp_path.iterdir())


def test_a_damaged_package_in_the_cache_is_built_again(tmp_path):
    (tmp_path / "unet-8x8.pt2").write_bytes(b"half a zip")
    compiler = StandInCompiler()
    unet, router = routed(tmp_path, build=compiler.build, load=compiler.load)
    unet(*inputs(2)[0], **inputs(2)[1])
    assert len(compiler.built) == 1 and router.count() == 1
    assert (tmp_path / "unet-8x8.pt2").read_text().startswith("package\n")
    assert compiler.package_calls == 1


def test_aot_is_installed_on_the_whole_unet_and_refuses_what_it_cannot_compile(tmp_path):
    import types

    unet = StandInUNet()
    pipe = types.SimpleNamespace(unet=unet)
    watch = apply_compile(pipe, CompileOptions(scope="unet", shapes="batch", method="aot"),
                          aot_folder=tmp_path, max_batch=16)
    assert isinstance(watch, AotWatch) and [r.name for r in watch.routers] == ["unet"]
    router = watch.routers[0]
    assert unet._compiled_call_impl is router
    assert router.max_batch == 16 and router.folder == tmp_path == watch.folder
    # full: the decoder too, one image at a time.
    decoder = StandInDecoder()
    pipe = types.SimpleNamespace(unet=StandInUNet(), vae=types.SimpleNamespace(decoder=decoder))
    watch = apply_compile(pipe, CompileOptions(scope="full", shapes="batch", method="aot"),
                          aot_folder=tmp_path, max_batch=16)
    assert [r.name for r in watch.routers] == ["unet", "decoder"]
    assert decoder._compiled_call_impl is watch.routers[1]
    assert (watch.routers[1].min_batch, watch.routers[1].max_batch) == (1, 1)
    for options in (CompileOptions(scope="blocks", shapes="dynamic", method="aot"),
                    CompileOptions(scope="unet", shapes="static", method="aot"),
                    CompileOptions(scope="unet", shapes="batch", method="aot",
                                   mode="reduce-overhead")):
        with pytest.raises(ValueError, match="ahead-of-time"):
            apply_compile(types.SimpleNamespace(unet=StandInUNet()), options,
                          aot_folder=tmp_path)


def test_a_float16_vae_that_the_pipeline_recasts_gets_no_decoder_package(tmp_path, caplog):
    """SDXL's pipeline casts such a VAE to float32 for each decode and back, making new
    tensors: a package bound to the old ones would read freed memory."""
    import types

    vae = types.SimpleNamespace(decoder=StandInDecoder().half(), dtype=torch.float16,
                                config=types.SimpleNamespace(force_upcast=True))
    pipe = types.SimpleNamespace(unet=StandInUNet(), vae=vae)
    with caplog.at_level(logging.WARNING, logger="inference.compile"):
        watch = apply_compile(pipe, CompileOptions(scope="full", shapes="batch", method="aot"),
                              aot_folder=tmp_path, max_batch=16)
    assert [r.name for r in watch.routers] == ["unet"]
    assert vae.decoder._compiled_call_impl is None
    assert any("force_upcast" in r.getMessage() for r in caplog.records)


def test_a_package_whose_module_got_new_weight_tensors_is_dropped(tmp_path, caplog):
    """A package reads its weights by address: after ``.to()`` made new tensors it must not
    run (it would read freed memory); the size runs eagerly, logged."""
    compiler = StandInCompiler()
    unet, router = routed(tmp_path, build=compiler.build, load=compiler.load)
    unet(*inputs(2)[0], **inputs(2)[1])  # warm-up
    # The old tensors kept alive, so that no new one can be allocated at a freed one's address.
    old = [t.data for t in unet.state_dict(keep_vars=True).values()]
    unet.to(torch.float64).to(torch.float32)  # the same values in new tensors
    assert all(o.data_ptr() != n.data_ptr()
               for o, n in zip(old, unet.state_dict(keep_vars=True).values(), strict=True))
    calls = compiler.package_calls
    with caplog.at_level(logging.ERROR, logger="inference.aot"), router.serving():
        args, kwargs = inputs(2)
        torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
    assert compiler.package_calls == calls, "the package ran on weights it no longer knows"
    assert any("weights were replaced" in r.getMessage() for r in caplog.records)


class StandInDecoder(torch.nn.Module):
    """The VAE decoder's call (one latent tensor in, an image-sized tensor out), cheaply."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, sample, latent_embeds=None):
        return torch.nn.functional.interpolate(torch.nn.functional.silu(self.conv(sample)),
                                               scale_factor=2.0)


def test_the_decoder_router_takes_one_image_and_a_batch_one_image_at_a_time(tmp_path):
    from inference.aot import decoder_router

    compiler = StandInCompiler()
    decoder = StandInDecoder().eval().requires_grad_(False)
    router = decoder_router(decoder, tmp_path, build=compiler.build, load=compiler.load)
    decoder._compiled_call_impl = router
    one = torch.randn(1, 4, 8, 8)
    decoder(one)  # warm-up: the first decode of one image builds the package
    assert [p.name.split(".")[0] for p in compiler.built] == ["decoder-8x8"]
    assert '"static": true' in (tmp_path / "decoder-8x8.pt2").read_text()
    calls = compiler.package_calls
    three = torch.randn(3, 4, 8, 8)
    with router.serving():
        torch.testing.assert_close(decoder(one), decoder._call_impl(one))
        # A batch: each image on the one-image package, in order, as the eager batch would be.
        torch.testing.assert_close(decoder(three), decoder._call_impl(three))
        decoder(torch.randn(1, 4, 4, 4))  # one image at an unwarmed size: a miss
        decoder(torch.randn(2, 4, 4, 4))  # a batch there: eager, whole, not a miss
    assert compiler.package_calls == calls + 1 + 3
    assert router.misses() == 1
    assert len(compiler.built) == 1


def _decoder_with_package(tmp_path, compiler):
    from inference.aot import decoder_router

    decoder = StandInDecoder().eval().requires_grad_(False)
    router = decoder_router(decoder, tmp_path, build=compiler.build, load=compiler.load)
    decoder._compiled_call_impl = router
    decoder(torch.randn(1, 4, 8, 8))  # warm-up builds the one-image package
    return decoder, router


def test_a_decoder_batch_the_package_would_not_take_runs_whole_and_uncounted(tmp_path):
    compiler = StandInCompiler()
    decoder, router = _decoder_with_package(tmp_path, compiler)
    calls = compiler.package_calls
    batch = torch.randn(4, 4, 8, 8).to(memory_format=torch.channels_last)
    with router.serving():
        torch.testing.assert_close(decoder(batch), decoder._call_impl(batch))
    assert compiler.package_calls == calls and router.misses() == 0


def test_a_decoder_package_failing_part_way_leaves_the_rest_of_the_batch_to_one_eager_call(
        tmp_path, caplog):
    compiler = StandInCompiler()
    decoder, router = _decoder_with_package(tmp_path, compiler)
    calls = compiler.package_calls
    compiler.fail_run = RuntimeError("an illegal memory access")
    batch = torch.randn(4, 4, 8, 8)
    with router.serving(), caplog.at_level(logging.ERROR, logger="inference.aot"):
        torch.testing.assert_close(decoder(batch), decoder._call_impl(batch))
    # The first image tried the package and ran eagerly; the other three went in one call.
    assert compiler.package_calls == calls + 1 and router.misses() == 2
    assert router.failed() == [(8, 8)]
    assert any("failed a call" in r.getMessage() for r in caplog.records)


def test_a_decoder_batch_waiting_for_its_background_package_runs_whole_and_uncounted(tmp_path):
    from inference.aot import decoder_router

    compiler = StandInCompiler()
    decoder = StandInDecoder().eval().requires_grad_(False)
    router = decoder_router(decoder, tmp_path, build=compiler.build, load=compiler.load,
                            background=True)
    decoder._compiled_call_impl = router
    decoder(torch.randn(1, 4, 8, 8))  # warm-up: no package yet, left to the build
    assert router.pending() == [(8, 8)]
    batch = torch.randn(4, 4, 8, 8)
    with router.serving():
        torch.testing.assert_close(decoder(batch), decoder._call_impl(batch))
    assert compiler.package_calls == 0 and router.misses() == 0
    # The child's foreground router over the same weights builds the package; once adopted,
    # a batch goes image by image.
    child = StandInDecoder().eval().requires_grad_(False)
    child.load_state_dict(decoder.state_dict())
    child._compiled_call_impl = decoder_router(child, tmp_path, build=compiler.build,
                                               load=compiler.load)
    child(torch.randn(1, 4, 8, 8))
    assert router.adopt() == [(8, 8)]
    calls = compiler.package_calls
    with router.serving():
        torch.testing.assert_close(decoder(batch), decoder._call_impl(batch))
    assert compiler.package_calls == calls + 4 and router.misses() == 0


def test_a_real_static_package_serves_one_image_and_matches_the_eager_module(tmp_path, caplog):
    from inference.aot import decoder_router

    decoder = StandInDecoder().eval().requires_grad_(False)
    router = decoder_router(decoder, tmp_path)
    decoder._compiled_call_impl = router
    with torch.inference_mode():
        one = torch.randn(1, 4, 8, 8)
        with caplog.at_level(logging.INFO, logger="inference.aot"):
            decoder(one)  # warm-up: exported and compiled for exactly this shape
        assert router.count() == 1
        assert any(r.getMessage().startswith("the decoder exported in") for r in caplog.records), \
            "the build's parts were not logged"
        with router.serving():
            other = torch.randn(1, 4, 8, 8)
            torch.testing.assert_close(decoder(other), decoder._call_impl(other))
            assert router.misses() == 0
            package = router._packages[(8, 8)]
            run, runs = package.run, []
            package.run = lambda *a, **k: runs.append(a[0].shape[0]) or run(*a, **k)
            two = torch.randn(2, 4, 8, 8)  # one image at a time on the one-image package
            torch.testing.assert_close(decoder(two), decoder._call_impl(two))
            assert runs == [1, 1], "the batch did not go through the package image by image"
        assert router.misses() == 0 and router.count() == 1


def test_aot_packages_have_a_cache_key_of_their_own(tmp_path):
    jit = CompileOptions(scope="unet", shapes="batch")
    aot = CompileOptions(scope="unet", shapes="batch", method="aot")
    assert cache_key(str(tmp_path), "float32", jit, {}) != cache_key(str(tmp_path), "float32",
                                                                      aot, {})


def test_a_package_exported_for_other_calls_is_built_again(tmp_path):
    """A package in the cache whose stored signature is not this call's (another release's
    call, another max batch) is rebuilt rather than trusted."""
    compiler = StandInCompiler()
    unet, _ = routed(tmp_path, max_batch=8, build=compiler.build, load=compiler.load)
    unet(*inputs(2)[0], **inputs(2)[1])
    _, wider = routed(tmp_path, max_batch=16, build=compiler.build, load=compiler.load)
    wider.module(*inputs(2)[0], **inputs(2)[1])
    assert len(compiler.built) == 2 and wider.count() == 1
    _, same = routed(tmp_path, max_batch=16, build=compiler.build, load=compiler.load)
    same.module(*inputs(2)[0], **inputs(2)[1])
    assert len(compiler.built) == 2 and same.count() == 0


def test_a_package_that_fails_a_call_is_dropped_and_its_size_served_eagerly(tmp_path, caplog):
    compiler = StandInCompiler(fail_run=RuntimeError("CUDA error: an illegal memory access"))
    unet, router = routed(tmp_path, build=compiler.build, load=compiler.load)
    with caplog.at_level(logging.ERROR, logger="inference.aot"):
        args, kwargs = inputs(2)
        torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
        with router.serving():
            torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
    assert compiler.package_calls == 1, "the failed package was called again"
    assert router.misses() == 1
    assert any("failed a call" in r.getMessage() and "8x8" in r.getMessage()
               for r in caplog.records)


def test_out_of_memory_in_a_package_goes_to_the_executor(tmp_path):
    """The executor frees memory and retries the batch in halves: the error must reach it."""
    compiler = StandInCompiler(fail_run=torch.OutOfMemoryError("CUDA out of memory"))
    unet, _ = routed(tmp_path, build=compiler.build, load=compiler.load)
    with pytest.raises(torch.OutOfMemoryError):
        unet(*inputs(2)[0], **inputs(2)[1])
    compiler.fail_run = None
    unet(*inputs(2)[0], **inputs(2)[1])
    assert compiler.package_calls == 2, "the package was dropped after running out of memory"


def test_stale_temporary_packages_are_swept_and_never_taken_for_packages(tmp_path):
    import os

    from inference.aot import packages_in, remove_stale_temporaries

    old, recent = tmp_path / "unet-8x8.1.aa.tmp.pt2", tmp_path / "unet-8x8.2.bb.tmp.pt2"
    # A background build's settings file, from a server killed before it could delete it.
    old_settings = tmp_path / "build-1-0a1b2c3d.json"
    for path in (old, recent, old_settings):
        path.write_bytes(b"half")
    os.utime(old, (0, 0))
    os.utime(old_settings, (0, 0))
    assert packages_in(tmp_path) == []
    remove_stale_temporaries(tmp_path)
    assert not old.exists() and recent.exists(), "a build in progress may be another replica's"
    assert not old_settings.exists(), "a dead build's settings file was kept"


def test_a_package_compiled_for_fewer_batches_serves_those_and_the_rest_eagerly(tmp_path, caplog):
    """Inductor may compile a dynamic batch for less than the range asked (on a CPU, its
    convolutions took up to 15 of 16): warm-up's largest batch finds the limit before ready."""
    compiler = StandInCompiler(compiled_up_to=5)
    unet, router = routed(tmp_path, max_batch=8, build=compiler.build, load=compiler.load)
    with caplog.at_level(logging.WARNING, logger="inference.aot"):
        for batch in (2, 8):  # warm-up
            args, kwargs = inputs(batch)
            torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
    assert any("up to 5" in r.getMessage() for r in caplog.records)
    calls = compiler.package_calls
    with router.serving():
        for batch in (4, 5, 6, 8):
            args, kwargs = inputs(batch)
            torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
    assert compiler.package_calls == calls + 2, "batches 4 and 5 should run on the package only"
    assert router.misses() == 2


def test_the_engine_installs_the_router_as_its_compile_watch_under_the_keyed_cache(
        tmp_path, monkeypatch):
    """``--compile --compile-method aot``: the tiny pipeline's UNet routes through AotRouter, which
    the runner hands the engine as its compile watch, with packages under the keyed folder.
    Nothing is compiled here (warm-up would)."""
    import shutil

    from inference.engine import EngineConfig, diffusers_runner_factory
    from tests import serving

    # The compile cache points inductor and Triton at its folder through the environment.
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    shutil.copytree(serving.CACHE_DIR, tmp_path, dirs_exist_ok=True)
    config = EngineConfig(cache_dir=tmp_path, compile=True, compile_scope="unet",
                          compile_shapes="batch", compile_method="aot", max_batch_images=4)
    runner, info = diffusers_runner_factory(config)
    watch = runner.compile_watch
    assert isinstance(watch, AotWatch) and info.compiled
    assert len(watch.routers) == 1, "scope unet routes the UNet only"
    router = watch.routers[0]
    assert isinstance(router, AotRouter)
    assert runner.base.unet._compiled_call_impl is router
    assert router.max_batch == 8, "guidance doubles the largest batch"
    assert router.folder == Path(info.compile_cache) / "aot"
    assert router.folder.parent.parent == tmp_path / "compile"


def test_a_torch_whose_package_loader_takes_other_arguments_loads_through_torch(monkeypatch,
                                                                                tmp_path):
    """The direct loader is torch's private API: when its call does not fit, the public
    ``aoti_load_package`` opens the package instead of the size being rebuilt or dropped."""
    from inference import aot

    def other_signature(*args: object) -> None:
        raise TypeError("incompatible constructor arguments")

    opened: list[str] = []
    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", other_signature)
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path: opened.append(path) or "package")
    assert aot._open_package(tmp_path / "unet-8x8.pt2") == "package"
    assert opened == [str(tmp_path / "unet-8x8.pt2")]
