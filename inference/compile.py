"""torch.compile for serving: compile before ready, never on a user request.

The design (issue 9), and why:

- **Regional compilation by default** (``scope="blocks"``): only the UNet's repeated
  ``BasicTransformerBlock`` s are compiled (diffusers' ``compile_repeated_blocks``). Those blocks
  hold most of SDXL's FLOPs, every instance of a block shape shares one compiled graph, and a cold
  compile costs a fraction of compiling the whole UNet. ``scope="full"`` compiles the whole UNet
  and the VAE decoder instead: slower to start, faster per image (+25% served on an H200,
  docs/benchmarks.md §4.7). ``scope="unet"`` compiles the whole UNet and leaves the decoder
  eager: the decoder runs once per batch (compiled, about 0.3 s of a 5.4 s batch of eight on an
  H200), but its graphs were three of the four that a ``full`` cold start compiled (about 40 s
  each there), so this start costs one UNet graph per warm-up size: on an H200, 194 s cold and
  58 s warm to ready at one size, 1.42 images/s at concurrency 8 (docs/benchmarks.md §4.9).
- **Shape-generic graphs** (``dynamic=True``): batch size, and the latent height and width, are
  symbolic, so one compile serves every batch size and resolution. No padding to buckets, no
  wasted slots, and no per-shape compile. Warm-up still runs every configured (size × batch) shape
  so that everything a request can hit was traced, and specialisations (batch 1) exist.
- **Or static shapes and buckets** (``shapes="static"``, opt-in): every graph is specialised to
  one batch size and resolution, which is what the fastest measured recipe used (whole UNet,
  static: +25% over eager at batch 8 on an H200, docs/benchmarks.md §4.2) and what CUDA graphs
  (``mode="reduce-overhead"``) need. Warm-up compiles every batch bucket at every warm-up size
  and the executor pads each batch up to a bucket (:mod:`inference.buckets`); the price is a
  compile per bucket and size at a cold start, and padded slots' compute.
- **Or a dynamic batch only** (``shapes="batch"``, with ``scope="full"`` or ``"unet"``, opt-in):
  the batch dimension of the UNet's (and a compiled decoder's) inputs is marked dynamic and
  everything else stays static, with dynamo's automatic dynamic shapes off. One graph per warm-up size serves every
  batch size from 2 up (batch 1 gets its own specialisation, as dynamo always gives size-1
  dimensions), so there is no padding and a cold start compiles once per size instead of once per
  bucket and size, while the latent height and width, which most kernels' tiling depends on,
  stay constants as in the static recipe. A batch too large for the decoder's 32-bit indexing
  is decoded in chunks rather than compiling a 64-bit graph (:data:`INT32_ELEMENTS`).
- **A stance, not a promise**: after warm-up the process switches to torch's
  ``eager_on_recompile`` stance. Any input that the warmed graphs do not cover (a dtype, a size
  that breaks a guard) runs eagerly instead of compiling, so a user request never waits minutes.
- **Counted**: :class:`CompileWatch` reads dynamo's graph counter around every batch;
  ``imagegate_compiles_total{reason}`` and a log line per compile with its shape make a compile
  on the request path visible (it should stay 0).
- **Cached across restarts**: inductor's on-disk caches live under ``cache_dir/compile/<key>``,
  and torch's portable cache artifacts are saved there after warm-up and loaded before it. The key
  hashes the model, dtype, torch/diffusers/CUDA versions, GPU name, compile options and (from the
  engine) the warm-up shape set, so a different model, torch or shape set never reuses stale
  artifacts.
- **Or ahead of time** (``method="aot"``, with ``scope="unet"`` or ``"full"`` and
  ``shapes="batch"``): no ``torch.compile`` at all; the UNet (and under ``full`` the VAE decoder
  for one image) is exported and compiled with AOTInductor into one package per size, by a
  background process or in warm-up, which later starts load without dynamo re-tracing the UNet
  (:mod:`inference.aot`, :mod:`inference.aot_background`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import msgspec

logger = logging.getLogger(__name__)

Scope = Literal["blocks", "unet", "full"]
Shapes = Literal["dynamic", "static", "batch"]
Method = Literal["jit", "aot"]
ARTIFACTS = "artifacts.bin"
# Static (or batch-dynamic) graphs: one per (bucket × warm-up size × distinct block shape);
# dynamo's default limit of 8 graphs per function would silently fall back to eager for the rest
# during warm-up.
STATIC_RECOMPILE_LIMIT = 256


class CompileOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How the pipeline is compiled."""

    scope: Scope = "blocks"
    mode: str = "default"
    shapes: Shapes = "dynamic"
    # Fuse attention Q/K/V projections into one matmul and use channels-last memory format:
    # both are part of the PyTorch team's SDXL recipe and cost nothing at start-up.
    fuse_qkv: bool = True
    channels_last: bool = True
    # jit: torch.compile (dynamo traces at every start). aot: torch.export + AOTInductor, one
    # package per warm-up size in the compile cache (inference.aot; scope unet or full, batch
    # shapes).
    method: Method = "jit"


def cache_key(model_path: str, dtype: str, options: CompileOptions, extra: dict[str, Any], *,
              device: str = "cpu") -> str:
    """A short hash of everything that makes compiled artifacts reusable or not."""
    import diffusers
    import torch

    gpu = (torch.cuda.get_device_name(torch.device(device))
           if device.startswith("cuda") and torch.cuda.is_available() else "cpu")
    stamp = _weights_stamp(Path(model_path))
    opts = msgspec.to_builtins(options)
    if options.method == "jit":
        del opts["method"]  # caches made before the setting existed stay valid
    doc = {
        "model": str(model_path), "weights": stamp, "dtype": dtype,
        "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu,
        "diffusers": diffusers.__version__, "options": opts,
        **extra,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _weights_stamp(path: Path) -> list[Any]:
    """Sizes and mtimes of the UNet/VAE weight files (cheap; no hashing of gigabytes)."""
    found: list[Any] = []
    for sub in ("unet", "vae"):
        folder = path / sub
        if folder.is_dir():
            for f in sorted(folder.glob("*.safetensors")):
                st = f.stat()
                found.append([f"{sub}/{f.name}", st.st_size, int(st.st_mtime)])
    if path.is_file():
        st = path.stat()
        found.append([path.name, st.st_size, int(st.st_mtime)])
    return found


class CompileCache:
    """Inductor's caches and torch's portable artifacts under one keyed folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def activate(self) -> bool:
        """Point inductor/triton caches here and load saved artifacts; True if any were loaded.

        Must run before the first compile. Environment variables are how inductor and triton
        find their cache folders; they are read when a compile starts.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.root / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(self.root / "triton")
        import torch

        artifacts = self.root / ARTIFACTS
        if not artifacts.is_file():
            return False
        try:
            torch.compiler.load_cache_artifacts(artifacts.read_bytes())
        except Exception as exc:  # noqa: BLE001 - a broken cache must never stop a start
            logger.warning("ignoring unreadable compile cache %s (%s)", artifacts, exc)
            return False
        logger.info("loaded compile cache artifacts from %s", artifacts)
        return True

    def save(self) -> None:
        """Write torch's portable cache artifacts (after warm-up)."""
        import torch

        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001 - caching is an optimisation, never a failure
            logger.warning("could not save compile cache artifacts: %s", exc)
            return
        if saved is None:
            return
        data, _info = saved
        # A name of its own: replicas sharing the cache claim may save at the same moment, and
        # the last complete file wins instead of two writes interleaving in one.
        tmp = self.root / f"{ARTIFACTS}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            tmp.write_bytes(data)
            tmp.replace(self.root / ARTIFACTS)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("saved %d bytes of compile cache artifacts to %s", len(data), self.root)


def prepare_for_compile(pipe: Any, options: CompileOptions) -> None:
    """Layout changes that only pay under a whole-UNet compile: fused QKV, channels-last.

    Measured on an H200 (docs/benchmarks.md): without a full compile they make eager and
    regional runs slower (1.35 → 1.16 images/s), with it they are part of the fastest recipe.
    Runs before quantization, which replaces the linear layers' weights.
    """
    import torch

    if options.scope == "blocks":
        return
    if options.fuse_qkv:
        # diffusers loads LoRA weights onto the unfused to_q/to_k/to_v, which fused attention
        # never calls: with adapters possible, the engine turns fuse_qkv off (see LoraAdapters).
        try:
            # Under ``unet`` the VAE (decoder, and encoder for img2img) stays as loaded; under
            # aot too (see below).
            pipe.fuse_qkv_projections(unet=True,
                                      vae=options.scope == "full" and options.method == "jit")
        except Exception as exc:  # noqa: BLE001 - an optimisation; keep serving without it
            logger.warning("could not fuse QKV projections: %s", exc)
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        # aot's decoder keeps its layout as loaded: its package was measured so (§4.14).
        if options.scope == "full" and options.method == "jit":
            # Only the compiled decoder was measured with it; an eager one keeps its layout.
            pipe.vae.to(memory_format=torch.channels_last)


def apply_compile(pipe: Any, options: CompileOptions, *, aot_folder: Path | None = None,
                  max_batch: int = 16, aot_background: bool = False,
                  aot_layout: Callable[[], None] | None = None) -> Any:
    """Compile ``pipe`` in place according to ``options`` (nothing runs yet; warm-up traces).

    With ``method="aot"`` returns the :class:`inference.aot.AotWatch` over the routers
    installed on the UNet and, under scope ``full``, on the VAE decoder (one image's decode)
    (packages under ``aot_folder``, UNet batches up to ``max_batch``, missing ones left to a
    background build with ``aot_background``; ``aot_layout``, when given, is the layout change
    :func:`prepare_for_compile` makes, deferred to the first package adopted), which is also the
    compile watch; otherwise None.
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # From the PyTorch SDXL recipe: 1×1 convolutions as matmuls fuse better.
    inductor_config.conv_1x1_as_mm = True
    if options.shapes == "batch" and options.scope == "blocks":
        raise ValueError("a dynamic batch only (shapes='batch') needs scope='full' or 'unet'")
    if options.method == "aot":
        return _install_aot(pipe, options, aot_folder, max_batch, aot_background, aot_layout)
    if options.shapes != "dynamic":
        limit_name = ("recompile_limit" if hasattr(dynamo_config, "recompile_limit")
                      else "cache_size_limit")
        setattr(dynamo_config, limit_name,
                max(getattr(dynamo_config, limit_name), STATIC_RECOMPILE_LIMIT))
    if options.shapes == "batch":
        # Otherwise a second warm-up resolution would turn height and width symbolic too.
        # Process-wide, like the recompile limit: the engine is the only thing compiling here.
        dynamo_config.automatic_dynamic_shapes = False
    dynamic = {"dynamic": True, "static": False, "batch": None}[options.shapes]
    kwargs: dict[str, Any] = {"mode": options.mode, "fullgraph": True, "dynamic": dynamic}
    if options.scope == "blocks":
        pipe.unet.compile_repeated_blocks(**kwargs)
    else:
        # In place (nn.Module.compile), not a torch.compile wrapper: the pipeline's UNet must
        # stay a diffusers model, or its LoRA loading finds no adapters on it.
        pipe.unet.compile(**kwargs)
        if options.shapes == "batch":
            # Marks must be made before dynamo sees the inputs: around the compiled call.
            pipe.unet._compiled_call_impl = _marking_batch(pipe.unet._compiled_call_impl)
        if uses_cuda_graphs(options.mode):
            # A CUDA graph's outputs live in its memory pool and the next replay overwrites
            # them; a sampler that keeps the UNet's raw output across steps (PNDM/PLMS without
            # CFG keeps its history in ``ets``) would then read garbage or fail. A latent-sized
            # copy per call is cheap.
            pipe.unet._compiled_call_impl = _cloning_outputs(pipe.unet._compiled_call_impl)
        if options.scope == "full":
            pipe.vae.decode = _compiled_decoder(pipe.vae, options, kwargs)
    logger.info("torch.compile armed (scope=%s, mode=%s, %s shapes)", options.scope,
                options.mode, options.shapes)
    return None


# The torch.compile modes an AOTInductor package can honour (it records no CUDA graphs).
AOT_MODES = {"default": {}, "max-autotune-no-cudagraphs": {"max_autotune": True}}


def _install_aot(pipe: Any, options: CompileOptions, folder: Path | None, max_batch: int,
                 background: bool, layout: Callable[[], None] | None) -> Any:
    from inference.aot import (
        AotRouter,
        AotWatch,
        decoder_router,
        remove_stale_temporaries,
        run_once,
    )

    if options.scope not in ("unet", "full") or options.shapes != "batch":
        raise ValueError("ahead-of-time compile (method='aot') needs scope 'unet' or 'full' "
                         "and shapes='batch'")
    if options.mode not in AOT_MODES:
        raise ValueError(f"ahead-of-time compile takes mode {' or '.join(AOT_MODES)}, "
                         f"not {options.mode!r} (it records no CUDA graphs)")
    if folder is None:
        raise ValueError("ahead-of-time compile needs a folder for its packages")
    remove_stale_temporaries(folder)
    shared = {"inductor_configs": AOT_MODES[options.mode], "background": background,
              "layout": run_once(layout) if layout is not None else None}
    routers = [AotRouter(pipe.unet, folder, max_batch=max_batch, **shared)]
    pipe.unet._compiled_call_impl = routers[0]
    if options.scope == "full" and _vae_recasts(pipe.vae):
        # The pipeline casts such a VAE to float32 for every decode and back after it, making
        # new weight tensors each time; a package reads its weights where they were.
        logger.warning("the VAE decoder is not compiled ahead of time: it is float16 with "
                       "force_upcast, so the pipeline re-casts its weights at every decode")
    elif options.scope == "full":
        routers.append(decoder_router(pipe.vae.decoder, folder, **shared))
        pipe.vae.decoder._compiled_call_impl = routers[1]
    logger.info("AOT compile armed (scope=%s, mode=%s, UNet batch up to %d, %s builds): "
                "packages in %s", options.scope, options.mode, max_batch,
                "background" if background else "foreground", folder)
    return AotWatch(routers)


def _vae_recasts(vae: Any) -> bool:
    """True when SDXL's pipeline casts ``vae`` to float32 around every decode (and back)."""
    import torch

    config = getattr(vae, "config", None)
    return getattr(vae, "dtype", None) == torch.float16 and bool(
        getattr(config, "force_upcast", False))


def _compiled_decoder(vae: Any, options: CompileOptions, kwargs: dict[str, Any]) -> Any:
    """``vae.decode`` compiled as :func:`apply_compile` compiles the UNet, plus what that needs."""
    import torch

    decode = torch.compile(vae.decode, **kwargs)
    if options.shapes == "batch":
        decode = _marking_batch(decode)
    if uses_cuda_graphs(options.mode):
        decode = _cloning_outputs(decode)
    if options.shapes != "static":
        decode = _decoding_in_chunks(decode, vae)
    return decode


# Inductor indexes a kernel's tensors with 32-bit integers where it can prove they fit, and for a
# symbolic batch it proves it with a guard: the VAE decoder's batch-dynamic graph holds only while
# its largest activation has at most this many elements. At 1024² that activation (256 channels
# at full resolution, SDXL's VAE) has 2**28 elements per image, so a batch of 8 (exactly 2**31)
# failed the guard and compiled a second, 64-bit graph: about 40 s more of cold start on an H200
# (docs/benchmarks.md §4.7).
INT32_ELEMENTS = 2**31 - 1


def decoder_peak_elements(vae_config: Any, latent_height: int, latent_width: int) -> int | None:
    """Elements per image of the largest activation in an AutoencoderKL decoder, or None.

    The decoder runs its blocks from the widest (``block_out_channels[-1]``) to the narrowest,
    doubling height and width after every block but the last; a block's output, and the next
    block's input, are its channels at the doubled size. Its mid-block attention (one head, at
    the latent size) has a (h·w)² score matrix wherever SDPA's math kernel runs it: at 1024² as
    large as the largest activation, and larger above.
    """
    channels = list(getattr(vae_config, "block_out_channels", None) or [])
    if not channels:
        return None
    ups = len(channels) - 1
    peak = max(c * (latent_height << min(i + 1, ups)) * (latent_width << min(i + 1, ups))
               for i, c in enumerate(reversed(channels)))
    if getattr(vae_config, "mid_block_add_attention", True):
        peak = max(peak, (latent_height * latent_width) ** 2)
    return peak


def decode_chunk_sizes(batch: int, per_image: int | None) -> list[int]:
    """How a batch of ``batch`` latents is split so each decode stays within 32-bit indexing.

    Even chunks (8 at 1024² is 4 + 4, not 7 + 1): sizes differ by one image at most, so a
    batch's chunks share the batch-dynamic graph (a chunk of one uses the batch-1 graph, which
    warm-up always compiles).
    """
    limit = max(1, INT32_ELEMENTS // per_image) if per_image else batch
    if batch <= limit:
        return [batch]
    parts = -(-batch // limit)
    size, extra = divmod(batch, parts)
    return [size + 1] * extra + [size] * (parts - extra)


def _decoding_in_chunks(decode: Any, vae: Any) -> Any:
    """``vae.decode`` that decodes a large batch in chunks (see :data:`INT32_ELEMENTS`).

    A convolutional decoder treats every image alone, so the chunks' images are the batch's.
    """
    config = getattr(vae, "config", None)

    def call(latents: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        sizes = decode_chunk_sizes(latents.shape[0],
                                   decoder_peak_elements(config, *latents.shape[-2:]))
        if len(sizes) == 1:
            return decode(latents, *args, **kwargs)
        outs = [decode(chunk, *args, **kwargs) for chunk in latents.split(sizes)]
        if isinstance(outs[0], tuple):  # return_dict=False
            return (torch.cat([o[0] for o in outs]), *outs[0][1:])
        return type(outs[0])(sample=torch.cat([o.sample for o in outs]))

    return call


def uses_cuda_graphs(mode: str) -> bool:
    """True for the torch.compile modes that record CUDA graphs."""
    return mode in ("reduce-overhead", "max-autotune")


def report_cuda_graph_skips() -> int:
    """Log, as a warning, how many compiled graphs inductor ran without CUDA graphs; return it.

    Inductor decides per graph at compile time (and again when a graph keeps re-recording) and
    says so only on its ``cudagraphs`` log artifact, off by default, so a server asked for CUDA
    graphs could run without them unseen: §4.12 of docs/benchmarks.md could not tell which.
    """
    from torch._dynamo.utils import counters

    skips = int(counters["inductor"]["cudagraph_skips"])
    if skips:
        logger.warning("inductor ran %d compiled graph(s) without CUDA graphs; "
                       "TORCH_LOGS=cudagraphs logs why", skips)
    return skips


def _cloning_outputs(fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils._pytree import tree_map_only

        return tree_map_only(torch.Tensor, torch.clone, fn(*args, **kwargs))

    return call


def mark_batch_dynamic(value: Any) -> None:
    """Mark dimension 0 of every tensor in ``value`` (nested in dicts, lists, tuples) dynamic.

    Size-1 batches are left alone: dynamo specialises them anyway, and marking one is an error.
    """
    import torch

    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] > 1:
            torch._dynamo.mark_dynamic(value, 0)
    elif isinstance(value, dict):
        for item in value.values():
            mark_batch_dynamic(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            mark_batch_dynamic(item)


def _marking_batch(fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        mark_batch_dynamic(args)
        mark_batch_dynamic(kwargs)
        return fn(*args, **kwargs)

    return call


class CompileWatch:
    """Counts compiles and eager fallbacks, so that both are seen and reported.

    Compiles: dynamo's graph counter (a compile outside warm-up is a bug). Eager fallbacks: calls
    of compiled code that no warmed graph's guards held for, which the serving stance runs
    eagerly.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._misses = 0

    def misses(self) -> int:
        """Calls of compiled functions, while serving, that no compiled graph matched."""
        return self._misses

    def _guards_checked(self, cache_hit: bool) -> bool:
        # Dynamo's guard-complete hook: called on the calling thread after the guards of a
        # compiled function's graphs were checked; the return value is the decision itself.
        if not cache_hit:
            self._misses += 1
        return cache_hit

    def count(self) -> int:
        """Graphs compiled by this process so far (0 when compile is off)."""
        if not self.enabled:
            return 0
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around a request batch: recompiles run eagerly instead (torch's stance), counted.

        Under the stance a guard miss is silent, so dynamo's guard-complete hook counts them
        (:meth:`misses`); it is installed for the batch only, on the executor thread that runs it.
        """
        if not self.enabled:
            yield
            return
        import torch

        # Private API (torch's guard collectives use it); without it nothing is counted.
        hook = getattr(torch._C._dynamo.eval_frame, "set_guard_complete_hook", None)
        previous = hook(self._guards_checked) if hook is not None else None
        try:
            with torch.compiler.set_stance("eager_on_recompile"):
                yield
        finally:
            if hook is not None:
                hook(previous)
