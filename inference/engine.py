"""The engine: the one object the gateway talks to.

It loads the model (off the event loop, so health checks answer while it loads), warms up,
validates canonical requests, and runs them through the scheduler and executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from inference import __version__
from inference.aot_background import Builder, build_in_child
from inference.batch import Batch, BatchKey, Slot, Ticket
from inference.buckets import BatchBuckets
from inference.compile import (
    CompileCache,
    CompileWatch,
    report_cuda_graph_skips,
    uses_cuda_graphs,
)
from inference.controlnet import PREPROCESSORS
from inference.cost import image_megapixels, image_units
from inference.encoder import EncoderPool
from inference.errors import (
    DeadlineExceeded,
    FeatureUnavailable,
    InvalidRequest,
    NotReady,
    ShuttingDown,
)
from inference.executor import Executor
from inference.images import check_image_header
from inference.lora import LoraLibrary
from inference.progress import ObservedRunner, Progress, ProgressHub, ProgressSnapshot
from inference.request import MAX_SEED, GenerationRequest, GenerationResult
from inference.runner import BatchRunner
from inference.samplers import SamplerRegistry
from inference.scheduler import Scheduler
from inference.styles import StyleBook
from inference.tiny import NOISE_WARNING, TINY_MODEL_ID, TINY_REFINER_ID
from observability.metrics import Metrics

logger = logging.getLogger(__name__)

# Bounds on the per-request feature fields (each costs compute or memory).
MAX_PARTIAL_IMAGES = 10
MAX_CONTROL_UNITS = 3
CONTROL_WEIGHT_RANGE = (0.0, 2.0)
MAX_LORAS = 5
LORA_WEIGHT_RANGE = (-5.0, 5.0)
# How often a background AOT build's folder is checked for finished packages.
AOT_POLL_S = 5.0



class EngineConfig(msgspec.Struct, kw_only=True):
    """Everything the engine needs to know, passed explicitly (no globals)."""

    model: str = TINY_MODEL_ID
    refiner: str | None = None
    cache_dir: Path = Path("~/.cache/imagegate").expanduser()
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None
    compile_mode: str = "default"
    compile_scope: str = "blocks"
    compile_shapes: str = "dynamic"
    # jit (torch.compile) or aot (torch.export + AOTInductor packages; inference.aot).
    compile_method: str = "jit"
    # aot only: build missing packages in a child process while serving eagerly ("background",
    # inference.aot_background) or in warm-up, before ready ("foreground").
    aot_build: str = "background"
    # How long a background build may run before the child is stopped (its memory freed).
    aot_build_timeout_s: float = 3600.0
    # The background build's headless engine (inference.aot_background): warm-up runs only each
    # size's first shape, once: the call a package is exported from. The server adopting the
    # package runs it at the largest batch itself.
    warmup_build_only: bool = False
    # Batch sizes static-shape graphs are compiled for (empty: 1, 2, 4, … up to the maximum).
    batch_buckets: tuple[int, ...] = ()
    quantize: str = "none"
    # Preferred SDPA kernel (inference.attention); "auto" keeps torch's order.
    attention_backend: str = "auto"
    # cuDNN's convolution autotuner (inference.convolution); CUDA only.
    cudnn_benchmark: bool = False
    allow_download: bool = False
    single_file_config: str | None = None
    max_batch_images: int = 8
    max_wait_ms: float = 0.0
    batch_fill_ms: float | None = None
    max_queue_images: int = 64
    request_timeout_s: float = 300.0
    png_compress_level: int = 1
    encode_workers: int = 0
    min_size: int = 64
    max_size: int = 2048
    max_steps: int = 150
    max_prompt_chars: int = 8000
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    warmup_batch_sizes: tuple[int, ...] = (1,)
    # ControlNets as (kind, diffusers folder) pairs; tiny-sdxl adds its own canny.
    controlnets: tuple[tuple[str, str], ...] = ()
    # Folder of <name>.safetensors LoRA files; tiny-sdxl falls back to its own (tiny-lora).
    lora_dir: Path | None = None


class EngineState(enum.Enum):
    """Lifecycle: loading → warming → ready → draining → stopped (or failed)."""

    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class ModelInfo(msgspec.Struct, kw_only=True):
    """What the server says about its model."""

    id: str
    source: str
    description: str
    makes_noise: bool
    default_width: int
    default_height: int
    has_refiner: bool
    created: int
    compiled: bool = False
    device: str = "cpu"
    quantize: str = "none"
    # Folder of this model's torch.compile caches (None when compile is off).
    compile_cache: str | None = None
    # ControlNet kinds served (GenerationRequest.control[].kind).
    control_kinds: tuple[str, ...] = ()
    # Where requests' LoRA names are looked up; None: no LoRA support.
    lora_dir: str | None = None


RunnerFactory = Callable[["EngineConfig"], tuple[BatchRunner, "ModelInfo"]]


def diffusers_runner_factory(config: EngineConfig) -> tuple[BatchRunner, ModelInfo]:
    """Load the configured model (and refiner) into a :class:`DiffusersRunner`."""
    from inference import loader
    from inference.attention import prefer_attention_backend
    from inference.controlnet import load_controlnets
    from inference.convolution import enable_conv_autotune
    from inference.quantize import check_fp8
    from inference.runner import DiffusersRunner

    loader.hub_offline_by_default(config.allow_download)
    choice = loader.choose_device(config.device, config.dtype)
    # First: a refusal costs no model load, and traced graphs bake in the kernel chosen.
    prefer_attention_backend(config.attention_backend, choice.device)
    if config.cudnn_benchmark:
        enable_conv_autotune(choice.device)
    if config.quantize != "none":
        check_fp8(choice.device)
    source = loader.resolve(config.model, cache_dir=config.cache_dir,
                            allow_download=config.allow_download)
    base = loader.load_base(source, choice, single_file_config=config.single_file_config)
    refiner = None
    refiner_name = config.refiner
    if refiner_name is None and source.kind == "tiny":
        refiner_name = TINY_REFINER_ID
    if refiner_name:
        ref_source = loader.resolve(refiner_name, cache_dir=config.cache_dir,
                                    allow_download=config.allow_download)
        refiner = loader.load_refiner(ref_source, base, choice)
    from inference.compile import (
        CompileCache,
        CompileOptions,
        apply_compile,
        cache_key,
        prepare_for_compile,
    )
    from inference.quantize import quantize_unet

    compile_on = config.compile if config.compile is not None else choice.device.startswith("cuda")
    tiny_root = source.path.parent if source.kind == "tiny" else None
    lora_dir = config.lora_dir or (tiny_root / "loras" if tiny_root is not None else None)
    options = CompileOptions(scope=config.compile_scope, mode=config.compile_mode,  # type: ignore[arg-type]
                             shapes=config.compile_shapes,  # type: ignore[arg-type]
                             method=config.compile_method,  # type: ignore[arg-type]
                             # LoRA adapters would miss fused attention projections.
                             fuse_qkv=lora_dir is None)
    cache_dir: Path | None = None
    aot = None
    defer_layout = False
    if compile_on:
        key = cache_key(str(source.path), choice.dtype, options,
                        compile_key_extras(config, refiner_name), device=choice.device)
        cache_dir = config.cache_dir / "compile" / key
        warm = CompileCache(cache_dir).activate()
        if options.method == "aot":
            from inference.aot import packages_in

            warm = bool(packages_in(cache_dir / "aot"))
        logger.info("compile cache %s (%s)", cache_dir, "warm" if warm else "cold")
        # The layout change (fused QKV, channels-last) made bare eager batches of 8 14% slower
        # on an H200 (docs/benchmarks.md §4.2). While a background build makes the packages,
        # which are built for that layout, the server runs eagerly: it changes the layout when
        # it adopts the first package, and never if the build fails.
        defer_layout = (options.method == "aot" and config.aot_build == "background"
                        and not warm and config.quantize == "none")  # before quantizing
        if not defer_layout:
            prepare_for_compile(base, options)
    quantize_unet(base, config.quantize, choice.device)  # type: ignore[arg-type]
    if compile_on:
        assert cache_dir is not None
        # Classifier-free guidance runs both halves of every image in one UNet batch.
        aot = apply_compile(base, options, aot_folder=cache_dir / "aot",
                            max_batch=2 * config.max_batch_images,
                            aot_background=config.aot_build == "background",
                            aot_layout=(lambda: _switch_layout(base, options))
                            if defer_layout else None)
    samplers = SamplerRegistry.standard()
    controlnets = load_controlnets(config.controlnets, device=choice.device, dtype=choice.dtype,
                                   tiny_root=tiny_root)
    runner = DiffusersRunner(base, samplers, refiner=refiner, device=choice.device,
                             controlnets=controlnets, loras=LoraLibrary(lora_dir),
                             compiled=compile_on, compile_watch=aot)
    sample = base.unet.config.sample_size * base.vae_scale_factor
    makes_noise = source.kind == "tiny"
    info = ModelInfo(
        id=source.name,
        source=f"{source.kind}:{source.path}",
        description=NOISE_WARNING if makes_noise else f"SDXL from {source.path}",
        makes_noise=makes_noise,
        default_width=sample,
        default_height=sample,
        has_refiner=refiner is not None,
        created=int(time.time()),
        compiled=compile_on,
        device=choice.device,
        quantize=config.quantize,
        compile_cache=str(cache_dir) if cache_dir else None,
        control_kinds=tuple(sorted(controlnets)),
        lora_dir=str(lora_dir) if lora_dir is not None else None,
    )
    return runner, info


def _switch_layout(pipe: Any, options: Any) -> None:
    """The layout change deferred to the first AOT package adopted (see the runner factory)."""
    from inference.compile import prepare_for_compile

    prepare_for_compile(pipe, options)
    logger.info("UNet switched to the AOT packages' layout (fused QKV, channels-last)")


def compile_key_extras(config: EngineConfig, refiner: str | None) -> dict[str, Any]:
    """The engine settings, beyond the compile options, that compiled artifacts depend on."""
    return {"quantize": config.quantize, "torchao": _torchao_version(config.quantize),
            "refiner": str(refiner),
            "attention": config.attention_backend, "shapes": warmup_shape_set(config),
            # Only when on: caches made before the setting existed stay valid.
            **({"cudnn_benchmark": True} if config.cudnn_benchmark else {})}


def _torchao_version(quantize: str) -> str | None:
    """The torchao version when it quantizes (its kernels are part of the compiled graphs)."""
    if quantize == "none":
        return None
    try:
        from importlib.metadata import version

        return version("torchao")
    except Exception:  # noqa: BLE001 - absent: the load fails with its own clear message
        return None


def warmup_shape_set(config: EngineConfig) -> dict[str, Any]:
    """What decides the shapes warm-up compiles (part of the compile cache key)."""
    return {"sizes": [list(s) for s in config.warmup_sizes],
            "batches": list(config.warmup_batch_sizes), "max_batch": config.max_batch_images,
            "buckets": list(config.batch_buckets)}


class Engine:
    """Validates, queues and runs generations; owns the scheduler, executor and encoder pool."""

    def __init__(
        self,
        config: EngineConfig,
        metrics: Metrics,
        *,
        runner_factory: RunnerFactory = diffusers_runner_factory,
        samplers: SamplerRegistry | None = None,
        styles: StyleBook | None = None,
        aot_builder: Builder = build_in_child,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.samplers = samplers or SamplerRegistry.standard()
        self.styles = styles or StyleBook.builtin()
        self._runner_factory = runner_factory
        self._aot_builder = aot_builder
        # The background AOT build and adoption (None when there is none).
        self._background: asyncio.Task[None] | None = None
        self.state = EngineState.LOADING
        self.info: ModelInfo | None = None
        self.error: str | None = None
        self._scheduler: Scheduler | None = None
        # Requests generated with a tag (Engine.interrupt), by tag.
        self._tagged: dict[str, set[Ticket]] = {}
        self._executor: Executor | None = None
        self._encoder: EncoderPool | None = None
        self._runner: BatchRunner | None = None
        self._hub: ProgressHub | None = None
        self._loras: LoraLibrary | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model off the event loop, warm up, and start accepting work.

        Loading runs in a worker thread so health checks answer meanwhile; from then on only the
        executor thread touches the pipeline.
        """
        started = time.perf_counter()
        self._encoder = EncoderPool(self.config.encode_workers,
                                    png_level=self.config.png_compress_level)
        try:
            loop = asyncio.get_running_loop()
            runner, info = await loop.run_in_executor(None, self._runner_factory, self.config)
        except Exception as exc:
            self.state = EngineState.FAILED
            self.error = str(exc)
            raise
        self._runner, self.info = runner, info
        if info.makes_noise:
            logger.warning(NOISE_WARNING)
        self.metrics.model_loaded.set(1)
        self.metrics.load_seconds.set(time.perf_counter() - started)
        self.metrics.info.labels(__version__, info.id, info.device,
                                 "true" if info.compiled else "false").set(1)
        logger.info("model %s loaded in %.1fs; warming up", info.id, time.perf_counter() - started)
        # A runner may bring its own compile watch (tests do); otherwise dynamo's counters.
        watch = getattr(runner, "compile_watch", None) or CompileWatch(info.compiled)
        self._hub = ProgressHub(asyncio.get_running_loop(),
                                png_level=self.config.png_compress_level)
        buckets = self.batch_buckets()
        if buckets is not None:
            logger.info("static-shape graphs: batches padded to buckets %s", buckets.sizes)
        self._executor = Executor(ObservedRunner(runner, self._hub), watch=watch, buckets=buckets,
                                  device=info.device)
        self._scheduler = Scheduler(
            self._executor, self._encoder, self.metrics, model=info.id,
            max_batch_images=self.config.max_batch_images,
            max_wait_ms=self.config.max_wait_ms,
            max_queue_images=self.config.max_queue_images,
            request_timeout_s=self.config.request_timeout_s,
            batch_fill_ms=self.config.batch_fill_ms,
            buckets=buckets,
        )
        self.state = EngineState.WARMING
        await self._warm_up()
        if info.compiled and info.device.startswith("cuda") \
                and uses_cuda_graphs(self.config.compile_mode):
            report_cuda_graph_skips()
        if info.compile_cache:
            await asyncio.get_running_loop().run_in_executor(
                None, CompileCache(Path(info.compile_cache)).save)
        if self.state is not EngineState.WARMING:
            # A drain ran while this awaited: it stopped the threads, so nothing starts now.
            return
        self._scheduler.start()
        self.state = EngineState.READY
        self.metrics.ready.set(1)
        self.metrics.started.set(1)
        logger.info("ready in %.1fs", time.perf_counter() - started)
        self._start_background_build(watch)

    def _start_background_build(self, watch: object) -> None:
        """Have a child build the AOT packages warm-up left pending (see inference.aot_background)."""
        pending = getattr(watch, "pending", None)
        packages = pending() if callable(pending) else []
        if not packages:
            return
        self.metrics.aot_pending.set(len(packages))
        self._background = asyncio.create_task(self._build_in_background(watch),
                                               name="imagegate-aot-build")

    async def _build_in_background(self, watch: Any) -> None:
        try:
            await self._build_and_adopt(watch)
        except Exception:  # a task nobody awaits: log it; the sizes left pending stay eager
            logger.exception("the background AOT build's adoption failed; the sizes it had not "
                             "adopted run eagerly until a restart")

    async def _build_and_adopt(self, watch: Any) -> None:
        assert self._executor is not None
        packages = watch.pending()
        started = time.perf_counter()
        logger.info("building the AOT packages %s in the background; their calls run eagerly "
                    "until each is adopted", ", ".join(packages))
        build = asyncio.ensure_future(self._aot_builder(self.config, watch.folder))
        adopted: list[str] = []
        deadline = time.monotonic() + self.config.aot_build_timeout_s
        try:
            # Each package as soon as it is there: with two warm-up sizes the first serves
            # while the second builds.
            while not (await asyncio.wait({build}, timeout=AOT_POLL_S))[0]:
                adopted += await self._adopt(watch, final=False)
                if time.monotonic() > deadline:
                    # A build that hangs would hold its copy of the model until the server
                    # stops; what it finished is adopted below.
                    logger.error("the background AOT build ran past --aot-build-timeout-s "
                                 "(%.0fs): stopping it", self.config.aot_build_timeout_s)
                    break
        finally:
            if not build.done():  # a drain cancelled this task, or the deadline: stop the child
                build.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await build
        built = False
        if not build.cancelled():  # cancelled: the deadline, logged above
            try:
                built = build.result()
            except Exception:  # the server serves on, eagerly
                logger.exception("the background AOT build could not run")
        # Whatever it made is adopted, even after a failure.
        adopted += await self._adopt(watch, final=True)
        while watch.pending():
            # Left pending only while a LoRA batch's layers are in the UNet (AotRouter.adopt):
            # the next plain batch unloads them.
            await asyncio.sleep(AOT_POLL_S)
            adopted += await self._adopt(watch, final=True)
        logger.log(logging.INFO if built and len(adopted) == len(packages) else logging.ERROR,
                   "background AOT build %s after %.1fs: %d of %d packages adopted",
                   "done" if built else "failed", time.perf_counter() - started, len(adopted),
                   len(packages))

    async def _adopt(self, watch: Any, *, final: bool) -> list[str]:
        """Adopt built packages on the executor thread, between batches; count them."""
        assert self._executor is not None
        adopted = await self._executor.call(lambda: watch.adopt(final=final))
        self.metrics.aot_pending.set(len(watch.pending()))
        if adopted:
            self.metrics.compiles.labels("background").inc(len(adopted))
        return adopted

    def batch_buckets(self) -> BatchBuckets | None:
        """The batch sizes every call is padded to, when the graphs are compiled static."""
        assert self.info is not None
        if not (self.info.compiled and self.config.compile_shapes == "static"):
            return None
        top = self.config.max_batch_images
        if self.config.batch_buckets:
            return BatchBuckets.of(self.config.batch_buckets, top)
        return BatchBuckets.powers_of_two(top)

    def warmup_shapes(self) -> list[tuple[int, int, int]]:
        """(width, height, batch) shapes run before ready.

        Every configured size × batch size. With shape-generic (or batch-dynamic) compiled
        graphs, batches 1, 2, 4, … and the largest are always included: batch 1 is its own
        specialisation, the largest checks memory, and the graph traced between them serves every
        batch size in between; the powers of two in between are cheap insurance, since a guard
        that splits the batch range (one was seen on the CPU at a UNet batch of 16) then compiles
        before ready rather than sending a range to eager. With static-shape graphs every bucket
        is compiled, and only buckets (any other batch size is padded to one). With CUDA graphs
        (``reduce-overhead``) and graphs that are not static, every batch size up to the largest:
        a CUDA graph is recorded per input shape, and recording one on a request would be a
        request-path cost the compile counter does not see. Two cases still record on a request:
        guidance ≤ 1 (no CFG, so the UNet sees odd batch sizes warm-up never ran) and, with
        dynamic shapes, a size that is not a warm-up size.
        """
        assert self.info is not None
        sizes = self.config.warmup_sizes or ((self.info.default_width, self.info.default_height),)
        batches = set(self.config.warmup_batch_sizes)
        buckets = self.batch_buckets()
        if buckets is not None:
            batches = set(buckets.sizes)
        elif self.info.compiled:
            top = self.config.max_batch_images
            batches |= set(BatchBuckets.powers_of_two(top).sizes)
            if uses_cuda_graphs(self.config.compile_mode):
                batches |= set(range(1, top + 1))
        return [(w, h, b) for (w, h) in sizes for b in sorted(batches)]

    async def _warm_up(self) -> None:
        """Run every warm-up shape once, so compiles happen before ready, and seed the cost model."""
        assert self.info is not None and self._scheduler is not None
        shapes = self.warmup_shapes()
        started = time.perf_counter()
        compiling = 0.0
        # Two step counts per shape: the second run is warm (no first-call or compile cost) and
        # the pair separates per-step cost from per-image cost for the admission cost model.
        runs = [(w, h, b, steps) for (w, h, b) in shapes for steps in (2, 3)]
        if self.config.warmup_build_only:
            # Each size's smallest batch comes first, as in the server's own warm-up.
            firsts: dict[tuple[int, int], tuple[int, int, int, int]] = {}
            for w, h, b in shapes:
                firsts.setdefault((w, h), (w, h, b, 2))
            runs = list(firsts.values())
        for i, (w, h, b, steps) in enumerate(runs, 1):
            t0 = time.perf_counter()
            request = GenerationRequest(prompt="warm-up", n=b, width=w, height=h, steps=steps,
                                        seed=0)
            ticket = self._ticket(self.prepare(request), asyncio.get_running_loop().create_future())
            batch = Batch(ticket.key, [Slot(ticket, j) for j in range(b)])
            outcome = await self._executor.run(batch, warmup=True)  # type: ignore[union-attr]
            if outcome.failures:
                raise RuntimeError(f"warm-up {w}x{h} batch {b} failed: {outcome.failures[0][1]}")
            took = time.perf_counter() - t0
            if outcome.compiles:
                self.metrics.compiles.labels("warmup").inc(outcome.compiles)
                compiling += took
            elif i > 1:  # the very first call pays one-off initialisation
                for size, times in outcome.calls:
                    computed = size + times.padded
                    self._scheduler.cost.observe(image_megapixels(request) * computed,
                                                 image_units(request) * computed, times.total)
            logger.info("warm-up %d/%d: %dx%d batch %d, %d steps in %.2fs%s", i, len(runs), w, h,
                        b, steps, took,
                        f" ({outcome.compiles} graphs compiled)" if outcome.compiles else "")
        self.metrics.warmup_seconds.set(time.perf_counter() - started)
        self.metrics.compile_seconds.set(compiling)

    async def drain(self, timeout: float) -> None:
        """Stop admitting, finish or fail what is queued within ``timeout``, then stop the threads."""
        if self.state in (EngineState.DRAINING, EngineState.STOPPED):
            return
        self.state = EngineState.DRAINING
        self.metrics.ready.set(0)
        if self._background is not None and not self._background.done():
            # Stops the child; its sizes were eager all along and need nothing else. Its time
            # comes out of the drain's, which the orchestrator's grace period is sized to.
            stopping = time.monotonic()
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
            timeout = max(0.0, timeout - (time.monotonic() - stopping))
        if self._scheduler is not None:
            await self._scheduler.drain(timeout)
        if self._executor is not None:
            self._executor.shutdown()
        if self._encoder is not None:
            self._encoder.shutdown()
        if self._hub is not None:
            self._hub.shutdown()
        self.state = EngineState.STOPPED

    def sample_accelerator_memory(self) -> None:
        """Refresh the GPU memory gauges (no-op without CUDA)."""
        import torch

        device = self.info.device if self.info is not None else "cpu"
        if device.startswith("cuda") and torch.cuda.is_available():
            self.metrics.gpu_memory.set(torch.cuda.memory_allocated(device))
            self.metrics.gpu_memory_peak.set(torch.cuda.max_memory_allocated(device))

    @property
    def ready(self) -> bool:
        """True when requests are accepted."""
        return self.state is EngineState.READY

    def failed_packages(self) -> list[str]:
        """AOT packages (``name HxW``) this process could not build, load or run; eager instead."""
        failed = getattr(self._executor.watch if self._executor else None, "failed", None)
        return failed() if callable(failed) else []

    def has_room(self, images: int) -> bool:
        """True unless the queue is too full for ``images`` more (admission for async APIs)."""
        return self._scheduler.has_room(images) if self._scheduler else True

    @property
    def queued_images(self) -> int:
        """Images currently waiting in the queue."""
        return self._scheduler.queued_images if self._scheduler else 0

    # -- requests ----------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Validate a canonical request and normalise it (style applied, sampler name canonical).

        Raises :class:`InvalidRequest` naming the canonical field at fault.
        """
        cfg = self.config
        if not request.prompt.strip() and request.init_image is None:
            raise InvalidRequest("prompt must not be empty", field="prompt")
        if request.n < 1:
            raise InvalidRequest("n must be at least 1", field="n")
        for name, value in (("width", request.width), ("height", request.height)):
            if value % 8:
                raise InvalidRequest(f"{name} must be a multiple of 8, got {value}", field=name)
            if not cfg.min_size <= value <= cfg.max_size:
                raise InvalidRequest(
                    f"{name} must be between {cfg.min_size} and {cfg.max_size}, got {value}",
                    field=name,
                )
        if not 1 <= request.steps <= cfg.max_steps:
            raise InvalidRequest(f"steps must be between 1 and {cfg.max_steps}", field="steps")
        if request.refine is not None and not 1 <= request.refine.steps <= cfg.max_steps:
            raise InvalidRequest(f"refiner steps must be between 1 and {cfg.max_steps}",
                                 field="refine")
        for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
            if len(text) > cfg.max_prompt_chars:
                raise InvalidRequest(
                    f"{name} must be at most {cfg.max_prompt_chars} characters, got {len(text)}",
                    field=name)
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}", field="seed")
        if request.refine is not None and self.info is not None and not self.info.has_refiner:
            raise FeatureUnavailable(
                "this request needs the SDXL refiner, but the server was started without --refiner",
                field="refine",
            )
        if not 0 <= request.partial_images <= MAX_PARTIAL_IMAGES:
            raise InvalidRequest(f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}",
                                 field="partial_images")
        self._check_init_image(request)
        self._check_control(request)
        self._check_loras(request)
        sampler = self.samplers.canonical_name(request.sampler)
        prompt, negative = self.styles.apply(request.style, request.prompt, request.negative_prompt)
        return msgspec.structs.replace(
            request, sampler=sampler, prompt=prompt, negative_prompt=negative, style=None
        )

    def _check_init_image(self, request: GenerationRequest) -> None:
        init = request.init_image
        if init is None:
            return
        if not 0.0 < init.strength <= 1.0:
            raise InvalidRequest("init_image.strength must be above 0 and at most 1",
                                 field="init_image.strength")
        if int(request.steps * init.strength) < 1:
            raise InvalidRequest(
                f"init_image.strength {init.strength:g} with {request.steps} steps leaves no "
                "denoising step; raise one of them", field="init_image.strength")
        check_image_header(init.data, "init_image")
        if init.mask is not None:
            check_image_header(init.mask, "init_image.mask")
            if request.refine is not None:
                raise FeatureUnavailable("the refiner cannot be combined with a mask",
                                         field="refine")

    def _check_control(self, request: GenerationRequest) -> None:
        if not request.control:
            return
        served = self.info.control_kinds if self.info is not None else ()
        if len(request.control) > MAX_CONTROL_UNITS:
            raise InvalidRequest(f"at most {MAX_CONTROL_UNITS} ControlNet units per request",
                                 field="control")
        if request.refine is not None:
            raise FeatureUnavailable("the refiner cannot be combined with ControlNet",
                                     field="refine")
        low, high = CONTROL_WEIGHT_RANGE
        for unit in request.control:
            if unit.kind not in served:
                raise FeatureUnavailable(
                    f"ControlNet {unit.kind!r} is not served here; served: "
                    f"{', '.join(served) or 'none'}", field="control")
            if unit.preprocess and unit.kind not in PREPROCESSORS:
                raise FeatureUnavailable(
                    f"no {unit.kind} preprocessor here; send a ready {unit.kind} map with "
                    "preprocessing off", field="control")
            if not low <= unit.weight <= high:
                raise InvalidRequest(f"control weight must be between {low:g} and {high:g}",
                                     field="control")
            if not 0.0 <= unit.guidance_start < unit.guidance_end <= 1.0:
                raise InvalidRequest(
                    "control guidance_start and guidance_end must satisfy 0 <= start < end <= 1",
                    field="control")
            check_image_header(unit.image, "control")

    def _check_loras(self, request: GenerationRequest) -> None:
        if not request.loras:
            return
        if len(request.loras) > MAX_LORAS:
            raise InvalidRequest(f"at most {MAX_LORAS} LoRAs per request", field="loras")
        low, high = LORA_WEIGHT_RANGE
        for lora in request.loras:
            if not low <= lora.weight <= high:
                raise InvalidRequest(f"LoRA weight must be between {low:g} and {high:g}",
                                     field="loras")
        self._lora_library().check(request.loras)

    def _lora_library(self) -> LoraLibrary:
        """The LoRA folder the model was loaded with (known once it has loaded)."""
        if self._loras is None:
            folder = self.info.lora_dir if self.info is not None else None
            self._loras = LoraLibrary(Path(folder) if folder else None)
        return self._loras

    def lora_names(self) -> list[str]:
        """LoRA adapter names requests may use now (empty when LoRA is not configured)."""
        return self._lora_library().names()

    def progress(self) -> ProgressSnapshot:
        """What the executor is doing now: step, fraction, ETA, queue and a cheap preview."""
        queued = self._scheduler.queued_requests if self._scheduler is not None else 0
        if self._hub is None:
            return ProgressSnapshot(active=False, queued_requests=queued)
        return self._hub.snapshot(queued)

    def _ticket(self, request: GenerationRequest, future: asyncio.Future) -> Ticket:
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        model = self.info.id if self.info else self.config.model
        key = BatchKey.of(request, model, request.sampler or self.samplers.default)
        return Ticket(request=request, key=key, seed=seed, future=future)

    async def generate(
        self,
        request: GenerationRequest,
        on_progress: Callable[[Progress], None] | None = None,
        *,
        tag: str | None = None,
        time_limit_s: float | None = None,
    ) -> GenerationResult:
        """Validate, queue and run ``request``; cancelling the caller drops it from the queue.

        By default the request must finish within ``--request-timeout-s``, queue time included:
        admission refuses what could not, and a timer drops it when the time is up. A caller
        that times the work itself (the job runner: an async job's execution timeout counts
        from its start, not its wait in the queue) passes ``time_limit_s`` instead: admission
        measures the request alone against it, and the engine sets no timer of its own.

        ``on_progress`` (called on the event loop, never after this returns or is cancelled)
        gets a ``started`` report at step 0 when the first batch starts, rate-limited step
        reports, and the ``partial_images`` previews; every preview is delivered before this
        returns the result. A cancelled caller's running images are discarded; the batch stops
        early only when every request in it is gone. ``tag`` names the request for
        :meth:`interrupt`.
        """
        if self.state is EngineState.DRAINING or self.state is EngineState.STOPPED:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        if self.state is not EngineState.READY or self._scheduler is None:
            raise NotReady(f"the model is {self.state.value}; retry shortly")
        prepared = self.prepare(request)
        loop = asyncio.get_running_loop()
        ticket = self._ticket(prepared, loop.create_future())
        ticket.on_progress = on_progress
        ticket.time_limit_s = time_limit_s
        if tag is not None:
            self._tagged.setdefault(tag, set()).add(ticket)
        self._scheduler.submit(ticket)
        timeout = self.config.request_timeout_s
        # A timer rather than wait_for(shield(...)): this is the per-request hot path.
        timer = (loop.call_later(timeout, self._expire, ticket, timeout)
                 if time_limit_s is None else None)
        try:
            result = await ticket.future
            if ticket.partial_waiters:
                await asyncio.gather(*ticket.partial_waiters, return_exceptions=True)
            return result
        except asyncio.CancelledError:
            self._scheduler.abandon(ticket)
            raise
        finally:
            ticket.progress_closed = True
            if timer is not None:
                timer.cancel()
            if tag is not None:
                tagged = self._tagged.get(tag)
                if tagged is not None:
                    tagged.discard(ticket)
                    if not tagged:
                        del self._tagged[tag]

    def interrupt(self, tag: str) -> int:
        """Cut short the running requests generated under ``tag``; how many were asked.

        A request whose images are being denoised stops at the next step (when every request in
        its batch asked; otherwise it finishes with its batch mates) and gets what was decoded
        then. Requests still waiting for their first batch are left alone, as AUTOMATIC1111's
        interrupt only stops the job in progress.
        """
        asked = 0
        for ticket in self._tagged.get(tag, ()):
            if ticket.started_at is not None and not ticket.future.done():
                ticket.stop_early = True
                asked += 1
        return asked

    def _expire(self, ticket: Ticket, timeout: float) -> None:
        if ticket.future.done():
            return
        assert self._scheduler is not None
        self._scheduler.abandon(ticket)
        ticket.future.set_exception(DeadlineExceeded(
            f"the request did not finish within {timeout:g}s and was dropped"))
