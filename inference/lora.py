"""LoRA adapters: the operator's folder of ``<name>.safetensors`` files, and applying them per batch.

Requests name adapters by file stem. Names are looked up in the folder listing only, so a request
can never reach a path outside it. Files load once (diffusers ``load_lora_weights``, peft
backend; diffusers and kohya formats) and stay cached by name; each batch then activates exactly
its adapters with their weights (``set_adapters``), or none.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from inference.errors import FeatureUnavailable
from inference.request import Lora

logger = logging.getLogger(__name__)

# Adapters kept loaded at once; past it the least recently used is deleted.
MAX_LOADED = 16
# How often the folder listing may be re-read to find a name it did not have.
RESCAN_INTERVAL_S = 2.0


class LoraLibrary:
    """The LoRA files in one folder, by name (file stem)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._names: dict[str, Path] = {}
        self._scanned_at = -RESCAN_INTERVAL_S

    def _scan(self) -> None:
        self._scanned_at = time.monotonic()
        if self.folder is None or not self.folder.is_dir():
            self._names = {}
            return
        self._names = {p.stem: p for p in sorted(self.folder.glob("*.safetensors")) if p.is_file()}

    def names(self) -> list[str]:
        """Adapter names available now, sorted."""
        if time.monotonic() - self._scanned_at >= RESCAN_INTERVAL_S:
            self._scan()
        return sorted(self._names)

    def path(self, name: str) -> Path | None:
        """The file of adapter ``name``, or None when the folder has no such adapter."""
        if name not in self._names and time.monotonic() - self._scanned_at >= RESCAN_INTERVAL_S:
            self._scan()
        return self._names.get(name)

    def check(self, loras: tuple[Lora, ...]) -> None:
        """Raise :class:`FeatureUnavailable` (field ``loras``) unless every adapter is here."""
        if not loras:
            return
        if self.folder is None:
            raise FeatureUnavailable(
                "LoRA adapters are not configured on this server (start it with --lora-dir)",
                field="loras")
        seen: set[str] = set()
        for lora in loras:
            if lora.name in seen:
                raise FeatureUnavailable(f"LoRA {lora.name!r} is listed twice", field="loras")
            seen.add(lora.name)
            if self.path(lora.name) is None:
                available = ", ".join(self.names()) or "none"
                raise FeatureUnavailable(
                    f"unknown LoRA {lora.name!r}; available: {available}", field="loras")


class LoraAdapters:
    """Loads adapters into a pipeline's UNet/text encoders and switches them per batch.

    Executor thread only. Pipelines built from the same components share the adapters.
    """

    def __init__(self, pipe: Any, library: LoraLibrary, *, max_loaded: int = MAX_LOADED,
                 unload_when_off: bool = False) -> None:
        self.pipe = pipe
        self.library = library
        self.max_loaded = max_loaded
        # Compiled pipelines: a batch without LoRAs unloads every adapter instead of switching
        # them off. LoRA layers left in the UNet (even disabled) fail the guards of the graphs
        # warm-up traced, so every later batch would run eagerly; unloaded, the UNet is the
        # module those graphs were traced for again. The price: a LoRA batch after a plain one
        # loads its files again.
        self.unload_when_off = unload_when_off
        # name -> adapter id, most recently used last
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self._counter = 0
        self._enabled = False

    def apply(self, loras: tuple[Lora, ...]) -> None:
        """Make exactly ``loras`` active with their weights (none: LoRA layers off)."""
        if not loras:
            if self.unload_when_off and self._loaded:
                self.pipe.unload_lora_weights()
                self._loaded.clear()
                self._enabled = False
            elif self._enabled:
                self.pipe.disable_lora()
                self._enabled = False
            return
        ids = [self._load(lora.name) for lora in loras]
        if not self._enabled:
            self.pipe.enable_lora()
            self._enabled = True
        self.pipe.set_adapters(ids, adapter_weights=[lora.weight for lora in loras])

    def _load(self, name: str) -> str:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        path = self.library.path(name)
        if path is None:
            raise FeatureUnavailable(f"LoRA {name!r} is no longer in the LoRA folder", field="loras")
        while len(self._loaded) >= self.max_loaded:
            _, old = self._loaded.popitem(last=False)
            self.pipe.delete_adapters(old)
        self._counter += 1
        # peft keys modules by adapter name, so file names with dots or dashes cannot be used.
        adapter = f"lora{self._counter}_{re.sub(r'[^A-Za-z0-9_]', '_', name)[:40]}"
        started = time.perf_counter()
        if getattr(self.pipe, "fusing_unet", False):
            # Fused Q/K/V projections (a compile option) would silently skip the adapter's
            # attention weights; the engine does not fuse when LoRAs are possible, so this is a
            # safety net.
            logger.warning("unfusing QKV projections before loading LoRA %s", name)
            self.pipe.unfuse_qkv_projections(unet=True, vae=False)
        try:
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
        except Exception as exc:
            logger.exception("loading LoRA %s failed", path)
            raise FeatureUnavailable(
                f"LoRA {name!r} could not be loaded: {type(exc).__name__}", field="loras") from exc
        logger.info("LoRA %s loaded from %s in %.2fs", name, path, time.perf_counter() - started)
        self._loaded[name] = adapter
        return adapter
