"""``--attention-backend``: a preference in torch's SDPA order, refused where it cannot run.

The kernels themselves are CUDA's; here the order torch keeps, the refusals and the engine's
use of the setting are checked (the speed is bench/gpu_compile_variants' job on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from inference.attention import AttentionUnavailable, prefer_attention_backend
from inference.quantize import QuantizeUnavailable, check_fp8


@pytest.fixture
def sdp_order() -> Iterator[list[int]]:
    """torch's SDPA priority order, restored after the test (it is process-wide)."""
    before = list(torch._C._get_sdp_priority_order())
    yield before
    torch._C._set_sdp_priority_order(before)
    torch.backends.cuda.enable_math_sdp(True)


def test_auto_leaves_torchs_order_alone(sdp_order):
    names = prefer_attention_backend("auto", "cpu")
    assert list(torch._C._get_sdp_priority_order()) == sdp_order
    assert names[0] == "FLASH_ATTENTION" and "CUDNN_ATTENTION" in names


def test_a_choice_moves_to_the_front_and_keeps_every_other_kernel_as_a_fallback(sdp_order):
    names = prefer_attention_backend("math", "cpu")
    order = list(torch._C._get_sdp_priority_order())
    assert names[0] == "MATH" and order[0] == int(torch.nn.attention.SDPBackend.MATH)
    assert sorted(order) == sorted(sdp_order)  # a preference, not a restriction
    q = torch.randn(1, 2, 8, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_cuda_kernels_are_refused_on_the_cpu_with_the_flag_named(sdp_order, backend):
    with pytest.raises(AttentionUnavailable, match=f"--attention-backend {backend} .*cpu"):
        prefer_attention_backend(backend, "cpu")
    assert list(torch._C._get_sdp_priority_order()) == sdp_order


def test_an_unknown_backend_is_refused_with_the_choices(sdp_order):
    with pytest.raises(AttentionUnavailable, match="choose one of auto, cudnn"):
        prefer_attention_backend("xformers", "cuda")


def test_the_setting_is_validated_at_start():
    from gateway.settings import Settings, SettingsError

    with pytest.raises(SettingsError) as err:
        Settings.from_sources({"attention_backend": "xformers"})
    assert any("attention" in line for line in err.value.problems)


def test_fp8_is_refused_on_the_cpu_with_a_reason():
    with pytest.raises(QuantizeUnavailable, match="--quantize fp8 needs an NVIDIA GPU"):
        check_fp8("cpu")


def test_the_engine_sets_the_preference_before_it_serves(sdp_order, tmp_path):
    from inference import EngineConfig
    from inference.engine import diffusers_runner_factory
    from tests import serving

    _runner, info = diffusers_runner_factory(EngineConfig(cache_dir=serving.CACHE_DIR,
                                                          attention_backend="math"))
    assert info.device == "cpu"
    assert torch._C._get_sdp_priority_order()[0] == int(torch.nn.attention.SDPBackend.MATH)
    with pytest.raises(AttentionUnavailable, match="cudnn is a CUDA kernel"):
        diffusers_runner_factory(EngineConfig(cache_dir=serving.CACHE_DIR,
                                              attention_backend="cudnn"))


def test_the_convolution_autotuner_is_refused_off_cuda_and_set_on_it(monkeypatch):
    from inference.convolution import ConvAutotuneUnavailable, enable_conv_autotune

    with pytest.raises(ConvAutotuneUnavailable, match=r"--cudnn-benchmark .* runs on cpu"):
        enable_conv_autotune("cpu")
    # On a CUDA device it is torch's process-wide switch (flipped back by monkeypatch).
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    enable_conv_autotune("cuda:0")
    assert torch.backends.cudnn.benchmark is True


def test_the_engine_refuses_the_autotuner_on_the_cpu_before_loading():
    from gateway.settings import Settings
    from inference import EngineConfig
    from inference.convolution import ConvAutotuneUnavailable
    from inference.engine import compile_key_extras, diffusers_runner_factory
    from tests import serving

    settings = Settings.from_sources(environ={"IMAGEGATE_CUDNN_BENCHMARK": "true"})
    assert settings.engine_config().cudnn_benchmark is True
    with pytest.raises(ConvAutotuneUnavailable, match="Leave it off"):
        diffusers_runner_factory(EngineConfig(cache_dir=serving.CACHE_DIR, cudnn_benchmark=True))
    plain = compile_key_extras(EngineConfig(), None)
    assert "cudnn_benchmark" not in plain  # existing compile caches stay valid
    assert compile_key_extras(EngineConfig(cudnn_benchmark=True), None)["cudnn_benchmark"]
