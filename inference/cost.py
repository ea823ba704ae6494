"""What a request costs, and how long the queue will take: admission by cost, not image count.

A request's work is measured in *units*: one unit is one 1024² image at 25 denoising steps (the
refiner's steps count too). Seconds per batch are modelled as ``overhead + rate × units`` and
fitted on the batches this process actually ran (warm-up first), so the estimate follows the
hardware, the model, and whether compile is on.
"""

from __future__ import annotations

from collections import deque

from inference.request import GenerationRequest

UNIT_PIXELS = 1024 * 1024
UNIT_STEPS = 25


def image_units(request: GenerationRequest) -> float:
    """Units of one image of ``request``."""
    steps = request.steps
    if request.init_image is not None:
        # img2img/inpainting runs only the last `strength` share of the schedule.
        steps = max(1, round(steps * request.init_image.strength))
    if request.refine is not None:
        steps += request.refine.steps
    return request.width * request.height / UNIT_PIXELS * steps / UNIT_STEPS


def image_megapixels(request: GenerationRequest) -> float:
    """Output megapixels of one image of ``request``."""
    return request.width * request.height / 1e6


class CostModel:
    """Non-negative least squares of batch seconds over the last ``window`` pipeline calls.

    ``seconds = per_call + per_megapixel × megapixels + per_unit × units``: a fixed cost per
    call (prompt encoding, launch overhead), a cost per output pixel (VAE decode, conversion)
    and a cost per denoising unit. Warm-up runs every shape at two step counts, so all three are
    identifiable before the first request. Until they are, :attr:`known` is False and admission
    falls back to counting images.
    """

    def __init__(self, window: int = 64) -> None:
        self._points: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._coef: tuple[float, float, float] | None = None

    def observe(self, megapixels: float, units: float, seconds: float) -> None:
        """Record one pipeline call: its output megapixels, its units and its wall time."""
        if units > 0 and seconds > 0:
            self._points.append((megapixels, units, seconds))
            self._coef = None

    @property
    def known(self) -> bool:
        """True once the observations pin down the per-pixel and per-unit costs."""
        mps = {round(p[0], 6) for p in self._points}
        ratios = {round(p[1] / p[0], 6) for p in self._points if p[0] > 0}
        return len(mps) >= 2 and len(ratios) >= 2

    def coefficients(self) -> tuple[float, float, float]:
        """``(seconds per call, per megapixel, per unit)``, each ≥ 0."""
        if self._coef is None:
            if not self._points:
                return 0.0, 0.0, 0.0
            import numpy as np
            from scipy.optimize import nnls

            a = np.array([(1.0, mp, u) for mp, u, _ in self._points])
            b = np.array([t for _, _, t in self._points])
            coef, _ = nnls(a, b)
            self._coef = (float(coef[0]), float(coef[1]), float(coef[2]))
        return self._coef

    def seconds(self, megapixels: float, units: float, calls: int = 1) -> float:
        """Estimated executor seconds for that much work run as ``calls`` pipeline calls."""
        per_call, per_mp, per_unit = self.coefficients()
        return per_call * max(1, calls) + per_mp * megapixels + per_unit * units
