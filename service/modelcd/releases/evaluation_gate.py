"""The ``evaluate`` stage of a release (between build and deploy, when the environment has an
evaluation gate): the candidate's figure on the gate's labelled data and, when the gate
compares, the champion's (the version serving the environment now) on the same data. A
stored evaluation of the same data (same identity, same label, the gate's metric) younger
than ``max_age_s`` is used instead of scoring again; otherwise the version is evaluated here
(``jobs.evaluation.evaluate_and_store``) and the result stored with it. A gate not met fails
the stage, so the release rolls back before anything was deployed; the figures are in the
error and in an ``evaluation.gate`` event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from modelcd.domain import JobState, JobType
from modelcd.errors import NotFound, StageFailed
from modelcd.releases.policy import EvaluationGate
from modelcd.releases.stage_run import StageRun


def evaluate(run: StageRun) -> dict[str, Any]:
    rel, ctx = run.release, run.ctx
    gate = run.policy.evaluation_gate(run.env)
    if gate is None:
        run.log("no evaluation gate for this environment")
        return {}
    from modelcd.batch.evaluation import data_identity

    job_id = _stage_job(run)
    spec = {"data": gate.data, "label": gate.label, "metrics": [gate.metric], "format": gate.format,
            "max_errors": gate.max_errors}
    run.log(f"evaluation gate: {gate.thresholds()} on {gate.data} (label {gate.label})")
    identity = data_identity(ctx, gate.data, gate.format)
    run.log(f"data identity {identity or 'none (a SQL source: its URI only)'}")
    candidate = _figure(run, rel.version, gate, spec, identity, job_id)
    champion_version = _champion(run)
    compares = gate.max_drop_vs_champion is not None or gate.max_rise_vs_champion is not None
    champion = None
    if compares and champion_version is not None and champion_version != rel.version:
        champion = _figure(run, champion_version, gate, spec, identity, job_id)
    elif compares:
        run.log("no champion serves the environment yet: the limits against it do not apply")
    failures = judge(gate, candidate["metrics"][gate.metric],
                     None if champion is None else champion["metrics"][gate.metric])
    where = f"(data {gate.data}, {candidate['rows']} rows)"
    figures = f"v{rel.version} {gate.metric} {candidate['metrics'][gate.metric]:.4g}"
    if champion is not None:
        figures += f", champion v{champion_version} {champion['metrics'][gate.metric]:.4g}"
    if failures:
        message = f"evaluation gate failed: {'; '.join(failures)} {where}"
        ctx.jobs.event(job_id, rel.id, "evaluation.gate", f"failed: {figures}; {'; '.join(failures)} {where}")
        raise StageFailed(message, field="gates.evaluation")
    ctx.jobs.event(job_id, rel.id, "evaluation.gate", f"passed: {figures}; {gate.thresholds()} {where}")
    run.log(f"evaluation gate passed: {figures}")
    return {}


def judge(gate: EvaluationGate, value: float, champion: float | None) -> list[str]:
    """What the figures fail of the gate, each with the numbers (empty: it passes)."""
    metric, failures = gate.metric, []
    if gate.min is not None and value < gate.min:
        failures.append(f"{metric} {value:.4g} < min {gate.min:g}")
    if gate.max is not None and value > gate.max:
        failures.append(f"{metric} {value:.4g} > max {gate.max:g}")
    if champion is not None and gate.max_drop_vs_champion is not None \
            and value < champion - gate.max_drop_vs_champion:
        failures.append(f"{metric} {value:.4g} < champion {champion:.4g} - {gate.max_drop_vs_champion:g}")
    if champion is not None and gate.max_rise_vs_champion is not None \
            and value > champion + gate.max_rise_vs_champion:
        failures.append(f"{metric} {value:.4g} > champion {champion:.4g} + {gate.max_rise_vs_champion:g}")
    return failures


def _stage_job(run: StageRun) -> str | None:
    """The id of this stage's job (the release's running ``evaluate`` job)."""
    jobs = run.ctx.jobs.list(release_id=run.release.id, state=str(JobState.RUNNING))
    return next((j.id for j in jobs if j.type is JobType.EVALUATE), None)


def _champion(run: StageRun) -> int | None:
    """The version holding most of the environment's traffic now, if any."""
    rel, ctx = run.release, run.ctx
    best: tuple[int, int] | None = None
    for dep_id, weight in ctx.traffic.current(rel.model, rel.environment).items():
        if weight <= 0:
            continue
        try:
            version = ctx.deployments.get(dep_id).version
        except NotFound:
            continue
        if best is None or weight > best[0]:
            best = (weight, version)
    return None if best is None else best[1]


def _figure(run: StageRun, version: int, gate: EvaluationGate, spec: dict[str, Any], identity: str | None,
            job_id: str | None) -> dict[str, Any]:
    """A fresh stored evaluation of ``version`` on the gate's data, else a new one."""
    from modelcd.jobs.evaluation import evaluate_and_store, evaluation_line

    rel, ctx = run.release, run.ctx
    now = datetime.now(UTC)
    for stored in ctx.registry.evaluations(rel.model, version, limit=50, data_uri=gate.data, label=gate.label):
        age = (now - datetime.fromisoformat(stored["created_at"])).total_seconds()
        if age > gate.max_age_s:
            break
        if stored.get("data_digest") == identity and gate.metric in stored["metrics"]:
            run.log(f"v{version}: using the stored evaluation of {age:.0f} s ago (job {stored['job_id']}): "
                    f"{evaluation_line(stored)}")
            return stored
    run.check_cancel()
    return evaluate_and_store(ctx, rel.model, version, spec, job_id=job_id, log=run.log, cancel=run.cancel,
                              release_id=rel.id)
