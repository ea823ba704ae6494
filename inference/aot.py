"""The UNet compiled ahead of time: torch.export + AOTInductor, one package per warm-up size.

Why (issue 9): ``torch.compile`` re-traces the whole UNet with dynamo at every start, whatever
its caches hold (16 s on an H200, docs/benchmarks.md §4.9), then loads its graphs from the
inductor cache; with ``--compile-scope unet`` a warm start took 58 s of issue 9's 60. An
AOTInductor package is the compiled UNet as a shared library: a warm start loads it from the
compile cache without tracing anything, and a call runs it without dynamo's guards or Python
wrapper. What that saves on a GPU is **not measured yet**; on this project's CPU the tiny model's
package loaded in 0.01 s against 5.8 s for its dynamo warm path (docs/benchmarks.md §4.10).

How:

- **One package per latent size**, exported at the first warm-up call of that size with the
  pipeline's own arguments as the example, the batch dimension dynamic (1 up to twice the
  largest batch: classifier-free guidance doubles it) and everything else static, as
  ``--compile-shapes batch`` compiles with dynamo. It is saved under the keyed compile-cache
  folder; a later start loads it instead of building it.
- **Weights are not in the package**: it is built without them and pointed at the live UNet's
  tensors (``user_managed``), so there is one copy in memory, as with ``torch.compile``.
- **The package checks nothing**: AOTInductor runs whatever it is given (another size or dtype
  silently computes garbage). :class:`AotUnet` therefore checks every call against the
  example's structure, dtypes, devices, layouts and non-batch sizes, and runs anything else
  (another size, ControlNet residuals, loaded LoRA adapters, a batch past the range) on the
  eager UNet, counted as an eager call.
- **Never on the request path**: a package is built or loaded only during warm-up; while
  serving (:meth:`AotUnet.serving`) a size without one runs eagerly.
"""

from __future__ import annotations

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

# Builds a package at ``path`` for ``module`` called with (args, kwargs), batch dims 1..max_batch.
Builder = Callable[[Any, tuple[Any, ...], dict[str, Any], int, Path], None]
# Loads the package at ``path`` and binds it to ``module``'s weights; returns the callable.
Loader = Callable[[Path, Any], Callable[..., Any]]


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


def _flatten(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any]:
    from torch.utils._pytree import tree_flatten

    return tree_flatten((args, kwargs))


def _batch_of(args: tuple[Any, ...]) -> int | None:
    """The batch size of a UNet call: the first dimension of its sample (first argument)."""
    import torch

    sample = args[0] if args else None
    return int(sample.shape[0]) if isinstance(sample, torch.Tensor) and sample.dim() == 4 else None


@dataclass
class _Package:
    """A loaded package and the example it was exported for."""

    run: Callable[..., Any]
    spec: Any
    leaves: list[_Leaf]

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


class AotUnet:
    """Runs a UNet's calls on its ahead-of-time packages, or eagerly; counts both.

    Installed as the UNet's ``_compiled_call_impl`` (the hook ``nn.Module.compile`` uses), so
    the pipeline keeps its diffusers UNet. Also the engine's compile watch: :meth:`count` is
    packages built, :meth:`misses` calls run eagerly while serving, :meth:`serving` the request
    stance. Executor thread only.
    """

    def __init__(self, unet: Any, folder: Path, *, max_batch: int,
                 inductor_configs: dict[str, Any] | None = None,
                 build: Builder | None = None, load: Loader | None = None) -> None:
        self.unet = unet
        self.folder = folder
        self.max_batch = max_batch
        self.inductor_configs = dict(inductor_configs or {})
        self._build = build or self._export_and_compile
        self._load = load or _load_package
        self._packages: dict[tuple[int, int], _Package] = {}
        self._failed: set[tuple[int, int]] = set()
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
        """A UNet call: on this size's package when it covers the call, else on the eager UNet."""
        batch = _batch_of(args)
        if batch is not None and 1 <= batch <= self.max_batch and not _has_adapters(self.unet):
            size = (int(args[0].shape[-2]), int(args[0].shape[-1]))
            package = self._packages.get(size)
            same = _float_timestep(args)
            if package is None and not self._serving and size not in self._failed:
                package = self._prepare(size, same, kwargs, batch)
            if package is not None:
                leaves, spec = _flatten(same, kwargs)
                if package.matches(leaves, spec, batch):
                    return package.run(*same, **kwargs)
        if self._serving:
            self._misses += 1
        return self.unet._call_impl(*args, **kwargs)

    def _prepare(self, size: tuple[int, int], args: tuple[Any, ...], kwargs: dict[str, Any],
                 batch: int) -> _Package | None:
        """Load this size's package, or build it from this call; None to run this call eagerly."""
        if batch < 2:
            # Exported at batch 1, the batch dimension would be specialised to 1 (export treats
            # sizes 0 and 1 as constants): wait for a batch of two or more, which CFG gives.
            return None
        path = self.folder / f"unet-{size[0]}x{size[1]}.pt2"
        leaves, spec = _flatten(args, kwargs)
        started = time.perf_counter()
        try:
            if path.is_file():
                try:
                    run = self._load(path, self.unet)
                except Exception as exc:  # noqa: BLE001 - a stale or damaged file: rebuild it
                    logger.warning("AOT package %s could not be loaded (%s); building it again",
                                   path, exc)
                else:
                    logger.info("AOT package for latent %dx%d loaded from %s in %.2fs",
                                *size, path, time.perf_counter() - started)
                    return self._keep(size, run, spec, leaves, batch)
            self._build_at(path, args, kwargs)
            self._built += 1
            run = self._load(path, self.unet)
        except Exception:
            # Serve anyway: this size runs on the eager UNet, which warm-up logs and counts.
            logger.exception("AOT compile of the UNet at latent %dx%d failed; that size runs "
                             "eagerly", *size)
            self._failed.add(size)
            return None
        logger.info("AOT package for latent %dx%d built in %.1fs: %s", *size,
                    time.perf_counter() - started, path)
        return self._keep(size, run, spec, leaves, batch)

    def _keep(self, size: tuple[int, int], run: Callable[..., Any], spec: Any,
              leaves: list[Any], batch: int) -> _Package:
        package = _Package(run=run, spec=spec, leaves=[_leaf(v, batch) for v in leaves])
        self._packages[size] = package
        return package

    def _build_at(self, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Under its final name only when complete: replicas sharing the cache may build at once.
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp.pt2")
        try:
            self._build(self.unet, args, kwargs, self.max_batch, tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    def _export_and_compile(self, unet: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                            max_batch: int, path: Path) -> None:
        import torch
        from torch.utils._pytree import tree_map

        dim = torch.export.Dim("batch", min=1, max=max_batch)
        example = _batch_of(args)

        def dynamic(value: Any) -> Any:
            batched = (isinstance(value, torch.Tensor) and value.dim() > 0
                       and value.shape[0] == example)
            return {0: dim} if batched else None

        names = list(_forward_parameters(unet))
        shapes = {**{names[i]: tree_map(dynamic, a) for i, a in enumerate(args)},
                  **{k: tree_map(dynamic, v) for k, v in kwargs.items()}}
        hook = unet._compiled_call_impl
        unet._compiled_call_impl = None  # export calls the module: not back into this router
        try:
            program = torch.export.export(unet, args, kwargs, dynamic_shapes=shapes, strict=False)
        finally:
            unet._compiled_call_impl = hook
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path),
            inductor_configs={"aot_inductor.package_constants_in_so": False,
                              **self.inductor_configs})


def _float_timestep(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The call's arguments with a 0-d timestep as float32 on the sample's device.

    Samplers differ: Euler's timesteps are float, DPM-Solver's and DDIM's int64. The UNet turns
    either into float32 before using it (its timestep embedding), exactly for the integer values
    schedulers use, so one package serves them all instead of only the warm-up's sampler.
    """
    import torch

    if len(args) < 2 or not isinstance(args[1], torch.Tensor) or args[1].dim() != 0:
        return args
    return (args[0], args[1].to(device=args[0].device, dtype=torch.float32), *args[2:])


def _forward_parameters(unet: Any) -> Iterator[str]:
    import inspect

    return iter(inspect.signature(unet.forward).parameters)


def _has_adapters(unet: Any) -> bool:
    """True while LoRA layers are in the UNet: the package was built without them."""
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def _load_package(path: Path, unet: Any) -> Callable[..., Any]:
    """Load an AOTInductor package and point it at ``unet``'s own parameters and buffers."""
    import torch

    model = torch._inductor.aoti_load_package(str(path))
    state = unet.state_dict(keep_vars=True)
    model.load_constants({name: state[name].data for name in model.get_constant_fqns()},
                         check_full_update=True, user_managed=True)
    return model
