"""Batch-size buckets for static-shape compiled graphs.

With ``--compile-shapes static`` every compiled graph is specialised to one batch size, so the
server only ever runs the batch sizes warm-up compiled (the buckets, by default 1, 2, 4, 8). A
batch that is not a bucket is padded up to the next one: the padded slots repeat the last real
slot's inputs and their images are thrown away, so real slots keep their own seeds, prompts and
pixels. This is how vLLM serves CUDA graphs, and it keeps compiles off the request path without
shape-generic kernels.

Padding wastes compute, so the scheduler may instead take the largest bucket that the waiting
images fill and leave the rest for the next batch (:meth:`BatchBuckets.choose`); which is cheaper
follows the fitted cost model (:mod:`inference.cost`): a fixed per-call cost favours padding, a
cost proportional to images favours a full smaller bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec


class BatchBuckets(msgspec.Struct, frozen=True):
    """The batch sizes that compiled graphs exist for, ascending."""

    sizes: tuple[int, ...]

    @classmethod
    def of(cls, sizes: Iterable[int], max_batch: int) -> BatchBuckets:
        """Buckets from ``sizes`` (those above ``max_batch`` dropped), always including ``max_batch``.

        The largest bucket is ``max_batch`` so that a full batch never needs padding.
        """
        kept = {s for s in sizes if 1 <= s <= max_batch}
        kept.add(max_batch)
        return cls(tuple(sorted(kept)))

    @classmethod
    def powers_of_two(cls, max_batch: int) -> BatchBuckets:
        """1, 2, 4, … up to ``max_batch`` (which is added when it is not a power of two)."""
        sizes, s = [], 1
        while s < max_batch:
            sizes.append(s)
            s *= 2
        return cls.of(sizes, max_batch)

    @property
    def largest(self) -> int:
        """The biggest batch the graphs serve."""
        return self.sizes[-1]

    def fit(self, images: int) -> int:
        """The smallest bucket that holds ``images`` (at most :attr:`largest`)."""
        for size in self.sizes:
            if size >= images:
                return size
        return self.largest

    def choose(self, waiting: int, seconds: Callable[[int], float] | None = None) -> int:
        """How many of ``waiting`` images the next batch should take.

        Either all of them (padded up to :meth:`fit`), or the largest bucket they fill, leaving
        the rest for the next batch; whichever costs less per real image under ``seconds`` (the
        estimated seconds of one call of a given batch size). Without an estimate, pad: every
        waiting image starts now.
        """
        waiting = min(waiting, self.largest)
        up = self.fit(waiting)
        if up == waiting or seconds is None:
            return waiting
        down = max((s for s in self.sizes if s <= waiting), default=0)
        if down == 0:
            return waiting
        if seconds(down) / down < seconds(up) / waiting:
            return down
        return waiting
