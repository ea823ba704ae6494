"""The UNet (and one image's VAE decode) compiled ahead of time: torch.export + AOTInductor.

Why (issue 9): ``torch.compile`` re-traces the whole UNet with dynamo at every start, whatever
its caches hold (16 s on an H200, docs/benchmarks.md §4.9), then loads its graphs from the
inductor cache; with ``--compile-scope unet`` a warm start took 58 s of issue 9's 60. An
AOTInductor package is the compiled UNet as a shared library: a warm start loads it from the
compile cache without tracing anything, and a call runs it without dynamo's guards or Python
wrapper. What that saves on a GPU is **not measured yet**; on this project's CPU, tiny-sdxl's
warm-up on a warm cache took 2.3-2.4 s against 11.5-13.7 s with ``torch.compile``
(docs/benchmarks.md §4.11).

How:

- **One package per latent size**, exported at the first warm-up call of that size with the
  pipeline's own arguments as the example, the batch dimension dynamic (2 up to twice the
  largest batch: classifier-free guidance doubles it) and everything else static, as
  ``--compile-shapes batch`` compiles with dynamo. Inductor compiles a dynamic dimension for
  sizes of 2 and up, so a UNet batch of one (one image without guidance) runs eagerly. The
  package is saved under the keyed compile-cache folder with a signature of its example; a later
  start loads it when the signature matches its first call, and builds it again otherwise.
- **Weights are not in the package**: it is built without them (small tensors included, which
  inductor would otherwise inline) and pointed at the live UNet's tensors (``user_managed``), so
  there is one copy in memory, as with ``torch.compile``.
- **The package checks little**: AOTInductor runs whatever it is given unless
  ``AOTI_RUNTIME_CHECK_INPUTS`` is set (which this module sets, as a backstop), and even then it
  cannot know a call's meaning. :class:`AotRouter` therefore checks every call against the
  example's structure, dtypes, devices, layouts and non-batch sizes, and runs anything else
  (another size, ControlNet residuals, loaded LoRA adapters, a batch outside the range) on the
  eager UNet, counted as an eager call. A package that fails a call is dropped for good and its
  size runs eagerly, unless the failure is its input check reporting a lower batch limit than
  asked (then batches above it run eagerly); out-of-memory errors go to the executor, which
  splits the batch.
- **Never on the request path**: a package is built or loaded only during warm-up, or adopted
  between batches (:meth:`AotRouter.adopt`); while serving (:meth:`AotRouter.serving`) a size
  without one runs eagerly.
- **Built in the background by default** (``--aot-build background``): a cold start does not
  wait the minutes a package takes (255 s for the full-size UNet on an H200, §4.12). Warm-up
  records the sizes without a package (:meth:`AotRouter.pending`) and runs them eagerly; the
  engine has a child process build them (inference.aot_background) and has the executor adopt
  each between batches as soon as it is complete. ``foreground`` builds in warm-up, before
  ready.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Part of every package's signature: a change to what the signature describes, or to how this
# module calls a package, bumps it so that packages built before are rebuilt, not trusted.
FORMAT = 1
# Inductor compiles a dynamic dimension for sizes from 2 (it treats 0 and 1 as special).
MIN_BATCH = 2
# The input alignment, in bytes, AOTInductor compiles a package's kernels for.
ALIGNMENT = 16
# Temporary package files older than this are left over from a build that was killed.
STALE_TEMPORARY_S = 6 * 3600

# Builds a package at ``path`` for ``module`` called with (args, kwargs), batch dims from
# MIN_BATCH to max_batch, storing the signature text in it.
Builder = Callable[[Any, tuple[Any, ...], dict[str, Any], int, Path, str], None]
# Loads the package at ``path`` and binds it to ``module``'s weights; returns the callable and
# the signature stored in it.
Loader = Callable[[Path, Any], tuple[Callable[..., Any], str | None]]


@dataclass(frozen=True)
class _Leaf:
    """What one input of the example was.

    A tensor's dtype, device, layout and non-batch sizes (``batch`` marks a tensor whose first
    dimension is the batch), or any other value itself.
    """

    tensor: bool
    value: Any = None
    dtype: Any = None
    device: Any = None
    rest: tuple[int, ...] = ()
    dims: int = 0
    batch: bool = False
    contiguous: bool = True


def _leaf(value: Any, batch: int) -> _Leaf:
    import torch

    if not isinstance(value, torch.Tensor):
        return _Leaf(tensor=False, value=value)
    batched = value.dim() > 0 and value.shape[0] == batch
    return _Leaf(tensor=True, dtype=value.dtype, device=value.device,
                 rest=tuple(value.shape[1:] if batched else value.shape), dims=value.dim(),
                 batch=batched, contiguous=value.is_contiguous())


def _signature(leaves: list[_Leaf], spec: Any, max_batch: int, static: bool = False) -> str:
    """What a package was exported for, as text stored in it (compared when it is loaded)."""
    import json

    from torch.utils._pytree import treespec_dumps

    return json.dumps({
        "format": FORMAT, "max_batch": max_batch, "spec": treespec_dumps(spec),
        # Only when static: the UNet's batch-dynamic packages keep the signatures they had.
        **({"static": True} if static else {}),
        "leaves": [[str(leaf.dtype), getattr(leaf.device, "type", None), list(leaf.rest),
                    leaf.dims, leaf.batch, leaf.contiguous] if leaf.tensor else repr(leaf.value)
                   for leaf in leaves],
    }, sort_keys=True)


def packages_in(folder: Path) -> list[Path]:
    """The complete packages in ``folder`` (not the temporary files of a build)."""
    return sorted(p for p in folder.glob("*.pt2") if ".tmp." not in p.name)


def remove_stale_temporaries(folder: Path, older_than_s: float = STALE_TEMPORARY_S) -> None:
    """Delete what builds killed long ago left; recent ones may be another replica's build.

    Temporary packages, and the settings files of background builds whose server was killed
    before it could delete them (inference.aot_background).
    """
    now = time.time()
    for path in [*folder.glob("*.tmp.pt2"), *folder.glob("build-*.json")]:
        try:
            if now - path.stat().st_mtime > older_than_s:
                path.unlink()
        except OSError:
            continue


def _flatten(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any]:
    from torch.utils._pytree import tree_flatten

    return tree_flatten((args, kwargs))


def _batch_of(args: tuple[Any, ...]) -> int | None:
    """The batch size of a UNet call: the first dimension of its sample (first argument)."""
    import torch

    sample = args[0] if args else None
    return int(sample.shape[0]) if isinstance(sample, torch.Tensor) and sample.dim() == 4 else None


@dataclass(frozen=True)
class _Pending:
    """A size warm-up found no package for, waiting for a background build to make one."""

    path: Path
    signature: str
    spec: Any
    leaves: list[_Leaf]
    # The file warm-up found at ``path`` (a package for other calls), until the build replaces it.
    stale: tuple[int, int] | None = None


def _stamp(path: Path) -> tuple[int, int] | None:
    """A file's modification time and size (None when absent): tells a new package from the old."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


@dataclass
class _Package:
    """A loaded package and the example it was exported for."""

    run: Callable[..., Any]
    spec: Any
    leaves: list[_Leaf]
    # Lowered when the package's own input check says it was compiled for fewer (see _limit).
    max_batch: int
    # One weight's name and address when the package was bound to the module's tensors: a
    # package reads them by address, so a module whose tensors were replaced since (``.to()``
    # to another dtype makes new ones) must not run it.
    anchor: tuple[str, int] | None = None

    def matches(self, leaves: list[Any], spec: Any, batch: int) -> bool:
        """True when a call with these flattened inputs is one this package computes."""
        import torch

        if spec != self.spec or len(leaves) != len(self.leaves):
            return False
        for got, want in zip(leaves, self.leaves, strict=True):
            if not want.tensor:
                if isinstance(got, torch.Tensor) or got != want.value:
                    return False
                continue
            if not isinstance(got, torch.Tensor) or got.dtype != want.dtype \
                    or got.device != want.device or got.dim() != want.dims \
                    or got.is_contiguous() != want.contiguous:
                return False
            shape = tuple(got.shape)
            if want.batch:
                if shape[0] != batch or shape[1:] != want.rest:
                    return False
            elif shape != want.rest:
                return False
        return True


class AotRouter:
    """Runs a module's calls on its ahead-of-time packages, or eagerly; counts both.

    Installed as the UNet's ``_compiled_call_impl`` (the hook ``nn.Module.compile`` uses), so
    the pipeline keeps its diffusers UNet. Also a compile watch (:class:`AotWatch` joins the
    engine's routers): :meth:`count` is packages built, :meth:`misses` calls run eagerly while
    serving, :meth:`serving` the request stance. Executor thread only.

    The same router serves the VAE decoder under ``--compile-scope full``
    (:func:`decoder_router`): ``name`` prefixes its package files, ``min_batch`` to
    ``max_batch`` is the batch range it routes, ``static`` exports that one batch size without
    a dynamic dimension, ``split`` runs a larger batch as pieces of ``max_batch`` on the
    package of its size (when there is one; else eagerly, whole), and ``count_outside`` says
    whether calls outside the range count as eager misses (a UNet batch of one does; a decoder
    batch waiting for its package does not).
    """

    def __init__(self, module: Any, folder: Path, *, max_batch: int,
                 inductor_configs: dict[str, Any] | None = None,
                 build: Builder | None = None, load: Loader | None = None,
                 background: bool = False, layout: Callable[[], None] | None = None,
                 name: str = "unet", min_batch: int = MIN_BATCH, static: bool = False,
                 split: bool = False, count_outside: bool = True) -> None:
        self.module = module
        self.name = name
        self.min_batch = min_batch
        self.static = static
        self.split = split
        self.count_outside = count_outside
        # Leave missing packages to a background build (pending) instead of building them.
        self.background = background
        # The UNet's layout change the packages are built for, when the engine deferred it to
        # the first adoption (eager runs faster without it): before any load; the routers
        # share it, wrapped in run_once.
        self._layout = layout
        self.folder = folder
        self.max_batch = max_batch
        self.inductor_configs = dict(inductor_configs or {})
        self._build = build or self._export_and_compile
        self._load = load or _load_package
        self._packages: dict[tuple[int, int], _Package] = {}
        self._failed: set[tuple[int, int]] = set()
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._serving = False
        self._built = 0
        self._misses = 0

    # -- the compile-watch interface the executor uses ------------------------------------------

    def count(self) -> int:
        """Packages built (compiled) by this process; loading one from the cache is not a compile."""
        return self._built

    def misses(self) -> int:
        """Calls, while serving, that no package covered and that ran eagerly."""
        return self._misses

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around a request batch: nothing is built or loaded; uncovered calls run eagerly."""
        self._serving = True
        try:
            yield
        finally:
            self._serving = False

    # -- calls ------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """A call: on its size's package when that covers it, else on the eager module."""
        batch = _batch_of(args)
        if self.split and batch is not None and batch > self.max_batch:
            pieces = self._in_pieces(args, kwargs)
            if pieces is not None:
                return pieces
        waiting = False
        routed = batch is not None and self.min_batch <= batch <= self.max_batch
        if routed and not _has_adapters(self.module):
            size = (int(args[0].shape[-2]), int(args[0].shape[-1]))
            package = self._packages.get(size)
            same = _float_timestep(args)
            waiting = size in self._pending
            if package is None and not self._serving and size not in self._failed \
                    and not waiting:
                package = self._prepare(size, same, kwargs, batch)
                waiting = size in self._pending
            if package is not None and not _anchored(self.module, package.anchor):
                self._drop(size, RuntimeError(
                    "the module's weights were replaced since the package was bound to them"))
                package = None
            if package is not None:
                leaves, spec = _flatten(same, kwargs)
                if batch <= package.max_batch and package.matches(leaves, spec, batch):
                    try:
                        return package.run(*same, **kwargs)
                    except Exception as exc:  # noqa: BLE001 - any failure: eager from now on
                        if not self._limit(size, package, exc):
                            self._drop(size, exc)
        # A size waiting for its background build runs eagerly as expected, not as a miss:
        # imagegate_aot_pending_packages shows it instead.
        if self._serving and not waiting and (routed or self.count_outside):
            self._misses += 1
        return self.module._call_impl(*args, **kwargs)

    def _in_pieces(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A batch above the package's size, as pieces of it on the package; None: run it whole.

        Only the first input is split (the decoder's latents), and only when the package of
        its size serves and would take the pieces (the first piece with the call's other
        inputs matches the package's example): each then goes through :meth:`__call__`, with
        every check and fallback a call of the package's own size gets. A package that fails
        part-way leaves the rest of the batch to one eager call. Why: on an H200 the one-image
        package decoded an image in 38 ms, against about 74 ms an image for the eager decoder
        at batches of mostly eight (docs/benchmarks.md §4.15), and one image at a time needs a
        fraction of a batch's activation memory.
        """
        import torch

        first = args[0] if args else None
        if not isinstance(first, torch.Tensor) or _has_adapters(self.module):
            return None
        size = (int(first.shape[-2]), int(first.shape[-1]))
        package = self._packages.get(size)
        if package is None or not _anchored(self.module, package.anchor):
            return None
        pieces = [p if p.data_ptr() % ALIGNMENT == 0 else p.clone()
                  for p in first.split(self.max_batch)]
        leaves, spec = _flatten((pieces[0], *args[1:]), kwargs)
        if not package.matches(leaves, spec, pieces[0].shape[0]):
            return None  # another layout, dtype or input: the eager decoder, whole
        outputs = []
        done = 0
        for piece in pieces:
            if size not in self._packages:  # dropped by a failure part-way
                if self._serving:
                    self._misses += 1
                outputs.append(self.module._call_impl(first[done:], *args[1:], **kwargs))
                break
            outputs.append(self(piece, *args[1:], **kwargs))
            done += piece.shape[0]
        if not all(isinstance(out, torch.Tensor) for out in outputs):
            # Not the module this was written for: its batches run whole from now on.
            logger.warning("the %s returned %s, not a tensor: its batches run eagerly, whole",
                           self.name, type(outputs[0]).__name__)
            self.split = False
            return None
        return torch.cat(outputs)

    # -- background builds --------------------------------------------------------------------

    def pending(self) -> list[tuple[int, int]]:
        """Latent sizes (height, width) that warm-up left to a background build."""
        return sorted(self._pending)

    def failed(self) -> list[tuple[int, int]]:
        """Latent sizes whose package could not be built, loaded or run: they run eagerly."""
        return sorted(self._failed)

    def adopt(self, *, final: bool = True) -> list[tuple[int, int]]:
        """Load the packages a background build made for the pending sizes; the sizes adopted.

        While the build runs (``final`` False) only the sizes whose package has appeared are
        taken, so a second warm-up size does not wait for the first's build; once it has ended,
        every pending size is settled, unless LoRA layers are in the module: then nothing is
        adopted and every size stays pending.

        Executor thread only, between batches: a load is not a compile, but it takes the
        pipeline's thread for as long as it runs (a shared library and one UNet call at the
        largest batch, which loads the package's kernels so that no request pays for it, and
        finds a lower batch limit as warm-up's largest batch does). A size whose package is
        missing, does not load, carries another signature or fails its first call runs
        eagerly for the rest of this process, logged; the next start tries again.
        """
        adopted: list[tuple[int, int]] = []
        if _has_adapters(self.module):
            # A LoRA batch left its layers in (a compiled pipeline unloads them at the next
            # plain batch): the weights' names differ from the package's until then. Not a
            # failure: every size stays pending, for the next call.
            return adopted
        for size, wanted in list(self._pending.items()):
            current = _stamp(wanted.path)
            if not final and current in (None, wanted.stale):
                continue  # not built yet (the build renames a package in when it is complete)
            del self._pending[size]
            started = time.perf_counter()
            # Seconds of each part, for the log: all of it holds the executor thread.
            laid = loaded = started
            try:
                if current is None:
                    raise FileNotFoundError(f"the build made no package at {wanted.path}")
                if self._layout is not None:
                    # Before binding: a package reads the live tensors in the layout it was
                    # built for, and checks names, not strides.
                    self._layout()
                laid = time.perf_counter()
                run, stored = self._load(wanted.path, self.module)
                loaded = time.perf_counter()
                if stored != wanted.signature:
                    raise ValueError("it was exported for other calls")
                package = _Package(run=run, spec=wanted.spec, leaves=wanted.leaves,
                                   max_batch=self.max_batch, anchor=_anchor(self.module))
                try:
                    _first_call(package, package.max_batch)
                except Exception as exc:  # a lower batch limit is learned; the rest fail
                    if not self._limit(size, package, exc):
                        raise
                    _first_call(package, package.max_batch)
            except Exception as exc:  # noqa: BLE001 - any failure: this size stays eager
                from inference.executor import is_oom

                if is_oom(exc):
                    _free_cached_memory()
                if not final:
                    # Perhaps the build's own process held the memory: try once more when it
                    # has ended, not at every poll before.
                    self._pending[size] = dataclasses.replace(wanted, stale=current)
                    logger.warning("the AOT %s package for latent %dx%d could not be adopted "
                                   "yet (%s: %s); trying again when the build ends", self.name,
                                   *size, type(exc).__name__, exc)
                    continue
                logger.error("the AOT %s package for latent %dx%d from the background build "
                             "cannot serve (%s: %s); that size runs eagerly until a restart",
                             self.name, *size, type(exc).__name__, exc)
                self._failed.add(size)
                continue
            self._packages[size] = package
            adopted.append(size)
            done = time.perf_counter()
            logger.info("AOT %s package for latent %dx%d adopted in %.2fs (layout %.2fs, load "
                        "%.2fs, first call at batch %d %.2fs): %s", self.name, *size,
                        done - started, laid - started, loaded - laid, package.max_batch,
                        done - loaded, wanted.path)
        return adopted

    def _limit(self, size: tuple[int, int], package: _Package, exc: Exception) -> bool:
        """Lower the package's batch limit to what its input check says it was compiled for.

        Inductor can compile a dynamic batch for fewer sizes than the range it was given: on a
        CPU its convolutions took batches up to 15 of a requested 16 (docs/benchmarks.md
        §4.11). Warm-up runs the largest batch, so the limit is found, and logged, before ready;
        larger batches then run eagerly, counted. True when ``exc`` was that check.
        """
        import re

        found = re.search(r"dim value is too large at 0, expected to be <= (\d+)", str(exc))
        if found is None or not MIN_BATCH <= int(found[1]) < package.max_batch:
            return False
        package.max_batch = int(found[1])
        logger.warning("the AOT %s package for latent %dx%d was compiled for batches up to %d "
                       "(asked for %d): larger batches run eagerly", self.name, *size,
                       package.max_batch, self.max_batch)
        return True

    def _drop(self, size: tuple[int, int], exc: Exception) -> None:
        """A package failed a call: serve its size eagerly from now on (unless out of memory)."""
        from inference.executor import is_oom

        if is_oom(exc):
            raise exc  # the executor frees memory and retries the batch in halves
        logger.error("the AOT %s package for latent %dx%d failed a call (%s: %s); that size runs "
                     "eagerly from now on", self.name, *size, type(exc).__name__, exc)
        self._packages.pop(size, None)
        self._failed.add(size)

    def _prepare(self, size: tuple[int, int], args: tuple[Any, ...], kwargs: dict[str, Any],
                 batch: int) -> _Package | None:
        """Load this size's package, or build it from this call; None to run this call eagerly."""
        path = self.folder / f"{self.name}-{size[0]}x{size[1]}.pt2"
        flat, spec = _flatten(args, kwargs)
        leaves = [_leaf(v, batch) for v in flat]
        signature = _signature(leaves, spec, self.max_batch, self.static)
        started = time.perf_counter()
        try:
            if path.is_file():
                try:
                    if self._layout is not None:
                        # Deferred for a cold start, but another replica's build put the
                        # package here since: it reads the weights in the layout it was built
                        # for, as at adoption.
                        self._layout()
                    run, stored = self._load(path, self.module)
                    if stored != signature:
                        raise ValueError("it was exported for other calls")
                except Exception as exc:  # noqa: BLE001 - stale, foreign or damaged: rebuild it
                    logger.warning("AOT package %s cannot serve this %s (%s); building it again",
                                   path, self.name, exc)
                else:
                    logger.info("AOT %s package for latent %dx%d loaded from %s in %.2fs",
                                self.name, *size, path, time.perf_counter() - started)
                    return self._keep(size, run, spec, leaves)
            if self.background:
                self._pending[size] = _Pending(path, signature, spec, leaves, _stamp(path))
                logger.info("no AOT %s package for latent %dx%d yet: it runs eagerly until a "
                            "background build makes one", self.name, *size)
                return None
            self._build_at(path, args, kwargs, signature)
            self._built += 1
            run, stored = self._load(path, self.module)
            if stored != signature:
                raise RuntimeError("the package built does not carry its signature")
        except Exception:
            # Serve anyway: this size runs on the eager UNet, which warm-up logs and counts.
            logger.exception("AOT compile of the %s at latent %dx%d failed; that size runs "
                             "eagerly", self.name, *size)
            self._failed.add(size)
            return None
        logger.info("AOT %s package for latent %dx%d built in %.1fs: %s", self.name, *size,
                    time.perf_counter() - started, path)
        return self._keep(size, run, spec, leaves)

    def _keep(self, size: tuple[int, int], run: Callable[..., Any], spec: Any,
              leaves: list[_Leaf]) -> _Package:
        package = _Package(run=run, spec=spec, leaves=leaves, max_batch=self.max_batch,
                           anchor=_anchor(self.module))
        self._packages[size] = package
        return package

    def _build_at(self, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any],
                  signature: str) -> None:
        # Under its final name only when complete: replicas sharing the cache may build at once.
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp.pt2")
        try:
            self._build(self.module, args, kwargs, self.max_batch, tmp, signature)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    def _export_and_compile(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                            max_batch: int, path: Path, signature: str) -> None:
        import torch
        from torch.utils._pytree import tree_map

        shapes: dict[str, Any] | None = None  # static: every size as in the example
        if not self.static:
            dim = torch.export.Dim("batch", min=MIN_BATCH, max=max_batch)
            example = _batch_of(args)

            def dynamic(value: Any) -> Any:
                batched = (isinstance(value, torch.Tensor) and value.dim() > 0
                           and value.shape[0] == example)
                return {0: dim} if batched else None

            names = list(_forward_parameters(module))
            shapes = {**{names[i]: tree_map(dynamic, a) for i, a in enumerate(args)},
                      **{k: tree_map(dynamic, v) for k, v in kwargs.items()}}
        hook = module._compiled_call_impl
        module._compiled_call_impl = None  # export calls the module: not back into this router
        started = time.perf_counter()
        try:
            program = torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False)
        finally:
            module._compiled_call_impl = hook
        exported = time.perf_counter()
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path),
            inductor_configs={
                # Weights stay the live UNet's; small ones too, which inductor would inline.
                "aot_inductor.package_constants_in_so": False,
                "always_keep_tensor_constants": True,
                "aot_inductor.metadata": {"imagegate_signature": signature},
                **self.inductor_configs})
        # Which part a faster build would have to shorten (the full-size UNet's took 213 s).
        logger.info("the %s exported in %.1fs, compiled by AOTInductor in %.1fs", self.name,
                    exported - started, time.perf_counter() - exported)


def _float_timestep(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The call's arguments with a 0-d timestep as float32 on the sample's device, aligned.

    Samplers differ: Euler's timesteps are float, DPM-Solver's and DDIM's int64. The UNet turns
    either into float32 before using it (its timestep embedding), exactly for the integer values
    schedulers use, so one package serves them all instead of only the warm-up's sampler.

    The pipeline's timestep is the loop's element of the sampler's timesteps, a view at offset
    4·i bytes. AOTInductor compiles for 16-byte aligned inputs and, given another, copies it and
    logs a warning per call: on an H200 that was three lines in four of a request's 20 steps
    (docs/benchmarks.md §4.12). A copy here is the same one-scalar copy, without the warning.
    """
    import torch

    if len(args) < 2 or not isinstance(args[1], torch.Tensor) or args[1].dim() != 0:
        return args
    timestep = args[1].to(device=args[0].device, dtype=torch.float32)
    if timestep.data_ptr() % ALIGNMENT:
        timestep = timestep.clone()
    return (args[0], timestep, *args[2:])


class AotWatch:
    """The engine's compile watch over its AOT routers (the UNet's, and the decoder's).

    Sums their counts, holds the serving stance on all of them, and lists and adopts their
    pending packages (labelled ``name HxW``) for the background build.
    """

    def __init__(self, routers: list[AotRouter]) -> None:
        self.routers = routers
        self.folder = routers[0].folder

    def count(self) -> int:
        """Packages built by this process, all routers."""
        return sum(r.count() for r in self.routers)

    def misses(self) -> int:
        """Calls, while serving, that no package covered, all routers."""
        return sum(r.misses() for r in self.routers)

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Every router's serving stance at once."""
        from contextlib import ExitStack

        with ExitStack() as stack:
            for router in self.routers:
                stack.enter_context(router.serving())
            yield

    def pending(self) -> list[str]:
        """The packages warm-up left to a background build, as ``name HxW``."""
        return [f"{r.name} {h}x{w}" for r in self.routers for h, w in r.pending()]

    def failed(self) -> list[str]:
        """The packages that could not be built, loaded or run, as ``name HxW``."""
        return [f"{r.name} {h}x{w}" for r in self.routers for h, w in r.failed()]

    def adopt(self, *, final: bool = True) -> list[str]:
        """Adopt what the build made, router by router (see :meth:`AotRouter.adopt`)."""
        return [f"{r.name} {h}x{w}" for r in self.routers for h, w in r.adopt(final=final)]


def decoder_router(decoder: Any, folder: Path, **kwargs: Any) -> AotRouter:
    """The VAE decoder's router: one static package per size for a batch of one.

    One image's decode is what a lone request waits for after its last step (50-100 ms eager
    on an H200, docs/benchmarks.md §4.12). A batch of several is decoded one image at a time
    on that package once it serves (38 ms an image, against about 74 ms eager in batches,
    §4.15), and eagerly, whole, until then; one static graph rather than a batch-dynamic one,
    which at 1024² needs 64-bit indexing at batch 8 (§4.7). So on a warm start warm-up's
    largest batch decodes on the package too: a whole eager decode at that batch (after a
    package is dropped) is first met on a request, where the executor's out-of-memory halving
    covers it.
    """
    return AotRouter(decoder, folder, max_batch=1, min_batch=1, static=True, name="decoder",
                     split=True, count_outside=False, **kwargs)


def run_once(action: Callable[[], None]) -> Callable[[], None]:
    """``action`` that does its work at the first call only (a layout change routers share)."""
    done = [False]

    def once() -> None:
        # Marked done only once it has returned: one that failed part-way (out of memory while
        # the child holds memory) runs again before the next package binds (both steps are
        # safe to repeat).
        if not done[0]:
            action()
            done[0] = True
    return once


def _first_call(package: _Package, batch: int) -> None:
    """Run ``package`` once on zeros at ``batch``, so its kernels load now.

    Its kernels are loaded at their first use; a package adopted while serving would otherwise
    charge that to the first request it serves. Zeros are a valid UNet input (a noise-free
    latent at timestep 0). Skipped for an example with a non-contiguous tensor, which zeros
    would not reproduce.
    """
    import torch
    from torch.utils._pytree import tree_unflatten

    if any(leaf.tensor and not leaf.contiguous for leaf in package.leaves):
        return
    values = [torch.zeros((batch, *leaf.rest) if leaf.batch else leaf.rest,
                          dtype=leaf.dtype, device=leaf.device) if leaf.tensor else leaf.value
              for leaf in package.leaves]
    args, kwargs = tree_unflatten(values, package.spec)
    with torch.inference_mode():
        package.run(*args, **kwargs)


def _anchor(module: Any) -> tuple[str, int] | None:
    """The name and address of ``module``'s first weight (None for a module without one)."""
    for name, parameter in module.named_parameters():
        return name, parameter.data_ptr()
    return None


def _anchored(module: Any, anchor: tuple[str, int] | None) -> bool:
    """True while ``module``'s weight named in ``anchor`` is still at the address recorded."""
    if anchor is None:
        return True
    try:
        return module.get_parameter(anchor[0]).data_ptr() == anchor[1]
    except AttributeError:
        return False


def _free_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _forward_parameters(module: Any) -> Iterator[str]:
    import inspect

    return iter(inspect.signature(module.forward).parameters)


def _has_adapters(module: Any) -> bool:
    """True while LoRA layers are in the UNet: the package was built without them."""
    return bool(getattr(module, "_hf_peft_config_loaded", False))


def _load_package(path: Path, module: Any) -> tuple[Callable[..., Any], str | None]:
    """Load an AOTInductor package, point it at ``module``'s own tensors; it and its signature."""
    # The package's own input checks (sizes within the compiled range, dtypes, strides), read
    # by its code at its first call: a backstop behind AotRouter's checks, microseconds a call.
    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    model = _open_package(path)
    state = module.state_dict(keep_vars=True)
    model.load_constants({name: state[name].data for name in model.get_constant_fqns()},
                         check_full_update=True, user_managed=True)
    return model, model.get_metadata().get("imagegate_signature")


def _open_package(path: Path) -> Any:
    """The package at ``path``, opened by AOTInductor's own loader.

    ``torch._inductor.aoti_load_package`` first compares the host with the one that built the
    package, only to log a warning on a mismatch, and that comparison finds the CPU's vector
    ISA by compiling and loading probe libraries, each in a new Python process: 10 s in a
    fresh process on a 2-core CPU host, against 4 ms for the load itself. On an H200 (torch
    2.11) the UNet package's load took 32 s of a 58 s warm start, the decoder's after it 0.01 s
    (docs/benchmarks.md §4.14): by all signs the probe's, paid once per process. The cache's
    key already names the GPU, torch and CUDA, so the comparison tells this server nothing:
    the loader is called directly, as ``aoti_load_package`` itself does for older packages.
    A torch without that loader gets ``aoti_load_package``.
    """
    import torch

    try:
        from torch.export.pt2_archive._package import AOTICompiledModel

        loader = torch._C._aoti.AOTIModelPackageLoader
    except (ImportError, AttributeError):
        return torch._inductor.aoti_load_package(str(path))
    try:
        # The model's name in the package, run_single_threaded, num_runners and device_index,
        # at aoti_load_package's defaults.
        opened = loader(str(path), "model", False, 1, -1)
    except TypeError:  # a torch whose loader takes other arguments
        return torch._inductor.aoti_load_package(str(path))
    return AOTICompiledModel(opened)
