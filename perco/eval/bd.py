"""Bjøntegaard deltas of one rate–metric curve against an anchor's, without extrapolation.

BD-rate is the mean difference of log-rate between the two curves over the metric range
both cover, in percent (negative: the test curve needs fewer bits for the same metric);
it comes from the ``bjontegaard`` package with piecewise cubic Hermite (PCHIP)
interpolation of log-rate as a function of the metric. Where the curves' metric ranges
do not overlap, or a curve has fewer than two points or is not monotone in the metric,
the result says so instead of a number.
"""

from __future__ import annotations

import math
import warnings

__all__ = ["LOWER_IS_BETTER", "INTERPOLATION", "bd_rate"]

# metrics where smaller is better: negated before the integration, which wants
# a metric that grows with the rate
LOWER_IS_BETTER = frozenset({"lpips", "lpips_vgg", "dists", "fid", "kid", "delta_e2000"})
INTERPOLATION = "pchip (bjontegaard package): log-rate over the metric range both curves cover"


def _curve(points: list[tuple[float, float]], sign: float) -> list[tuple[float, float]] | str:
    """(rate, signed metric) sorted by rate, or why it cannot be integrated."""
    points = sorted((r, sign * m) for r, m in points if _finite(r, m))
    if len(points) < 2:
        return f"{len(points)} point(s), two needed"
    metric = [m for _, m in points]
    if any(b <= a for a, b in zip(metric, metric[1:], strict=False)):
        return "the metric does not improve with every rate step"
    return points


def _finite(*values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def bd_rate(
    anchor: list[tuple[float, float]], test: list[tuple[float, float]], metric: str
) -> dict:
    """BD-rate (percent) of ``test`` against ``anchor``, each a list of ``(bpp, metric)``.

    Returns ``{"bd_rate_percent", "overlap": (lo, hi), "overlap_fraction"}`` (the metric
    interval integrated over, and its share of the narrower curve's range), or
    ``{"none": reason}``."""
    import bjontegaard

    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    curves = {"anchor": _curve(anchor, sign), "test": _curve(test, sign)}
    for name, curve in curves.items():
        if isinstance(curve, str):
            return {"none": f"{name} curve: {curve}"}
    a, t = curves["anchor"], curves["test"]
    lo = max(a[0][1], t[0][1])
    hi = min(a[-1][1], t[-1][1])

    def shown(v: float) -> float:
        return round(sign * v, 4)

    if lo >= hi:
        ranges = (f"anchor {shown(a[0][1])}..{shown(a[-1][1])}, "
                  f"test {shown(t[0][1])}..{shown(t[-1][1])}")  # fmt: skip
        return {"none": f"no overlap in {metric} ({ranges}); not extrapolated"}
    narrower = min(a[-1][1] - a[0][1], t[-1][1] - t[0][1])
    with warnings.catch_warnings():  # the overlap is reported, not warned about
        warnings.simplefilter("ignore")
        value = bjontegaard.bd_rate(
            [r for r, _ in a], [m for _, m in a], [r for r, _ in t], [m for _, m in t],
            method="pchip", require_matching_points=False, min_overlap=0,
        )  # fmt: skip
    return {
        "bd_rate_percent": float(value),
        "overlap": tuple(sorted((shown(lo), shown(hi)))),
        "overlap_fraction": round((hi - lo) / narrower, 3),
    }
