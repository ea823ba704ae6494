"""Server settings: one object, built from CLI flags and ``IMAGEGATE_*`` environment variables.

Every field is a flag (``--max-batch-images``) and an env var (``IMAGEGATE_MAX_BATCH_IMAGES``);
a flag given on the command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gateway.sizes import parse_size
from inference import EngineConfig
from inference.compile import AOT_MODES as AOT_COMPILE_MODES
from inference.controlnet import parse_controlnets

ENV_PREFIX = "IMAGEGATE_"


def _size_list(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        size = parse_size(part, spaces=True)
        if size is None:
            raise ValueError(f"not a WxH size: {part!r}")
        out.append(size)
    return tuple(out)


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class SettingsError(ValueError):
    """One or more settings are invalid; ``problems`` holds one line per bad value."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(",") if b.strip())


def _convert_one(value: Any, hint: Any) -> Any:
    """``value`` (text from a flag or variable, or a typed override) as the field's type."""
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
    is_bool = base is bool or base == (bool | None)
    if is_bool and isinstance(value, str):
        folded = value.strip().lower()
        if folded in _TRUE:
            return True
        if folded in _FALSE:
            return False
        if base is not bool and folded in ("auto", "none", ""):
            return None
        raise ValueError("expected true or false (also yes/no, on/off, 1/0)")
    if typing.get_origin(base) is Literal and isinstance(value, str):
        value = value.strip().lower()
    return msgspec.convert(value, hint, strict=False)


def _why(exc: Exception, hint: Any) -> str:
    """What the field accepts, in words (msgspec's own text names Python types)."""
    if isinstance(exc, ValueError) and not isinstance(exc, msgspec.ValidationError):
        return str(exc)
    base, metas = hint, ()
    if typing.get_origin(hint) is Annotated:
        base, *metas = typing.get_args(hint)
    bounds = []
    for meta in metas:
        if isinstance(meta, Meta):
            for attr, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                if getattr(meta, attr) is not None:
                    bounds.append(f"{word} {getattr(meta, attr)}")
    if typing.get_origin(base) is Literal:
        return "expected one of " + ", ".join(map(str, typing.get_args(base)))
    kind = {int: "a whole number", float: "a number"}.get(base, "a valid value")
    if base == (int | None):
        kind = "a whole number"
    elif base == (float | None):
        kind = "a number"
    return f"expected {kind}" + (" " + " and ".join(bounds) if bounds else "")


class Settings(msgspec.Struct, kw_only=True):
    """Every server setting. Field docs become ``--help`` text."""

    model: Annotated[str, Meta(description="Model: a diffusers folder, a .safetensors file, a cached hub id, or tiny-sdxl.")] = "tiny-sdxl"
    refiner: Annotated[str | None, Meta(description="SDXL refiner, in any form MODEL accepts (tiny-sdxl brings its own).")] = None
    host: Annotated[str, Meta(description="Address to bind.")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535, description="Port to bind.")] = 8000
    device: Annotated[str, Meta(description="torch device: auto, cuda, cuda:N or cpu.")] = "auto"
    dtype: Annotated[Literal["auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32", "half"], Meta(description="auto (CUDA: bf16 or fp16; CPU: fp32), bfloat16, float16 or float32.")] = "auto"
    compile: Annotated[bool | None, Meta(description="torch.compile the UNet and VAE decoder (default: on for CUDA, off for CPU).")] = None
    compile_mode: Annotated[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"], Meta(description="torch.compile mode: reduce-overhead and max-autotune record CUDA graphs (warm-up then runs every batch size up to --max-batch-images unless shapes are static).")] = "default"
    compile_scope: Annotated[Literal["auto", "blocks", "unet", "full"], Meta(description="What is compiled: blocks (the UNet's repeated transformer blocks), unet (the whole UNet; the VAE decoder stays eager) or full (the whole UNet and VAE decoder; with --compile-method aot the decoder of one image, which decodes a batch one image at a time once its package serves; eagerly, whole, until then). auto: full when the recipe is aot (see --compile-method), else blocks.")] = "auto"
    compile_shapes: Annotated[Literal["auto", "dynamic", "static", "batch"], Meta(description="dynamic: one shape-generic graph serves every batch size and resolution. static: one graph per batch bucket and warm-up size (needed for CUDA graphs); batches are padded up to a bucket. batch (with --compile-scope unet or full): only the batch dimension is dynamic, one graph per warm-up size, no padding. auto: batch when the recipe is aot, else dynamic.")] = "auto"
    compile_method: Annotated[Literal["auto", "jit", "aot"], Meta(description="jit: torch.compile, whose dynamo re-traces the model at every start. aot: torch.export + AOTInductor, the whole UNet with a dynamic batch (scope unet, or full to add the VAE decoder for one image; shapes batch; mode default or max-autotune-no-cudagraphs; no --quantize), one package per warm-up size kept in the compile cache and loaded at later starts without tracing; see --aot-build. auto (the default): aot when --compile-scope and --compile-shapes are not given, the mode records no CUDA graphs and --quantize is none; otherwise jit (scope blocks and dynamic shapes unless given). On an H200 the default recipe served one request in 0.78-0.79 s against the jit blocks recipe's 1.11 s.")] = "auto"
    aot_build: Annotated[Literal["background", "foreground"], Meta(description="With --compile-method aot, where a missing package is built. background: ready once warm-up has run eagerly; a child process builds the packages (a second copy of the model in accelerator memory meanwhile) and the server adopts them between batches; those sizes run eagerly until then (imagegate_aot_pending_packages). foreground: warm-up builds them before ready (283 s for one size on an H200).")] = "background"
    aot_build_timeout_s: Annotated[float, Meta(gt=0, le=86400, description="With --aot-build background, how long the child may build before it is stopped (its sizes then run eagerly until the next start, which tries again; packages it finished are adopted). Frees the accelerator memory of a build that hangs. An H200 built one size's UNet and decoder packages in 4.5 min.")] = 3600.0
    batch_buckets: Annotated[str | None, Meta(description="With --compile-shapes static: the batch sizes compiled, comma-separated (default: 1,2,4,… up to --max-batch-images, which is always one).")] = None
    attention_backend: Annotated[Literal["auto", "cudnn", "flash", "efficient", "math"], Meta(description="Preferred attention kernel (a preference: others stay as fallbacks). auto keeps torch's order (FlashAttention first); cudnn puts cuDNN's kernels first, reported faster on Hopper. CUDA kernels are refused on the CPU.")] = "auto"
    cudnn_benchmark: Annotated[bool, Meta(description="Let cuDNN time its convolution algorithms for each new input shape and keep the fastest (warm-up pays it for warmed sizes). Eager on an H200: one batch-1 image 12.5% faster, batch 8 1.7% (one sample); not measured served. CUDA only.")] = False
    quantize: Annotated[Literal["none", "fp8"], Meta(description="Quantize the UNet: fp8 (torchao float8 matmuls; needs an FP8-capable GPU such as Hopper, and the fp8 extra) or none.")] = "none"
    allow_download: Annotated[bool, Meta(description="Allow fetching a hub id that is not in the local cache.")] = False
    single_file_config: Annotated[str | None, Meta(description="Diffusers SDXL folder or hub id that supplies component configs for a single-file checkpoint.")] = None
    cache_dir: Annotated[str, Meta(description="Where the built-in model and other caches live.")] = "~/.cache/imagegate"
    data_dir: Annotated[str, Meta(description="Where served images (URL mode) and stores live.")] = "~/.local/share/imagegate"
    api_keys: Annotated[str, Meta(description="Comma-separated API keys (plain text; prefer --keys-file).")] = ""
    keys_file: Annotated[str | None, Meta(description="JSON keys file holding only SHA-256 hashes of keys.")] = None
    insecure_no_auth: Annotated[bool, Meta(description="Allow serving on a non-loopback address with no keys.")] = False
    public_url: Annotated[str | None, Meta(description="Base URL clients reach this server at, used in image URLs (default: from the request).")] = None
    url_ttl_s: Annotated[int, Meta(ge=1, description="How long URL-mode images stay downloadable, in seconds.")] = 3600
    max_body_bytes: Annotated[int, Meta(ge=1, description="Largest accepted request body, in bytes.")] = 25 * 1024 * 1024
    header_timeout_s: Annotated[float, Meta(gt=0, le=86400, description="How long a connection may take to send a request's headers (from its opening, or from the previous response); a slower client's connection is closed.")] = 60.0
    body_timeout_s: Annotated[float, Meta(gt=0, le=86400, description="How long a request body may take to arrive, from its headers; a slower client gets a 408.")] = 120.0
    default_steps: Annotated[int, Meta(ge=1, description="Steps when a request does not say (OpenAI quality=auto).")] = 25
    quality_steps: Annotated[str, Meta(description="Steps for OpenAI quality levels, as name=steps pairs.")] = "low=15,medium=25,high=40,standard=25,hd=40"
    default_guidance: Annotated[float, Meta(ge=0, le=100, description="Guidance scale when a request does not say.")] = 5.0
    min_size: Annotated[int, Meta(ge=8, description="Smallest width or height, in pixels.")] = 64
    max_size: Annotated[int, Meta(ge=8, description="Largest width or height, in pixels.")] = 2048
    max_steps: Annotated[int, Meta(ge=1, description="Largest number of denoising steps a request may ask for.")] = 150
    max_batch_images: Annotated[int, Meta(ge=1, description="Most images in one pipeline call.")] = 8
    max_wait_ms: Annotated[float, Meta(ge=0, description="How long an idle executor waits for a batch to fill (0: start at once).")] = 0.0
    batch_fill_ms: Annotated[Annotated[float, Meta(ge=0)] | None, Meta(description="Under back-to-back load, how long the last batch's group may wait to fill up to the requests queued in it when that batch ended plus those it answered (default: a fifth of a recent batch's time, at most 1 s; 0: never wait).")] = None
    max_prompt_chars: Annotated[int, Meta(ge=1, description="Longest prompt or negative prompt any API accepts, in characters (the CLIP encoders read 77 tokens; longer text costs tokenizer time only).")] = 8000
    max_queue_images: Annotated[int, Meta(ge=1, description="Most images waiting in the queue; past it requests are refused with an overload error.")] = 64
    request_timeout_s: Annotated[float, Meta(gt=0, description="Deadline of one request, queue time included.")] = 300.0
    drain_timeout_s: Annotated[float, Meta(ge=0, description="On SIGTERM, how long queued and running work may still run before it is failed (a running batch stops at its next step).")] = 30.0
    png_compress_level: Annotated[int, Meta(ge=0, le=9, description="PNG effort: 0 writes uncompressed PNG with Pillow; 1-9 use the fast fpng writer when installed (the default), else Pillow's zlib at that level.")] = 1
    encode_workers: Annotated[int, Meta(ge=0, description="Threads that encode images (0: one per CPU core, at most 8).")] = 0
    warmup_sizes: Annotated[str, Meta(description="WxH sizes to warm up before ready (default: the model's native size).")] = ""
    warmup_batch_sizes: Annotated[str, Meta(description="Batch sizes to warm up for each warm-up size.")] = "1"
    token_secret: Annotated[str | None, Meta(description="Secret that signs OAuth access tokens; give every replica the same one (default: random per start, so tokens die with the process).")] = None
    token_ttl_s: Annotated[int, Meta(ge=1, description="Lifetime of issued OAuth access tokens, in seconds.")] = 2592000
    ratelimit_storage: Annotated[str, Meta(description="Where per-client quota counters live: a limits storage URI (memory://, redis://host:6379).")] = "memory://"
    usage_db: Annotated[str | None, Meta(description="SQLite file of the usage ledger (default: DATA_DIR/usage.sqlite3).")] = None
    fetch_max_bytes: Annotated[int, Meta(ge=1, description="Largest image a request may point at (image_url), in bytes.")] = 20 * 1024 * 1024
    fetch_timeout_s: Annotated[float, Meta(gt=0, description="Deadline for fetching one image_url, redirects included.")] = 15.0
    fetch_max_pixels: Annotated[int, Meta(ge=1, le=89_478_485, description="Largest fetched image, in pixels (bigger ones are refused as possible decompression bombs; at most Pillow's own ceiling, 89478485).")] = 36_000_000
    fetch_allow: Annotated[str, Meta(description="Internal hosts and CIDRs that image_url may reach despite the SSRF rules (comma-separated).")] = ""
    webhook_allow: Annotated[str, Meta(description="Internal hosts and CIDRs that webhooks may reach despite the SSRF rules (comma-separated).")] = ""
    webhook_retry_delay_s: Annotated[float, Meta(ge=0, description="Pause between webhook delivery attempts (2 retries).")] = 10.0
    webhook_timeout_s: Annotated[float, Meta(gt=0, description="Deadline of one webhook delivery attempt.")] = 10.0
    job_ttl_s: Annotated[float, Meta(gt=0, description="How long an async job and its result are kept after submission, when its policy does not say.")] = 86400.0
    job_execution_timeout_s: Annotated[float, Meta(gt=0, description="Execution timeout of an async job, when its policy does not say.")] = 600.0
    job_concurrency: Annotated[int, Meta(ge=1, description="Async jobs handed to the engine at once; the rest wait queued in the task store.")] = 16
    job_queue_max: Annotated[int, Meta(ge=1, description="Most queued async jobs; past it submissions get HTTP 429.")] = 1000
    job_sweep_interval_s: Annotated[float, Meta(gt=0, description="How often expired async jobs and their files are deleted.")] = 30.0
    results_dir: Annotated[str | None, Meta(description="Where async job result images live (default: DATA_DIR/results).")] = None
    log_level: Annotated[Literal["debug", "info", "warning", "error", "critical"], Meta(description="Log level: debug, info, warning, error or critical.")] = "info"
    log_format: Annotated[Literal["text", "json"], Meta(description="text or json (one JSON object per line, every logger included).")] = "text"
    # -- inference features: ControlNet, LoRA -------------------------------------------------
    controlnet: Annotated[str, Meta(description="ControlNets to serve, as comma-separated kind=path pairs (diffusers ControlNetModel folders), e.g. canny=/models/cn-canny; tiny-sdxl serves its own canny.")] = ""
    lora_dir: Annotated[str | None, Meta(description="Folder of <name>.safetensors LoRA files (diffusers or kohya format) that requests may name; tiny-sdxl falls back to its own folder with tiny-lora.")] = None
    # Replicas sharing Redis (docs/replicas.md).
    redis_url: Annotated[str | None, Meta(description="Redis URL (redis://host:6379/0): async jobs, their images, URL-mode images, quota counters and the usage ledger live there, shared by every replica given the same URL and prefix.")] = None
    redis_wait_s: Annotated[float, Meta(ge=0, le=3600, description="How long a start with --redis-url waits for Redis to answer (it may be starting beside this server) before exiting with status 2.")] = 10.0
    redis_prefix: Annotated[str, Meta(description="Prefix of every Redis key this server writes (replicas of one deployment share it).")] = "imagegate"
    replica_id: Annotated[str | None, Meta(description="Name of this replica in job records (RunPod workerId) and logs (default: random per start). Must be unique among live replicas: a start re-queues the jobs left running under its id.")] = None
    # Async task dialects (Alibaba SCC, DashScope, ModelsLab).
    modelslab_wait_s: Annotated[float, Meta(ge=0, le=300, description="How long a ModelsLab text2img, img2img or inpaint call waits for its images before answering status processing with a fetch_result URL.")] = 20.0

    @property
    def cache_path(self) -> Path:
        """``cache_dir`` with ``~`` expanded."""
        return Path(self.cache_dir).expanduser()

    @property
    def data_path(self) -> Path:
        """``data_dir`` with ``~`` expanded."""
        return Path(self.data_dir).expanduser()

    @property
    def usage_path(self) -> Path:
        """The usage ledger's SQLite file."""
        return Path(self.usage_db).expanduser() if self.usage_db else self.data_path / "usage.sqlite3"

    @property
    def keys_path(self) -> Path | None:
        """``keys_file`` with ``~`` expanded, if set."""
        return Path(self.keys_file).expanduser() if self.keys_file else None

    @classmethod
    def from_sources(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, then ``IMAGEGATE_*`` variables from ``environ``, then explicit ``overrides``.

        This is the one place settings are checked: every bad value is reported, one line each,
        naming the flag or variable it came from, in a :class:`SettingsError`. An empty variable
        counts as unset.
        """
        environ = os.environ if environ is None else environ
        raw: dict[str, tuple[Any, str]] = {}
        for name in cls.__struct_fields__:
            env_name = ENV_PREFIX + name.upper()
            env = environ.get(env_name)
            if env is not None and env.strip() != "":
                raw[name] = (env.strip(), env_name)
        for name, value in (overrides or {}).items():
            if value is not None:
                raw[name] = (value, "--" + name.replace("_", "-"))
        hints = typing.get_type_hints(cls, include_extras=True)
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name, (value, source) in raw.items():
            if name not in hints:
                problems.append(f"{source}: unknown setting")
                continue
            try:
                values[name] = _convert_one(value, hints[name])
            except (msgspec.ValidationError, ValueError) as exc:
                problems.append(f"{source}: {_why(exc, hints[name])}, got {value!r}")
        settings = msgspec.convert(values, cls) if not problems else None
        if settings is not None:
            problems.extend(settings._cross_check(raw))
        if problems:
            raise SettingsError(problems)
        assert settings is not None
        return settings

    def _cross_check(self, raw: Mapping[str, tuple[Any, str]]) -> list[str]:
        """Checks that involve more than one field, or parse a text field."""

        def src(name: str) -> str:
            return raw[name][1] if name in raw else "--" + name.replace("_", "-")

        problems: list[str] = []
        if self.min_size > self.max_size:
            problems.append(f"{src('min_size')}: {self.min_size} is above max-size {self.max_size}")
        if self.default_steps > self.max_steps:
            problems.append(f"{src('default_steps')}: {self.default_steps} is above max-steps "
                            f"{self.max_steps}")
        try:
            table = self.quality_table()
            if any(v < 1 or v > self.max_steps for v in table.values()):
                problems.append(f"{src('quality_steps')}: every step count must be 1..max-steps "
                                f"({self.max_steps}), got {self.quality_steps!r}")
        except ValueError:
            problems.append(f"{src('quality_steps')}: expected name=steps pairs separated by "
                            f"commas (e.g. low=15,high=40), got {self.quality_steps!r}")
        try:
            for w, h in _size_list(self.warmup_sizes):
                if not (self.min_size <= w <= self.max_size and self.min_size <= h <= self.max_size):
                    raise ValueError
        except ValueError:
            problems.append(f"{src('warmup_sizes')}: expected WxH sizes within min-size..max-size "
                            f"separated by commas (e.g. 1024x1024,768x1344), got "
                            f"{self.warmup_sizes!r}")
        for name in ("warmup_batch_sizes", "batch_buckets"):
            text = getattr(self, name)
            if text is None:
                continue
            try:
                batches = _int_list(text)
                if not batches or any(b < 1 or b > self.max_batch_images for b in batches):
                    raise ValueError
            except ValueError:
                problems.append(f"{src(name)}: expected batch sizes from 1 to max-batch-images "
                                f"({self.max_batch_images}) separated by commas, got {text!r}")
        scope, shapes, method = self.compile_recipe()
        # Only a batch asked for: one that aot's "auto" resolved to is aot's own message below.
        if self.compile_shapes == "batch" and scope == "blocks":
            problems.append(f"{src('compile_shapes')}: batch needs --compile-scope unet or full "
                            "(regional compilation cannot mark the blocks' batch dimension)")
        if method == "aot":
            aot_needs = [f"--{flag}" for flag, ok in (
                ("compile-scope unet or full", scope in ("unet", "full")),
                ("compile-shapes batch", shapes == "batch"),
                ("compile-mode default or max-autotune-no-cudagraphs",
                 self.compile_mode in AOT_COMPILE_MODES),
                ("quantize none", self.quantize == "none")) if not ok]
            if aot_needs:
                problems.append(f"{src('compile_method')}: aot needs {', '.join(aot_needs)} "
                                "(it compiles the whole UNet ahead of time with a dynamic batch, "
                                "records no CUDA graphs and does not take quantized weights)")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            problems.append(f"{src('public_url')}: must start with http:// or https://, got "
                            f"{self.public_url!r}")
        return problems

    def startup_warnings(self) -> list[str]:
        """Settings that work but that an operator should know about, one line each."""
        out: list[str] = []
        if not self.public_url and not self.is_loopback():
            out.append(f"--public-url is not set and the server binds {self.host}: image URLs "
                       "are built from each client's Host header; set --public-url to the "
                       "address clients should use")
        if self.batch_buckets is not None and self.compile_shapes != "static":
            out.append("--batch-buckets is set but --compile-shapes is not static: batches are "
                       "not padded, the buckets are ignored")
        if self.aot_build != "background" and self.compile_recipe()[2] != "aot":
            out.append("--aot-build is set but --compile-method is not aot: it is ignored")
        if self.token_ttl_s < 3600:
            out.append(f"--token-ttl-s is {self.token_ttl_s}s, below 3600: Qianfan's SDK "
                       "refreshes access tokens at most hourly, so its clients will see expired "
                       "tokens")
        return out

    def compile_recipe(self) -> tuple[str, str, str]:
        """(scope, shapes, method) with every ``auto`` resolved.

        The default recipe is the whole UNet, and the VAE decoder for one image, compiled ahead
        of time (aot, built in the background): on an H200 the UNet's package served one
        request fastest (docs/benchmarks.md §4.12), the one recipe measured under 0.8 s had the
        decoder compiled too (§4.9), and built in the background its cold start waits for no
        compile. On an H200 it served one request in 0.78-0.79 s (§4.14). A compile flag
        that asks for what aot cannot do (CUDA graphs, quantized weights) gets the jit recipe
        instead, with the defaults it always had (blocks, dynamic shapes); so does any explicit
        scope or shapes, so that a recipe spelled out keeps its meaning.
        """
        scope, shapes, method = self.compile_scope, self.compile_shapes, self.compile_method
        if method == "auto":
            default_recipe = (scope == "auto" and shapes == "auto"
                              and self.compile_mode in AOT_COMPILE_MODES
                              and self.quantize == "none")
            method = "aot" if default_recipe else "jit"
        if method == "aot":
            # full: the decoder too, for one image (what a lone request waits for last).
            return (scope if scope != "auto" else "full",
                    shapes if shapes != "auto" else "batch", method)
        return (scope if scope != "auto" else "blocks",
                shapes if shapes != "auto" else "dynamic", method)

    def quality_table(self) -> dict[str, int]:
        """``quality_steps`` parsed to a dict."""
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in self.quality_steps.split(","))):
            name, sep, steps = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"not a name=steps pair: {part!r}")
            out[name.strip()] = int(steps)
        return out

    def is_loopback(self) -> bool:
        """True when bound to a loopback address only."""
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    def engine_config(self) -> EngineConfig:
        """The slice of the settings the engine needs."""
        scope, shapes, method = self.compile_recipe()
        return EngineConfig(
            model=self.model,
            refiner=self.refiner,
            cache_dir=self.cache_path,
            device=self.device,
            dtype=self.dtype,
            compile=self.compile,
            compile_mode=self.compile_mode,
            compile_scope=scope,
            compile_shapes=shapes,
            compile_method=method,
            aot_build=self.aot_build,
            aot_build_timeout_s=self.aot_build_timeout_s,
            batch_buckets=_int_list(self.batch_buckets) if self.batch_buckets else (),
            quantize=self.quantize,
            attention_backend=self.attention_backend,
            cudnn_benchmark=self.cudnn_benchmark,
            batch_fill_ms=self.batch_fill_ms,
            max_prompt_chars=self.max_prompt_chars,
            allow_download=self.allow_download,
            single_file_config=self.single_file_config,
            max_batch_images=self.max_batch_images,
            max_wait_ms=self.max_wait_ms,
            max_queue_images=self.max_queue_images,
            request_timeout_s=self.request_timeout_s,
            png_compress_level=self.png_compress_level,
            encode_workers=self.encode_workers,
            min_size=self.min_size,
            max_size=self.max_size,
            max_steps=self.max_steps,
            warmup_sizes=_size_list(self.warmup_sizes),
            warmup_batch_sizes=_int_list(self.warmup_batch_sizes),
            controlnets=parse_controlnets(self.controlnet),
            lora_dir=Path(self.lora_dir).expanduser() if self.lora_dir else None,
        )


def add_settings_arguments(parser: argparse.ArgumentParser, *, skip: Sequence[str] = ()) -> None:
    """Add one ``--flag`` per settings field; defaults stay ``None`` so env vars can fill in."""
    hints = Settings.__annotations__
    for name in Settings.__struct_fields__:
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        annotation = str(hints[name])
        help_text = _help_for(name)
        env = ENV_PREFIX + name.upper()
        default = getattr(Settings(), name)
        # argparse %-formats help: a literal percent sign in a description must be doubled.
        shown = f" [env {env}; default {default}]".replace("%", "%%")
        help_text = help_text.replace("%", "%%")
        if annotation.startswith("Annotated[bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text + shown)
        else:
            parser.add_argument(flag, default=None, metavar=name.upper(), help=help_text + shown)


def _help_for(name: str) -> str:
    resolved = typing.get_type_hints(Settings, include_extras=True)[name]
    for meta in getattr(resolved, "__metadata__", ()):
        if isinstance(meta, Meta) and meta.description:
            return meta.description
    return ""


def settings_markdown() -> str:
    """The settings as a markdown table (flag, env var, default, meaning), for the README."""
    rows = ["| flag | env var | default | meaning |", "|---|---|---|---|"]
    defaults = Settings()
    for name in Settings.__struct_fields__:
        default = getattr(defaults, name)
        shown = "—" if default in (None, "") else f"`{default}`"
        flag = "--" + name.replace("_", "-")
        rows.append(f"| `{flag}` | `{ENV_PREFIX}{name.upper()}` | {shown} | {_help_for(name)} |")
    return "\n".join(rows)
