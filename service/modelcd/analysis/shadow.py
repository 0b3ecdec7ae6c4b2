"""Judging a candidate on what it predicts: the pairs of answers the router kept (shadow traffic
or a mirrored canary step) become rows of (input, champion's prediction, candidate's
prediction), and the policy's ``analysis`` gates give a verdict on them.

Pure: no HTTP, no store. ``extract`` reads the router's pairs (``Router.mirror_pairs``);
``judge`` applies the gates — agreement, PSI of the predictions, PSI of the inputs against the
version's training statistics — each a check with the four outcomes of the smoke checks
(passed, failed, error, inconclusive; the worst wins). Fewer rows than ``min_samples`` is
inconclusive: the release keeps collecting until its deadline.

A request carries one or more rows (``{"data": [[...]]}``, ``instances``, ``inputs``,
``dataframe_split``, ``dataframe_records`` or a bare list) and its answer one prediction per row
(``{"predictions": [...]}`` or a bare list). A copy the candidate failed (no answer, 5xx) or
refused (4xx while the champion answered) counts as disagreement on every row of the request:
a candidate that errors where the champion answers does not agree with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelcd.analysis.drift import agreement, input_psi, output_psi
from modelcd.analysis.smoke import CheckResult, Outcome, worst
from modelcd.analysis.statistics import DatasetStats
from modelcd.releases.policy import Analysis

AGREEMENT, PREDICTION_PSI, INPUT_PSI, SAMPLES = "agreement", "prediction_psi", "input_psi", "samples"
_MISSING = object()  # the candidate's prediction for a row it did not answer


@dataclass
class PairedRows:
    """Rows answered by both (or failed by the candidate), gathered from the router's pairs."""

    columns: list[str] | None = None  # feature names when the requests named them
    inputs: list[Any] = field(default_factory=list)  # one input row per compared row (list or mapping)
    champion: list[Any] = field(default_factory=list)
    candidate: list[Any] = field(default_factory=list)  # _MISSING where the candidate failed
    requests: int = 0  # pairs read
    candidate_failures: int = 0  # copies the candidate did not answer with 2xx where the champion did
    skipped: int = 0  # pairs that cannot be compared (champion failed, bodies not JSON, truncated)
    candidate_ms: list[float] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.champion)

    def add(self, pairs: Iterable[Mapping[str, Any]]) -> None:
        """Add the router's pairs (``{request, champion: {status, body}, candidate: {...}}``)."""
        for pair in pairs:
            self.requests += 1
            self._add(pair)

    def _add(self, pair: Mapping[str, Any]) -> None:
        champion, candidate = pair.get("champion") or {}, pair.get("candidate") or {}
        if pair.get("truncated") or champion.get("status") != 200:
            self.skipped += 1
            return
        try:
            columns, rows = request_rows(json.loads(pair.get("request") or "null"))
            expected = predictions_of(json.loads(champion.get("body") or "null"))
        except (ValueError, TypeError):
            self.skipped += 1
            return
        if len(expected) != len(rows):
            self.skipped += 1
            return
        if columns and self.columns is None:
            self.columns = columns
        status = candidate.get("status")
        got: list[Any] | None = None
        if isinstance(status, int) and 200 <= status < 300:
            try:
                got = predictions_of(json.loads(candidate.get("body") or "null"))
            except (ValueError, TypeError):
                got = None
            if candidate.get("ms") is not None:
                self.candidate_ms.append(float(candidate["ms"]))
        if got is None or len(got) != len(rows):
            self.candidate_failures += 1
            got = [_MISSING] * len(rows)
        self.inputs.extend(rows)
        self.champion.extend(expected)
        self.candidate.extend(got)


def request_rows(doc: Any) -> tuple[list[str] | None, list[Any]]:
    """(columns or None, rows) of a scoring request body; ValueError when it holds none."""
    if isinstance(doc, list):
        return None, doc
    if isinstance(doc, Mapping):
        split = doc.get("dataframe_split")
        if isinstance(split, Mapping) and isinstance(split.get("data"), list):
            columns = split.get("columns")
            return ([str(c) for c in columns] if isinstance(columns, list) else None), split["data"]
        for key in ("data", "instances", "inputs", "dataframe_records"):
            rows = doc.get(key)
            if isinstance(rows, list):
                columns = doc.get("columns")
                return ([str(c) for c in columns] if isinstance(columns, list) else None), rows
    raise ValueError("no rows in the request")


def predictions_of(doc: Any) -> list[Any]:
    """The per-row predictions of a scoring answer; ValueError when it holds none."""
    if isinstance(doc, Mapping) and isinstance(doc.get("predictions"), list):
        return list(doc["predictions"])
    if isinstance(doc, list):
        return doc
    raise ValueError("no predictions in the answer")


@dataclass(frozen=True)
class Verdict:
    """The analysis of one step: its outcome, each check, and the figures behind them."""

    outcome: Outcome
    checks: tuple[CheckResult, ...]
    figures: dict[str, Any]

    @property
    def summary(self) -> str:
        """One line with the figures, for the release's error and events."""
        f = self.figures
        parts = [f"{f['rows']} pairs"]
        if f.get("agreement") is not None:
            parts.append(f"agreement {f['agreement']:.2%}")
        if f.get("prediction_psi"):
            parts.append("prediction PSI " + ", ".join(f"{k} {v:.3f}" for k, v in f["prediction_psi"].items()))
        if f.get("input_psi"):
            top = sorted(f["input_psi"].items(), key=lambda kv: -kv[1])[:3]
            parts.append("input PSI " + ", ".join(f"{k} {v:.3f}" for k, v in top))
        if f.get("candidate_failures"):
            parts.append(f"{f['candidate_failures']} of {f['requests']} copies failed by the candidate")
        return "; ".join(parts)

    def failing(self) -> CheckResult | None:
        return next((c for c in self.checks if c.outcome is self.outcome and c.outcome is not Outcome.PASSED), None)

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": str(self.outcome), "summary": self.summary, "figures": self.figures,
                "checks": [c.to_dict() for c in self.checks]}


def judge(rows: PairedRows, analysis: Analysis, stats: DatasetStats | None) -> Verdict:
    """The verdict of ``analysis``'s gates on ``rows`` (see the module docstring)."""
    figures: dict[str, Any] = {"rows": rows.rows, "requests": rows.requests, "skipped": rows.skipped,
                               "candidate_failures": rows.candidate_failures, "agreement": None,
                               "prediction_psi": {}, "input_psi": {}, "min_samples": analysis.min_samples,
                               "candidate_p95_ms": _p95(rows.candidate_ms)}
    if rows.rows < analysis.min_samples:
        check = CheckResult(SAMPLES, Outcome.INCONCLUSIVE,
                            f"{rows.rows} of min_samples {analysis.min_samples} pairs so far")
        return Verdict(Outcome.INCONCLUSIVE, (check,), figures)
    checks: list[CheckResult] = []
    if analysis.min_agreement is not None:
        checks.append(_agreement(rows, analysis, figures))
    if analysis.max_prediction_psi is not None:
        checks.append(_prediction_psi(rows, analysis.max_prediction_psi, figures))
    if analysis.max_input_psi is not None:
        checks.append(_input_psi(rows, analysis.max_input_psi, stats, figures))
    if not checks:
        checks.append(CheckResult(SAMPLES, Outcome.PASSED, f"{rows.rows} pairs; no gate set"))
    return Verdict(worst(c.outcome for c in checks), tuple(checks), figures)


def _agreement(rows: PairedRows, analysis: Analysis, figures: dict[str, Any]) -> CheckResult:
    minimum = analysis.min_agreement or 0.0
    answered = [(a, b) for a, b in zip(rows.champion, rows.candidate, strict=True) if b is not _MISSING]
    result = agreement([a for a, _ in answered], [b for _, b in answered], rtol=analysis.tolerance, atol=0.0)
    agreed = result.agreed  # rows the candidate failed count as disagreeing
    rate = agreed / rows.rows if rows.rows else 0.0
    figures["agreement"] = rate
    evidence = {"pairs": rows.rows, "agreed": agreed, "rate": rate, "min_agreement": minimum,
                "tolerance": analysis.tolerance, "candidate_failures": rows.candidate_failures}
    if rate < minimum:
        return CheckResult(AGREEMENT, Outcome.FAILED, f"agreement {rate:.2%} is below min_agreement {minimum:.2%} "
                           f"({agreed} of {rows.rows} pairs)", evidence)
    return CheckResult(AGREEMENT, Outcome.PASSED, f"agreement {rate:.2%} (min {minimum:.2%})", evidence)


def _outputs(values: Sequence[Any]) -> dict[str, list[Any]]:
    """Predictions by output: one output for scalars, one per position (or key) for lists and mappings."""
    first = next((v for v in values if v is not _MISSING), None)
    if isinstance(first, Mapping):
        keys = list(first)
        return {str(k): [v.get(k) if isinstance(v, Mapping) else None for v in values] for k in keys}
    if isinstance(first, list):
        width = len(first)
        return {f"output_{i}": [v[i] if isinstance(v, list) and len(v) > i else None for v in values]
                for i in range(width)}
    return {"prediction": list(values)}


def _prediction_psi(rows: PairedRows, limit: float, figures: dict[str, Any]) -> CheckResult:
    answered = [(a, b) for a, b in zip(rows.champion, rows.candidate, strict=True) if b is not _MISSING]
    champion = _outputs([a for a, _ in answered])
    candidate = _outputs([b for _, b in answered])
    values = {name: output_psi(champion[name], candidate.get(name, [])) for name in champion}
    figures["prediction_psi"] = values
    worst_name, worst_value = max(values.items(), key=lambda kv: kv[1], default=("prediction", 0.0))
    evidence = {"psi": values, "max_prediction_psi": limit}
    if worst_value > limit:
        return CheckResult(PREDICTION_PSI, Outcome.FAILED, f"prediction PSI of {worst_name} is {worst_value:.3f}, "
                           f"above max_prediction_psi {limit:g}", evidence)
    return CheckResult(PREDICTION_PSI, Outcome.PASSED, f"prediction PSI {worst_value:.3f} (max {limit:g})", evidence)


def _input_psi(rows: PairedRows, limit: float, stats: DatasetStats | None, figures: dict[str, Any]) -> CheckResult:
    if stats is None:
        return CheckResult(INPUT_PSI, Outcome.ERROR, "max_input_psi needs the version's training statistics: "
                           "register it with --training-data FILE (or upload them: POST .../statistics)")
    names = rows.columns or stats.names  # rows without column names are in the training data's order
    records = [dict(zip(names, r, strict=False)) if isinstance(r, list) else r for r in rows.inputs]
    values = input_psi(stats, records)
    figures["input_psi"] = values
    if not values:
        return CheckResult(INPUT_PSI, Outcome.ERROR, "no feature of the training statistics is in the requests")
    worst_name, worst_value = max(values.items(), key=lambda kv: kv[1])
    evidence = {"psi": values, "max_input_psi": limit}
    if worst_value > limit:
        return CheckResult(INPUT_PSI, Outcome.FAILED, f"input PSI of {worst_name} is {worst_value:.3f}, above "
                           f"max_input_psi {limit:g}", evidence)
    return CheckResult(INPUT_PSI, Outcome.PASSED, f"input PSI {worst_value:.3f} (max {limit:g})", evidence)


def _p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
