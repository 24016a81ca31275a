"""A chi-square goodness-of-fit check whose threshold follows from the sample size and a false-alarm rate."""

from __future__ import annotations

import math

import torch


def chi2_quantile(dof: int, alpha: float) -> float:
    """Upper-alpha quantile of chi-square(dof), Wilson-Hilferty approximation (good for dof >= 1)."""
    z = math.sqrt(2) * _erfinv(1 - 2 * alpha)
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


def _erfinv(y: float) -> float:
    return torch.erfinv(torch.tensor(y, dtype=torch.float64)).item()


def assert_matches(counts: torch.Tensor, probs: torch.Tensor, alpha: float = 1e-4, what: str = "") -> float:
    """Fail if `counts` (observed, [V]) are implausible under `probs` ([V], sums to 1) at level alpha; `what`
    (the seed, the case) goes into the failure message. Bins expected to hold fewer than 5 samples are pooled.
    Returns the statistic."""
    n = counts.sum().item()
    exp = probs.double() * n
    big = exp >= 5
    obs = torch.cat([counts.double()[big], counts.double()[~big].sum()[None]])
    ex = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = ex > 0
    stat = (((obs - ex) ** 2)[keep] / ex[keep]).sum().item()
    assert obs[~keep].sum() == 0, f"{what}: samples landed where the model puts no mass"
    dof = int(keep.sum()) - 1
    limit = chi2_quantile(max(dof, 1), alpha)
    assert stat < limit, f"{what}: chi2 {stat:.1f} >= {limit:.1f} (dof {dof}, n {n})"
    return stat
