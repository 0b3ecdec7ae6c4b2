"""The service's side of stages a pipeline's runner does itself (policy ``pipeline.stages``;
the runner's side is ``modelcd.pipelines.runner_stages``).

A runner asks to ``begin`` a stage: when the policy puts it in the runner, the service opens
the stage's job (``runs_in: runner``) and answers with the work — what to build, which image to
start with which settings, what to smoke-test. The runner streams the job's log here
(``append_log``; each post is a sign of life and tells it when a person stopped the release)
and ``finish``es with its outcome and report. The service checks every report against the
release before it moves on (the image the build pushed is the one deploy started, by digest;
the deployment answers the service for this model and version) and closes the job through the
release engine, so the record is the same as for a stage the service runs itself.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from modelcd.analysis.smoke import SmokeChecks
from modelcd.context import Context
from modelcd.domain import DeploymentState, JobState, JobType
from modelcd.errors import Cancelled, Conflict, InvalidInput, ModelcdError, StageFailed
from modelcd.registry.service import version_to_dict
from modelcd.releases.deployments import spec_values, stop_deployment
from modelcd.releases.engine import STAGE_PHASE, begin_stage, done_before, end_stage, release_lock, stage_name
from modelcd.releases.machine import Phase
from modelcd.releases.policy import RUNNER_STAGES, Place, stage_place
from modelcd.releases.service import Release
from modelcd.targets.process import probe

OUTCOMES = ("succeeded", "failed", "cancelled")
MAX_LINES = 1000  # per log post
MAX_LINE = 8192  # characters kept of one line
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,511}$")


def place(rel: Release, stage: str) -> Place:
    """Where ``stage`` of ``rel`` does its work (the policy's ``pipeline.stages``)."""
    return stage_place(rel.policy, rel.environment_policy, stage)


def begin(ctx: Context, release_id: str, stage: str) -> dict[str, Any]:
    """Open ``stage`` for the runner: ``{"run_in": "service"}`` when the policy keeps it on the
    service (the runner then asks the service to run it), else the job and its work, or what
    happened to the stage already when a CI retry asks again."""
    if stage not in STAGE_PHASE:
        raise InvalidInput(f"unknown stage {stage!r}; one of {', '.join(STAGE_PHASE)}", field="stage")
    rel = _external(ctx, release_id)
    if stage not in RUNNER_STAGES or place(rel, stage) is Place.SERVICE:
        return {"run_in": "service", "stage": stage, "release_id": rel.id}
    wanted = STAGE_PHASE[stage]
    with release_lock(release_id):
        rel = ctx.releases.get(release_id)
        if done_before(rel.phase, wanted):
            return {"run_in": "runner", **result(stage, rel, "succeeded", already=True)}
        if not rel.phase.active or rel.phase is Phase.ROLLING_BACK:
            return {"run_in": "runner", **result(stage, rel, "failed", already=True)}
        if rel.phase is not wanted:
            raise Conflict(f"release {release_id} is {rel.phase}: stage {stage} cannot run before "
                           f"{stage_name(rel.phase)}", field="stage")
        superseded = _open_jobs(ctx, rel.id, stage)
        for job in superseded:  # the runner retried the step: the new attempt counts
            ctx.jobs.logger(job.id)("the runner started this stage again; this attempt is closed")
            ctx.jobs.transition(job.id, JobState.FAILED, error="superseded by the runner's retry")
        if superseded and stage == "deploy":
            _abandon_deployment(ctx, rel, ctx.jobs.logger(superseded[0].id))
        job_id = begin_stage(ctx, rel, wanted, runs_in="runner")
        try:
            work = _work(ctx, rel, stage, job_id)
        except Exception as e:  # nothing to hand over: the stage fails here, as it would on the service
            after = end_stage(ctx, rel.id, wanted, job_id, e)
            ctx.pipeline_runs.reported(release_id)
            ctx.wake.set()
            return {"run_in": "runner", **result(stage, after, "failed")}
    ctx.jobs.logger(job_id)(f"{stage} runs in the pipeline's runner; its log follows")
    ctx.pipeline_runs.reported(release_id)
    return {"run_in": "runner", "stage": stage, "release_id": rel.id, "job_id": job_id, "work": work}


def append_log(ctx: Context, release_id: str, job_id: str, lines: Any) -> dict[str, Any]:
    """Add the runner's lines to the job's log (redacted like every log, before a long line is
    cut, so no part of a secret is kept). The answer says whether the runner should stop: a
    person stopped the release, or the service closed the job (a retry superseded it, or the
    service gave up on the runner); it then stops and reports ``cancelled``."""
    if not isinstance(lines, list) or len(lines) > MAX_LINES or not all(isinstance(x, str) for x in lines):
        raise InvalidInput(f"lines must be a list of at most {MAX_LINES} strings", field="lines")
    rel = _external(ctx, release_id)
    job = _runner_job(ctx, rel, job_id)
    running = job.state is JobState.RUNNING
    if running:
        for line in lines:
            ctx.jobs.log(job.id, ctx.redact(line)[:MAX_LINE])
    ctx.pipeline_runs.reported(release_id)
    return {"job_id": job.id, "state": str(job.state),
            "cancel": rel.cancel_requested or job.cancel_requested or not running}


def finish(ctx: Context, release_id: str, job_id: str, outcome: str, error: str, report: Any) -> dict[str, Any]:
    """Close the runner's stage: check its report against the release and move the release on
    (next stage, or rolling back) exactly as a stage run by the service would."""
    if outcome not in OUTCOMES:
        raise InvalidInput(f"unknown outcome {outcome!r}; one of {', '.join(OUTCOMES)}", field="outcome")
    if not isinstance(report, dict):
        raise InvalidInput("report must be an object", field="report")
    error = " ".join(str(error).split())[:2000]
    rel = _external(ctx, release_id)
    with release_lock(release_id):
        rel = ctx.releases.get(release_id)
        job = _runner_job(ctx, rel, job_id)
        stage = str(job.type)
        if job.state is not JobState.RUNNING:  # closed meanwhile (the service gave up on the runner)
            return result(stage, rel, "failed", already=True)
        phase = STAGE_PHASE[stage]
        if rel.phase is not phase:  # the pipeline reported the stage failed meanwhile: this report is late
            ctx.jobs.logger(job.id)(f"the runner's report came after the release went on to {rel.phase}; "
                                    "nothing of it is recorded")
            ctx.jobs.transition(job.id, JobState.FAILED, error=f"reported after the release went on to {rel.phase}")
            return result(stage, rel, "failed", already=True)
        log = ctx.jobs.logger(job.id)
        try:
            if outcome == "cancelled":
                raise Cancelled(error or f"{stage} stopped in the runner")
            if outcome == "failed":
                raise StageFailed(error or f"{stage} failed in the runner")
            values = CHECKS[stage](ctx, rel, report, log)
        except ModelcdError as e:
            _failed(ctx, rel, stage)
            after = end_stage(ctx, rel.id, phase, job.id, e)
        else:
            after = end_stage(ctx, rel.id, phase, job.id, None, values)
    ctx.pipeline_runs.reported(release_id)
    ctx.wake.set()
    ok = (after.phase.active and after.phase is not Phase.ROLLING_BACK) or after.phase is Phase.SUCCEEDED
    return result(stage, after, "succeeded" if ok else "failed")


def result(stage: str, rel: Release, outcome: str, already: bool = False) -> dict[str, Any]:
    """What a stage command answers (the same shape whoever ran the stage)."""
    return {"stage": stage, "outcome": outcome, "already": already, "release_id": rel.id, "phase": str(rel.phase),
            "model": rel.model, "version": rel.version, "environment": rel.environment, "error": rel.error,
            "deployment_id": rel.deployment_id, "image": rel.image, "image_digest": rel.image_digest}


# -- the work the runner gets ---------------------------------------------------------------


def _work(ctx: Context, rel: Release, stage: str, job_id: str) -> dict[str, Any]:
    spec = rel.policy.pipeline
    assert spec is not None  # an external release's policy has one (validated)
    if stage == "build":
        version = ctx.registry.get_version(rel.model, rel.version)
        if version.status != "ready":
            raise Conflict(f"{rel.model} v{rel.version} is referenced only ({version.external_ref}): its files stay "
                           f"in the {version.source} registry, so there is nothing to build")
        doc = version_to_dict(version)
        doc.pop("artifact_uri", None)
        return {"version": doc, "files": f"/api/v1/releases/{rel.id}/files",
                "image": {"repository": ctx.settings.docker_repository, "base_image": ctx.settings.docker_base_image,
                          "registry": spec.registry, "username_env": spec.registry_username_env,
                          "password_env": spec.registry_password_env}}
    if stage == "deploy":
        if not rel.image or not rel.image_digest:
            raise Conflict(f"release {rel.id} has no image from the runner's build; the build stage must run in "
                           "the runner first", field="stage")
        env = rel.environment_policy
        values = {**spec_values(env, ctx.settings, ""), "image": rel.image, "image_digest": rel.image_digest,
                  "started_by": "runner"}
        dep = ctx.deployments.create(model=rel.model, version=rel.version, environment=rel.environment,
                                     target=str(env.target), release_id=rel.id, spec=values)
        ctx.releases.update(rel.id, deployment_id=dep.id)
        return {"deployment_id": dep.id, "model": rel.model, "version": rel.version, "environment": rel.environment,
                "image": rel.image, "image_digest": rel.image_digest,
                "pull": _by_digest(rel.image, rel.image_digest) if spec.registry else None,
                "workers": values["workers"],
                "health_timeout_s": values["health_timeout_s"], "env": values["env"], "cpu": values["cpu"],
                "memory": values["memory"], "network": values["network"], "instance": target_instance(ctx),
                "username_env": spec.registry_username_env, "password_env": spec.registry_password_env}
    dep = ctx.deployments.get(rel.deployment_id or "")
    version = ctx.registry.get_version(rel.model, rel.version)
    checks = SmokeChecks.from_policy(rel.policy.smoke)
    return {"url": dep.url, "sample": version.sample, "expected": version.expected,
            "checks": {"requests": checks.requests, "p95_ms": checks.p95_ms, "tolerance": checks.tolerance,
                       "timeout_s": checks.timeout_s}}


def _by_digest(image: str, digest: str) -> str:
    """``repository@sha256:…`` of a pushed ``repository:tag`` (what deploy pulls and runs)."""
    repo = image.rsplit("@", 1)[0]
    last = repo.rsplit("/", 1)[-1]
    if ":" in last:
        repo = repo[: repo.rfind(":")]
    return f"{repo}@{digest}"


def target_instance(ctx: Context, target: str = "docker") -> str:
    """This service's instance label on ``target``: containers a runner starts carry it, so this
    service can retire them when it reaches the same engine, and the runner stops them by it."""
    return str(getattr(ctx.target(target), "instance", ""))


# -- checking the runner's reports ------------------------------------------------------------


def _check_build(ctx: Context, rel: Release, report: dict[str, Any], log: Any) -> dict[str, Any]:
    image, digest = str(report.get("image") or ""), str(report.get("image_digest") or "")
    if not _REF.match(image):
        raise StageFailed(f"the runner's build report names no valid image (image {image[:80]!r})", field="image")
    if not _DIGEST.match(digest):
        raise StageFailed(f"the runner's build report names no image digest sha256:<64 hex> (got {digest[:80]!r})",
                          field="image_digest")
    registry = rel.policy.pipeline.registry if rel.policy.pipeline else None
    if registry and not image.startswith(registry.rstrip("/") + "/"):
        raise StageFailed(f"the runner pushed {image}, not into pipeline.registry {registry}", field="image")
    log(f"the runner built {image} ({digest})")
    return {"image": image, "image_digest": digest}


def _check_deploy(ctx: Context, rel: Release, report: dict[str, Any], log: Any) -> dict[str, Any]:
    dep = ctx.deployments.get(rel.deployment_id or "")
    digest = str(report.get("image_digest") or "")
    if digest != rel.image_digest:
        raise StageFailed(f"the runner started image digest {digest[:80] or '(none)'}, not the one its build "
                          f"pushed ({rel.image_digest}); nothing else may serve this release", field="image_digest")
    url = str(report.get("url") or "")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise StageFailed(f"the runner's deploy report has no scoring URL http://host:port (got {url[:120]!r})",
                          field="url")
    health = probe(port, timeout=3.0, host=parts.hostname)
    if health is None or health.get("model") != rel.model or str(health.get("version")) != str(rel.version):
        seen = "no answer" if health is None else "another model or version"  # never echoed: it is not ours
        raise StageFailed(f"the service cannot reach {rel.model} v{rel.version} at {url} (GET /healthz: {seen}); "
                          "the router forwards there, so the runner must start it where the service reaches it "
                          "(docker_url_host, network)", field="url")
    pid = report.get("pid")
    ctx.deployments.update(dep.id, state=DeploymentState.READY, url=url.rstrip("/"), port=port,
                           pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                           spec={**dep.spec, "container": str(report.get("container") or "")[:128]})
    log(f"deployment {dep.id} of {rel.image_digest} ready at {url}; the service reaches it")
    return {"deployment_id": dep.id}


def _check_smoke(ctx: Context, rel: Release, report: dict[str, Any], log: Any) -> dict[str, Any]:
    if report.get("passed") is not True:
        raise StageFailed(str(report.get("summary") or "the runner's smoke report does not say it passed")[:2000])
    log(f"smoke checks passed in the runner: {str(report.get('summary') or '')[:500]}")
    return {}


CHECKS = {"build": _check_build, "deploy": _check_deploy, "smoke": _check_smoke}


def _failed(ctx: Context, rel: Release, stage: str) -> None:
    """A deploy that did not finish leaves its record failed (the rollback stops what runs)."""
    if stage == "deploy" and rel.deployment_id:
        dep = ctx.deployments.get(rel.deployment_id)
        if dep.state is DeploymentState.STARTING:
            ctx.deployments.update(dep.id, state=DeploymentState.FAILED)


def _abandon_deployment(ctx: Context, rel: Release, log: Any) -> None:
    """The deployment of a deploy attempt the runner retried never served: recorded failed, and
    its container stopped where this service reaches the runner's engine."""
    if not rel.deployment_id:
        return
    dep = ctx.deployments.get(rel.deployment_id)
    if dep.release_id != rel.id or dep.state is not DeploymentState.STARTING:
        return
    stop_deployment(ctx.target(dep.target), dep, ctx.home, log)
    ctx.deployments.update(dep.id, state=DeploymentState.FAILED)
    log(f"deployment {dep.id} of this attempt is abandoned")


def _external(ctx: Context, release_id: str) -> Release:
    rel = ctx.releases.get(release_id)
    if not rel.external:
        raise Conflict(f"release {rel.id} is run by the service's local runner (policy {rel.policy_name}); stage "
                       "commands drive releases whose policy has runner: github or azure", field="release_id")
    return rel


def _runner_job(ctx: Context, rel: Release, job_id: str) -> Any:
    job = ctx.jobs.get(job_id)
    if job.release_id != rel.id or job.runs_in != "runner" or str(job.type) not in RUNNER_STAGES:
        raise Conflict(f"job {job_id} is not a stage of release {rel.id} run by its pipeline's runner",
                       field="job_id")
    return job


def _open_jobs(ctx: Context, release_id: str, stage: str) -> list[Any]:
    return [j for j in ctx.jobs.list(release_id=release_id, state=str(JobState.RUNNING))
            if j.runs_in == "runner" and j.type is JobType(stage)]
