"""Finding and loading SDXL weights.

A diffusers folder, a single checkpoint file, a cached hub id, or the built-in ``tiny-sdxl``.
Offline by default: nothing is downloaded unless asked for.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import msgspec

from inference.tiny import TINY_MODEL_ID, TINY_REFINER_ID, ensure_tiny

logger = logging.getLogger(__name__)

SourceKind = Literal["tiny", "folder", "single_file", "hub_cache"]


class ModelNotFound(RuntimeError):
    """The model could not be found; the message lists every place that was looked at."""


class ModelSource(msgspec.Struct, frozen=True, kw_only=True):
    """Where a model's weights are, once resolved."""

    name: str
    kind: SourceKind
    path: Path


class DeviceChoice(msgspec.Struct, frozen=True, kw_only=True):
    """The torch device and dtype names the pipeline runs with."""

    device: str
    dtype: str


def choose_device(device: str = "auto", dtype: str = "auto") -> DeviceChoice:
    """CUDA with bf16 (or fp16 where bf16 is unsupported) when present, else CPU with fp32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            # Of the chosen GPU (bf16 needs Ampere, 8.0+), not of the current one.
            index = torch.device(device).index
            major, _ = torch.cuda.get_device_capability(index)
            dtype = "bfloat16" if major >= 8 else "float16"
        else:
            dtype = "float32"
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16"}
    return DeviceChoice(device=device, dtype=aliases.get(dtype, dtype))


def resolve(name: str, *, cache_dir: Path, allow_download: bool = False) -> ModelSource:
    """Turn the ``serve MODEL`` argument into a :class:`ModelSource`, or raise :class:`ModelNotFound`."""
    if name in (TINY_MODEL_ID, TINY_REFINER_ID):
        root = ensure_tiny(cache_dir)
        sub = "refiner" if name == TINY_REFINER_ID else "base"
        return ModelSource(name=name, kind="tiny", path=root / sub)
    path = Path(name).expanduser()
    looked: list[str] = []
    if path.is_dir():
        if (path / "model_index.json").exists():
            return ModelSource(name=path.name, kind="folder", path=path.resolve())
        looked.append(f"folder {path.resolve()} exists but has no model_index.json")
    elif path.suffix in (".safetensors", ".ckpt"):
        if path.is_file():
            return ModelSource(name=path.stem, kind="single_file", path=path.resolve())
        looked.append(f"checkpoint file {path.resolve()} does not exist")
    else:
        looked.append(f"no local folder or checkpoint at {path.resolve()}")
    tried_hub = False
    if name.count("/") == 1 and not path.exists() and not name.startswith((".", "~", "/")):
        tried_hub = True
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            folder = snapshot_download(name, local_files_only=not allow_download)
            return ModelSource(name=name, kind="hub_cache", path=Path(folder))
        except Exception as exc:  # noqa: BLE001 - hub raises several unrelated types here
            where = "the Hugging Face hub" if allow_download else f"the hub cache at {HF_HUB_CACHE}"
            looked.append(f"repo id {name!r} not found in {where} ({type(exc).__name__})")
    # A local path is not a hub id: no talk of the hub or of downloading for it.
    hint = "" if allow_download or not tried_hub else (
        " (offline mode: pass --allow-download to fetch hub ids)")
    raise ModelNotFound(f"model {name!r} not found: " + "; ".join(looked) + hint)


def load_base(
    source: ModelSource, choice: DeviceChoice, *, single_file_config: str | None = None
) -> Any:
    """Load ``StableDiffusionXLPipeline`` from ``source`` onto the chosen device."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    dtype = getattr(torch, choice.dtype)
    _quiet_diffusers()
    started = time.perf_counter()
    if source.kind == "single_file":
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
        if single_file_config:
            kwargs["config"] = single_file_config
        try:
            pipe = StableDiffusionXLPipeline.from_single_file(str(source.path), **kwargs)
        except Exception as exc:
            raise ModelNotFound(
                f"could not load the single-file checkpoint {source.path}: {exc}. Offline, "
                "diffusers needs the SDXL component configs: pass --single-file-config with a "
                "diffusers SDXL folder (or a cached hub id) to take them from."
            ) from exc
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(source.path), dtype=dtype, local_files_only=True, add_watermarker=False
        )
    pipe = pipe.to(choice.device)
    pipe.set_progress_bar_config(disable=True)
    freeze(pipe)
    logger.info(
        "loaded %s (%s) on %s/%s in %.1fs",
        source.name, source.kind, choice.device, choice.dtype, time.perf_counter() - started,
    )
    return pipe


def load_refiner(source: ModelSource, base: Any, choice: DeviceChoice) -> Any:
    """Load the SDXL refiner, sharing the base's second text encoder, its tokenizer and its VAE."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    dtype = getattr(torch, choice.dtype)
    shared = {"text_encoder_2": base.text_encoder_2, "tokenizer_2": base.tokenizer_2, "vae": base.vae}
    if source.kind == "single_file":
        pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(
            str(source.path), dtype=dtype, local_files_only=True, **shared
        )
    else:
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(source.path), dtype=dtype, local_files_only=True, add_watermarker=False, **shared
        )
    pipe = pipe.to(choice.device)
    pipe.set_progress_bar_config(disable=True)
    freeze(pipe)
    return pipe


def freeze(pipe: Any) -> None:
    """No parameter of a served pipeline needs gradients.

    Also what a compiled UNet needs: loading a LoRA freezes the base weights, and compiled
    graphs guard on ``requires_grad``, so weights frozen only then would fail the guards of the
    graphs warm-up traced once the adapters are unloaded again.
    """
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)


def _quiet_diffusers() -> None:
    """Progress bars and per-component chatter are noise in a server log."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_warning()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def hub_offline_by_default(allow_download: bool) -> None:
    """Keep huggingface_hub and transformers from reaching the network unless downloads are allowed."""
    if not allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
