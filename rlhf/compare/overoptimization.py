"""Reward over-optimization curves: Gao, Schulman & Hilton (2023)'s functional forms of the gold reward gain against
the distance d = √KL(π‖π_ref) travelled from the reference policy.

    RL          R(d) = d (α − β log d)      peak at d* = exp(α/β − 1), R(d*) = β d*
    best-of-n   R(d) = d (α − β d)          peak at d* = α / (2β),     R(d*) = α² / (4β)

R is the gain over the reference (R(0) = 0), so both forms are linear in (α, β) and are fitted by least squares with
no intercept. β ≤ 0 means the curve has not turned: no peak within the form.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

Form = Literal["rl", "bon"]


def fit_gao(d: Sequence[float], gain: Sequence[float], form: Form = "rl") -> dict[str, float | None] | None:
    """α, β of `form` fitted to the gains at distances `d` (points at d ≤ 0 are the reference itself and dropped),
    with the peak (`d_peak`, `gain_peak`; None without one) and the fit's RMSE. None with fewer than 2 points."""
    pts = [(float(x), float(y)) for x, y in zip(d, gain) if x > 0 and math.isfinite(x) and math.isfinite(y)]
    if len(pts) < 2:
        return None
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    second = x * np.log(x) if form == "rl" else x * x
    features = np.stack([x, -second], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(features, y, rcond=None)
    alpha, beta = float(alpha), float(beta)
    rmse = float(np.sqrt(np.mean((features @ np.array([alpha, beta]) - y) ** 2)))
    d_peak = gain_peak = None
    if beta > 0:
        if form == "rl":
            d_peak = math.exp(min(alpha / beta - 1.0, 50.0))
            gain_peak = beta * d_peak
        else:
            d_peak = alpha / (2.0 * beta)
            gain_peak = alpha * alpha / (4.0 * beta) if d_peak > 0 else None
            d_peak = d_peak if d_peak > 0 else None
    return {"alpha": alpha, "beta": beta, "d_peak": d_peak, "gain_peak": gain_peak, "rmse": rmse, "points": len(pts)}


def gao_curve(fit: dict, d: Sequence[float], form: Form = "rl") -> list[float]:
    """The fitted R(d) at `d` (0 at d = 0)."""
    out = []
    for x in d:
        if x <= 0:
            out.append(0.0)
        else:
            out.append(x * (fit["alpha"] - fit["beta"] * (math.log(x) if form == "rl" else x)))
    return out

