"""Drift and agreement numbers for release analysis (docs: ../shared/reference/integrations.md
§13). Pure and small: numpy on what is given, no I/O.

- ``psi``: the population stability index of two histograms over the same bins.
- ``input_psi``: PSI per feature of live rows against the training statistics
  (``analysis.statistics``).
- ``output_psi``: PSI of a candidate's outputs against the champion's (or any reference).
- ``agreement``: how often two models give the same answer on the same inputs, with a Wilson
  interval.

Reading PSI: < 0.10 little change, 0.10-0.25 moderate, > 0.25 significant (a rule of thumb
that ignores sample size). Under no change PSI is about (1/N + 1/M) times a chi-square with
B-1 degrees of freedom (N reference and M current values, B bins), so with few current values
noise alone crosses 0.1: at M = 200 against N = 10,000 and 10 bins, 5% of the time.
``psi_noise`` gives that level; judge PSI only with M of at least 500-1,000 or against it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from modelcd.analysis.statistics import DatasetStats, as_float, bin_counts, numeric_bins

EPS = 1e-4
FEW_LABELS = 20  # integer outputs with at most this many distinct values are labels


def psi(reference_counts: Sequence[float] | np.ndarray, current_counts: Sequence[float] | np.ndarray,
        eps: float = EPS) -> float:
    """Population stability index Σ (Aᵢ - Eᵢ)·ln(Aᵢ/Eᵢ) of two histograms over the same bins,
    where Eᵢ and Aᵢ are the reference's and the current's shares of bin i, each floored at
    ``eps`` (an empty bin would otherwise make it infinite; the floored shares are not
    renormalised, as in Evidently). Counts or weights, any scale. 0 means the same shape; it is
    symmetric (KL(A‖E) + KL(E‖A)). ValueError when the lengths differ, a count is negative or
    not finite, or a side is empty."""
    e = np.asarray(reference_counts, dtype=np.float64)
    a = np.asarray(current_counts, dtype=np.float64)
    if e.ndim != 1 or e.shape != a.shape:
        raise ValueError(f"the histograms differ in shape: reference {e.shape}, current {a.shape}")
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(a))) or (e < 0).any() or (a < 0).any():
        raise ValueError("counts must be finite and not negative")
    e_total, a_total = float(e.sum()), float(a.sum())
    if e_total <= 0 or a_total <= 0:
        raise ValueError(f"a histogram is empty (reference {e_total:g}, current {a_total:g}): PSI is undefined")
    pe = np.maximum(e / e_total, eps)
    pa = np.maximum(a / a_total, eps)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def psi_noise(n_reference: int, n_current: int, bins: int, quantile: float = 0.99) -> float:
    """The PSI that pure sampling noise stays below with probability ``quantile`` when nothing
    changed: (1/N + 1/M)·χ²(B-1) at that quantile (Wilson-Hilferty's approximation of the
    chi-square quantile; within 1% of the exact one for B ≥ 4). E.g. N = M = 1,000 and 10 bins:
    0.043 at 0.99 (simulated: 0.044). With ~100 current values the law is rougher and this is
    about 10% low (0.203 where simulation gives 0.221 at N = 500, M = 100, 0.95). A PSI below
    it says nothing, whatever the rule of thumb says."""
    if n_reference <= 0 or n_current <= 0 or bins < 2:
        raise ValueError("psi_noise needs at least one value on each side and two bins")
    k = bins - 1
    z = NormalDist().inv_cdf(quantile)
    chi2 = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return (1 / n_reference + 1 / n_current) * max(chi2, 0.0)


def categorical_psi(reference: Mapping[Any, float], current: Mapping[Any, float], eps: float = EPS) -> float:
    """PSI of two {category: count} histograms over the union of their categories (one bin
    each; a category one side lacks counts 0 there, floored at ``eps``)."""
    union = list(dict.fromkeys([*reference, *current]))
    return psi([reference.get(c, 0) for c in union], [current.get(c, 0) for c in union], eps)


class InputPSI(dict[str, float]):
    """PSI per feature ({feature: psi}, in the statistics' order) of ``rows`` live rows.
    ``missing``: features of the statistics the rows lack (no PSI for them: the model may not
    need them, or the rows are the wrong shape); ``extra``: columns of the rows the statistics
    do not know."""

    def __init__(self, values: dict[str, float], rows: int, missing: tuple[str, ...], extra: tuple[str, ...]) -> None:
        super().__init__(values)
        self.rows = rows
        self.missing = missing
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        return {"psi": dict(self), "rows": self.rows, "missing": list(self.missing), "extra": list(self.extra)}


def input_psi(stats: DatasetStats, rows: Any, eps: float = EPS) -> InputPSI:
    """PSI of each feature of live ``rows`` against the training ``stats``: the rows'
    histogram with the stored bins (``statistics.bin_counts``, missing values in a bin of their
    own) against the training data's shares. ``rows``: a DataFrame, a list of records
    ({feature: value}), a list of lists in the statistics' column order, or {feature: [values]}.

    Unreliable with few rows: with M rows and B bins, noise alone reaches about
    ``psi_noise(min(stats.rows, stats.sample_size), M, B)``; below 500-1,000 rows do not gate on it.
    ValueError when there are no rows or lists of the wrong width."""
    frame = _frame(rows, stats.names)
    if len(frame) == 0:
        raise ValueError("no rows: PSI needs live rows to compare with the training data")
    columns = {str(c): c for c in frame.columns}
    values: dict[str, float] = {}
    missing: list[str] = []
    for feature in stats.features:
        if feature.name not in columns:
            missing.append(feature.name)
            continue
        current = bin_counts(feature, frame[columns[feature.name]])
        values[feature.name] = psi(feature.reference_weights(), current, eps)
    known = set(stats.names)
    return InputPSI(values, len(frame), tuple(missing), tuple(c for c in columns if c not in known))


def _frame(rows: Any, names: list[str]) -> pd.DataFrame:
    if isinstance(rows, pd.DataFrame):
        return rows
    if isinstance(rows, Mapping):
        return pd.DataFrame({str(k): list(v) for k, v in rows.items()})
    rows = list(rows)
    if not rows:
        return pd.DataFrame()
    if all(isinstance(r, Mapping) for r in rows):
        return pd.DataFrame.from_records(rows)
    if all(isinstance(r, list | tuple) for r in rows):
        widths = {len(r) for r in rows}
        if widths != {len(names)}:
            raise ValueError(f"rows have {sorted(widths)} values but the statistics have {len(names)} features "
                             f"({', '.join(names[:10])}); send records {{feature: value}} instead")
        return pd.DataFrame(rows, columns=names)
    raise ValueError("rows must be a DataFrame, records {feature: value}, or lists in the features' order")


def output_psi(reference_values: Sequence[Any] | np.ndarray, current_values: Sequence[Any] | np.ndarray,
               bins: int = 10) -> float:
    """PSI of model outputs: the current's against the reference's (e.g. the candidate's and
    the champion's on the same or similar traffic). Numbers are binned at the reference's
    quantiles (``bins`` bins: deciles by default; outer edges ±inf, duplicates collapsed);
    labels (text, booleans, or integers with at most ``FEW_LABELS`` distinct values) get one bin
    per label over the union of both sides. Missing outputs (None, NaN) have a bin of their own.
    ValueError for list-valued outputs (compare them one position at a time) or an empty side.
    As for ``psi``: unreliable below 500-1,000 values a side (``psi_noise``)."""
    ref, cur = _flat(reference_values, "reference"), _flat(current_values, "current")
    if _are_labels(ref, cur):
        return categorical_psi(_label_counts(ref), _label_counts(cur))
    r, c = as_float(ref), as_float(cur)
    r_ok, c_ok = np.isfinite(r), np.isfinite(c)
    quantiles = [i / bins for i in range(1, bins)]
    edges, _, _ = numeric_bins(r[r_ok], quantiles=quantiles, few=0)
    e = np.asarray(edges, dtype=np.float64)
    ref_hist = np.bincount(np.searchsorted(e, r[r_ok], side="right"), minlength=e.size + 1)
    cur_hist = np.bincount(np.searchsorted(e, c[c_ok], side="right"), minlength=e.size + 1)
    return psi([*ref_hist, int((~r_ok).sum())], [*cur_hist, int((~c_ok).sum())])


def _flat(values: Sequence[Any] | np.ndarray, side: str) -> list[Any]:
    items = values.tolist() if isinstance(values, np.ndarray | pd.Series) else list(values)
    if not items:
        raise ValueError(f"no {side} outputs: PSI needs values on both sides")
    if any(isinstance(v, list | tuple | dict | np.ndarray) for v in items):
        raise ValueError(f"{side} outputs hold lists or objects; compare them one position (or key) at a time")
    return items


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _are_labels(ref: list[Any], cur: list[Any]) -> bool:
    present = [v for v in (*ref, *cur) if not _is_missing(v)]
    if any(isinstance(v, str | bool | np.bool_) or not isinstance(v, numbers.Real) for v in present):
        return True
    if all(isinstance(v, numbers.Integral) for v in present):
        return len(set(present)) <= FEW_LABELS
    return False


def _label_counts(values: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        key = "(missing)" if _is_missing(v) else str(v)
        counts[key] = counts.get(key, 0) + 1
    return counts


@dataclass(frozen=True)
class AgreementResult:
    """``agreed`` of ``n`` paired outputs agree: ``rate`` = agreed / n, and the Wilson score
    interval [``wilson_low``, ``wilson_high``] at ``confidence`` for the true rate. Gate on
    ``wilson_low`` rather than ``rate``: when all n pairs agree the 95% interval still starts at
    n/(n + 3.84), 0.93 at n = 50 and 0.996 at n = 1,000."""

    n: int
    agreed: int
    rate: float
    wilson_low: float
    wilson_high: float
    rtol: float
    atol: float
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (``successes`` of ``n``)."""
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one trial")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def agreement(champion: Sequence[Any] | np.ndarray, candidate: Sequence[Any] | np.ndarray, rtol: float = 1e-3,
              atol: float = 1e-6, confidence: float = 0.95) -> AgreementResult:
    """How often ``candidate`` gives ``champion``'s answer on the same inputs (paired by
    position). Two outputs agree when: labels (text, booleans, integers) are equal; numbers
    with a fraction are within ``atol + rtol·|champion|`` (numpy's asymmetric rule, the
    champion as reference; two NaN agree); list-valued outputs (say, class probabilities) have
    the same length and every element agrees; mappings have the same keys and every value
    agrees. ValueError when the lengths differ or there is nothing to compare.

    With n pairs the rate is known to about ±1/sqrt(n): gate on ``wilson_low``."""
    b = champion.tolist() if isinstance(champion, np.ndarray | pd.Series) else list(champion)
    a = candidate.tolist() if isinstance(candidate, np.ndarray | pd.Series) else list(candidate)
    if len(a) != len(b):
        raise ValueError(f"champion has {len(b)} outputs and candidate {len(a)}: pair them on the same inputs")
    if not b:
        raise ValueError("no outputs to compare")
    agreed = _count_agreeing(b, a, rtol, atol)
    low, high = wilson_interval(agreed, len(b), confidence)
    return AgreementResult(n=len(b), agreed=agreed, rate=agreed / len(b), wilson_low=low, wilson_high=high,
                           rtol=rtol, atol=atol, confidence=confidence)


def _count_agreeing(champion: list[Any], candidate: list[Any], rtol: float, atol: float) -> int:
    kinds = {_scalar_kind(champion), _scalar_kind(candidate)}
    if kinds == {"int"}:
        return sum(int(x) == int(y) for x, y in zip(champion, candidate, strict=True))
    if kinds <= {"int", "float"}:  # numbers with a fraction on one side at least: the tolerance decides
        b = np.asarray(champion, dtype=np.float64)
        a = np.asarray(candidate, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            close = np.abs(a - b) <= atol + rtol * np.abs(b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        return int(np.count_nonzero(close | same))
    return sum(_agree(x, y, rtol, atol) for x, y in zip(champion, candidate, strict=True))


def _scalar_kind(values: list[Any]) -> str:
    """"int" when every value is an integer, "float" when every value is a real number and one
    has a fraction type, else "mixed"."""
    if all(isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_) for v in values):
        return "int"
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) for v in values):
        return "float"
    return "mixed"


def _agree(champion: Any, candidate: Any, rtol: float, atol: float) -> bool:
    if isinstance(champion, list | tuple) or isinstance(candidate, list | tuple):
        return (isinstance(champion, list | tuple) and isinstance(candidate, list | tuple)
                and len(champion) == len(candidate)
                and all(_agree(x, y, rtol, atol) for x, y in zip(champion, candidate, strict=True)))
    if isinstance(champion, Mapping) or isinstance(candidate, Mapping):
        return (isinstance(champion, Mapping) and isinstance(candidate, Mapping)
                and champion.keys() == candidate.keys()
                and all(_agree(champion[k], candidate[k], rtol, atol) for k in champion))
    if isinstance(champion, bool | np.bool_) or isinstance(candidate, bool | np.bool_):
        return (isinstance(champion, bool | np.bool_) and isinstance(candidate, bool | np.bool_)
                and bool(champion) == bool(candidate))
    if isinstance(champion, numbers.Integral) and isinstance(candidate, numbers.Integral):
        return int(champion) == int(candidate)
    if isinstance(champion, numbers.Real) and isinstance(candidate, numbers.Real):
        b, a = float(champion), float(candidate)
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or abs(a - b) <= atol + rtol * abs(b)
    return bool(champion == candidate)
