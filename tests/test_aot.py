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

from inference.aot import AotUnet
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


def routed(folder: Path, *, max_batch: int = 8, **kw: Any) -> tuple[StandInUNet, AotUnet]:
    unet = StandInUNet().eval().requires_grad_(False)
    router = AotUnet(unet, folder, max_batch=max_batch, **kw)
    unet._compiled_call_impl = router
    return unet, router


def eager(unet: StandInUNet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return unet._call_impl(*args, **kwargs)[0]


class StandInCompiler:
    """A builder that writes a file and a loader whose package runs the eager UNet, counted."""

    def __init__(self, *, fail_build: bool = False) -> None:
        self.built: list[Path] = []
        self.loaded: list[Path] = []
        self.package_calls = 0
        self.fail_build = fail_build

    def build(self, unet: Any, args: tuple[Any, ...], kwargs: dict[str, Any], max_batch: int,
              path: Path) -> None:
        if self.fail_build:
            raise RuntimeError("inductor could not lower this graph")
        self.built.append(path)
        path.write_bytes(b"package")

    def load(self, path: Path, unet: Any) -> Any:
        if path.read_bytes() != b"package":
            raise RuntimeError("not a package")
        self.loaded.append(path)

        def run(*args: Any, **kwargs: Any) -> Any:
            self.package_calls += 1
            return unet._call_impl(*args, **kwargs)

        return run


def test_a_real_package_serves_every_batch_of_its_size_and_matches_the_eager_unet(tmp_path):
    """Exported at warm-up's first batch of two; later batches 1 to the maximum, and an integer
    timestep (DPM-Solver's), run the package with the eager UNet's results; another size, a
    larger batch, run eagerly, counted; a second process loads the package instead of building."""
    unet, router = routed(tmp_path, max_batch=8)
    with torch.inference_mode():
        unet(*inputs(2)[0], **inputs(2)[1])  # warm-up
        assert router.count() == 1
        assert (tmp_path / "unet-8x8.pt2").is_file()
        assert not list(tmp_path.glob("*.tmp*")), "a temporary package was left behind"
        with router.serving():
            for batch, timestep in ((1, None), (3, None), (8, None), (4, torch.tensor(3))):
                args, kwargs = inputs(batch, timestep=timestep)
                torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
            assert router.misses() == 0, "a call the package covers ran eagerly"
            for args, kwargs in (inputs(2, size=4), inputs(9)):
                torch.testing.assert_close(unet(*args, **kwargs)[0], eager(unet, args, kwargs))
            assert router.misses() == 2
        assert router.count() == 1, "a package was built outside warm-up"

        again, second = routed(tmp_path, max_batch=8)
        again.load_state_dict(unet.state_dict())
        args, kwargs = inputs(2)
        torch.testing.assert_close(again(*args, **kwargs)[0], eager(unet, args, kwargs))
        assert second.count() == 0, "the package in the cache was built again"
        # The package reads the live weights (one copy in memory): a change shows at once.
        again.conv.weight.mul_(2.0)
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
    assert len(compiler.built) == 1 and (tmp_path / "unet-8x8.pt2").read_bytes() == b"package"
    assert compiler.package_calls == 1 and router.count() == 1

    loads = len(compiler.loaded)
    _, later = routed(tmp_path, build=compiler.build, load=compiler.load)
    with torch.inference_mode(), later.serving():
        later.unet(*inputs(2)[0], **inputs(2)[1])
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
    assert (tmp_path / "unet-8x8.pt2").read_bytes() == b"package"
    assert compiler.package_calls == 1


def test_aot_is_installed_on_the_whole_unet_and_refuses_what_it_cannot_compile(tmp_path):
    import types

    unet = StandInUNet()
    pipe = types.SimpleNamespace(unet=unet)
    router = apply_compile(pipe, CompileOptions(scope="unet", shapes="batch", method="aot"),
                           aot_folder=tmp_path, max_batch=16)
    assert isinstance(router, AotUnet) and unet._compiled_call_impl is router
    assert router.max_batch == 16 and router.folder == tmp_path
    for options in (CompileOptions(scope="full", shapes="batch", method="aot"),
                    CompileOptions(scope="unet", shapes="static", method="aot"),
                    CompileOptions(scope="unet", shapes="batch", method="aot",
                                   mode="reduce-overhead")):
        with pytest.raises(ValueError, match="ahead-of-time"):
            apply_compile(types.SimpleNamespace(unet=StandInUNet()), options,
                          aot_folder=tmp_path)


def test_aot_packages_have_a_cache_key_of_their_own(tmp_path):
    jit = CompileOptions(scope="unet", shapes="batch")
    aot = CompileOptions(scope="unet", shapes="batch", method="aot")
    assert cache_key(str(tmp_path), "float32", jit, {}) != cache_key(str(tmp_path), "float32",
                                                                      aot, {})
