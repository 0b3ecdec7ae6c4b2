"""Release plans: what a release of one model version would do, worked out without doing it.

``plan_release`` answers with the policy that matches the version and why (the precedence
rules of ``releases.policy``), the environments it would go to, and for each one the target,
strategy, gates, smoke checks, deployment settings, where each stage runs, the artifact and
whether it is already built, the deployments that would retire after the promotion and what a
rollback would then return to. ``plan_policy_change`` answers, for a policy not yet applied,
which current versions would behave differently.

Read-only: nothing is written to the store or the home, nothing is built, no process is
started. The only I/O beyond the store and the home's folders is one short question to the
local Docker engine (is the image there?) for docker environments, answered "unknown" when
the engine does not answer within ``ENGINE_TIMEOUT_S``. The decisions are the ones a release
makes, from the same functions: ``select_policy`` (the policy), ``stage_place`` (where stages
run), ``retention_choice`` (what retires), the bundle's ``env_key`` and ``image_tag`` (the
artifact); the environment's step itself is shown whole under ``policy`` so settings added to
``Environment`` later appear without changes here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from modelcd.builders.bundle import (
    BUNDLE_MARKER,
    ENV_MARKER,
    env_key,
    model_python,
    normalise_requirements,
    python_identity,
    resolve_python,
    runtime_requirements,
)
from modelcd.builders.image import ImageOptions, image_tag
from modelcd.context import Context
from modelcd.docker_engine import connect, engine_url
from modelcd.domain import Deployment, DeploymentState, Flavor, ModelVersion
from modelcd.errors import ModelcdError, NotFound
from modelcd.registry.names import validate_environment_name, validate_model_name
from modelcd.registry.requirements import python_minor
from modelcd.releases.deployments import SET
from modelcd.releases.policy import (
    DEFAULT_APPROVAL_TIMEOUT_S,
    DEFAULT_POLICY,
    RUNNER_STAGES,
    Environment,
    Place,
    Policy,
    Strategy,
    TargetKind,
    deployments_kept,
    parse_policy,
    precedence,
    select_policy,
    stage_place,
)
from modelcd.releases.retirement import archived_refusal
from modelcd.releases.traffic import retention_choice
from modelcd.targets import TARGETS

ENGINE_TIMEOUT_S = 2.0  # the Docker engine's answer to "is this image there?" is waited for this long
STAGES = (*RUNNER_STAGES, "promote", "rollback")
NEW = "(new)"  # the deployment a release would start, in the plan's simulated split
_RULES = (
    "rule 1, more tag filters",
    "rule 2, a longer literal prefix of the matching model glob",
    "rule 2, an exact model name over a glob of the same prefix",
    "rule 3, the policy name alphabetically",
)


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class PolicyMatch:
    """Which policy a version gets and why."""

    name: str
    revision: str  # content hash of the policy (what a release records)
    stored_revision: int | None  # the store's revision counter; None for the built-in default
    why: str
    rule: str | None  # the precedence rule that put it ahead of the runner-up; None without one
    glob: str | None  # the model glob that matched; None for the default
    considered: tuple[dict[str, Any], ...] = ()  # every stored policy: {name, matches, reason}


@dataclass(frozen=True)
class EnvironmentPlan:
    """What a release of the version to one environment would do."""

    name: str
    position: int  # 1-based place in the policy's environment chain
    target: str
    strategy: dict[str, Any]
    approval: dict[str, Any]
    smoke: dict[str, Any]
    deployment: dict[str, Any]  # workers, resources, network, auth, env variable names (never values)
    stages: dict[str, str]  # stage -> service | runner
    artifact: dict[str, Any]
    endpoint: dict[str, Any]
    retire: dict[str, Any]
    rollback: dict[str, Any]
    policy: dict[str, Any]  # the environment's step as the policy has it, every field (env values hidden)
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what would make this release fail
    evaluation: dict[str, Any] = field(default_factory=dict)  # the evaluation gate between build and deploy


@dataclass(frozen=True)
class ReleasePlan:
    """``plan_release``'s answer; ``to_dict`` is what the API sends."""

    model: str
    version: int
    digest: str
    flavor: str
    source: str
    status: str
    tags: dict[str, str]
    policy: PolicyMatch
    runner: str
    auto: bool
    trigger: str  # auto (what registering does) | manual (a promote to the environment asked for)
    chain: tuple[str, ...]  # the policy's environments, in order
    releases_to: tuple[str, ...]  # where this version would go, in order ([] when nothing starts)
    summary: str
    environments: tuple[EnvironmentPlan, ...]
    retention: dict[str, Any]
    pipeline: dict[str, Any] | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def plan_release(ctx: Context, model: str, version: int, environment: str | None = None) -> ReleasePlan:
    """What releasing ``model`` v``version`` would do: on registration (``environment`` None:
    the policy's whole chain when ``auto``) or by a promote to ``environment``. Read-only.
    NotFound names the field (``name``, ``version``, ``environment``) and the fix."""
    validate_model_name(model, field="name")
    if environment is not None:
        validate_environment_name(environment, field="environment")
    ctx.registry.get_model(model)
    v = ctx.registry.get_version(model, version)
    stored = ctx.policies.all()
    policy = select_policy(stored, model, v.tags, str(v.source))
    match = explain_match(stored, policy, model, v.tags, str(v.source), _stored_revisions(ctx))
    chain = tuple(e.name for e in policy.environments)
    warnings: list[str] = []
    if environment is not None:
        env = policy.environment(environment)
        if env is None:
            raise NotFound(
                f"policy {policy.name} (which {model} v{version} gets) has no environment {environment!r}; its "
                f"environments are {', '.join(chain)}: plan one of them with --env, or add {environment} to the "
                f"policy (a `modelcd promote` there releases blue-green on the process target)", field="environment")
        planned, trigger = [env], "manual"
        releases_to: tuple[str, ...] = (environment,)
        summary = f"a promote of v{version} to {environment} (only there: a promote does not go on down the chain)"
    else:
        planned, trigger = list(policy.environments), "auto" if policy.auto else "manual"
        releases_to = chain if policy.auto else ()
        summary = (f"registering releases to {' then '.join(chain)}, each after the one before succeeds"
                   if policy.auto else f"policy {policy.name} has auto: false: nothing releases on its own; release "
                   f"by hand with `modelcd promote {model} {version} --env ENV`")
    with ctx.db.read() as conn:
        archived = archived_refusal(conn, model)  # as the dispatcher and start_release read it
    if archived is not None:
        releases_to = ()
        summary = f"{archived.message}; below, what a release would do once it is unarchived"
        warnings.append(archived.message)
    if v.status != "ready":
        releases_to = ()
        summary = (f"v{version} is referenced only ({v.external_ref}): its files stay in the {v.source} registry, "
                   "so it is never built or released")
        warnings.append(summary)
    built: dict[str, str] = {}  # artifact identity -> the environment earlier in the chain that builds it
    environments = []
    for env in planned:
        index = policy.environments.index(env)
        plan = _environment_plan(ctx, policy, env, index, v, built if trigger == "auto" else {})
        environments.append(plan)
        warnings += [f"{env.name}: {w}" for w in plan.warnings]
    return ReleasePlan(
        model=model, version=version, digest=v.digest, flavor=str(v.flavor), source=str(v.source), status=v.status,
        tags=dict(v.tags), policy=match, runner=str(policy.runner), auto=policy.auto, trigger=trigger, chain=chain,
        releases_to=releases_to, summary=summary, environments=tuple(environments),
        retention=policy.retention.model_dump(mode="json"),
        pipeline=policy.pipeline.model_dump(mode="json") if policy.pipeline else None, warnings=tuple(warnings))


def _stored_revisions(ctx: Context) -> dict[str, int]:
    return {str(r["name"]): int(r["revision"]) for r in ctx.policies.list()}


# ---------------------------------------------------------------------------------------------
# which policy, and why


def explain_match(policies: Sequence[Policy], chosen: Policy, model: str, tags: Mapping[str, str], source: str,
                  revisions: Mapping[str, int] | None = None) -> PolicyMatch:
    """Why ``chosen`` (what ``select_policy`` answered) applies to the version: the filters it
    matched, and the precedence rule that put it ahead of the next matching policy."""
    revisions = revisions or {}
    considered = tuple({"name": p.name, "matches": p.matches(model, tags, source),
                        "reason": _match_reason(p, model, tags, source)} for p in policies)
    candidates = sorted((p for p in policies if p.matches(model, tags, source)), key=lambda p: precedence(p, model))
    if chosen is DEFAULT_POLICY or not candidates:
        why = (f"default policy: none of the {len(policies)} stored policies matches" if policies
               else "default policy: no policy is stored")
        why += " (production, blue-green, process target)"
        return PolicyMatch(name=chosen.name, revision=chosen.revision, stored_revision=None, why=why, rule=None,
                           glob=None, considered=considered)
    glob = chosen.match.matching_glob(model)
    reason = _match_reason(chosen, model, tags, source)
    rule = None
    if len(candidates) == 1:
        why = f"the only matching policy: {reason}"
    else:
        runner_up = next(p for p in candidates if p is not chosen)
        rule = _deciding_rule(chosen, runner_up, model)
        also = ", ".join(p.name for p in candidates if p is not chosen)
        why = (f"{reason}; {len(candidates)} policies match ({chosen.name}, {also}): ahead of the next, "
               f"{runner_up.name} ({_match_reason(runner_up, model, tags, source)}), by {rule}")
    return PolicyMatch(name=chosen.name, revision=chosen.revision, stored_revision=revisions.get(chosen.name),
                       why=why, rule=rule, glob=glob, considered=considered)


def _match_reason(policy: Policy, model: str, tags: Mapping[str, str], source: str) -> str:
    match = policy.match
    glob = match.matching_glob(model)
    if glob is None:
        return f"models {list(match.models)} do not match {model!r}"
    for key, wanted in match.tags.items():
        if tags.get(key) != wanted:
            have = f"{key}={tags[key]!r}" if key in tags else f"no tag {key}"
            return f"wants tag {key}={wanted!r}, the version has {have}"
    if match.sources is not None and source not in match.sources:
        return f"wants source {', '.join(str(s) for s in match.sources)}, the version came from {source}"
    filters = f"{len(match.tags)} tag filter{'s' if len(match.tags) != 1 else ''}"
    sources = "any source" if match.sources is None else f"source {source}"
    return f"model glob {glob!r}, {filters}, {sources}"


def _deciding_rule(winner: Policy, runner_up: Policy, model: str) -> str:
    a, b = precedence(winner, model), precedence(runner_up, model)
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            if i >= len(_RULES):
                return f"precedence rule {i + 1}"
            detail = {0: f"{-x} vs {-y}", 1: f"{-x} vs {-y} characters",
                      2: repr(winner.match.matching_glob(model)), 3: f"{x} before {y}"}[i]
            return f"{_RULES[i]} ({detail})"
    return "the order of the policies (equal in every rule)"


# ---------------------------------------------------------------------------------------------
# one environment


def _environment_plan(ctx: Context, policy: Policy, env: Environment, index: int, v: ModelVersion,
                      built: dict[str, str]) -> EnvironmentPlan:
    notes: list[str] = []
    warnings: list[str] = []
    if env.target not in TARGETS:
        warnings.append(f"target {env.target} is not available here (known: {', '.join(sorted(TARGETS))}): "
                     "the build stage would fail")
    stages = {s: str(stage_place(policy, env, s)) for s in STAGES}
    artifact = _artifact(ctx, policy, env, v, built) if v.status == "ready" else {
        "kind": "none", "cache_hit": None, "note": "referenced only: nothing to build"}
    if artifact.get("error"):
        warnings.append(f"the build would fail: {artifact['error']}")
    endpoint, live, reuse = _endpoint(ctx, v, env, artifact)
    traffic = endpoint["deployments"]
    keep = deployments_kept(policy, env)
    retire = _retire(live, traffic, endpoint["previous_deployments"], reuse, keep)
    rollback = _rollback(ctx, v, env, endpoint, reuse)
    if env.target == TargetKind.PROCESS and (env.resources.cpu or env.resources.memory):
        notes.append("resources (cpu, memory) are not enforced on the process target; use target: docker for limits")
    return EnvironmentPlan(
        name=env.name, position=index + 1, target=str(env.target), strategy=_strategy(env, traffic, reuse),
        approval=_approval(env), smoke=_smoke(policy, env, v, stages["smoke"]),
        deployment=_deployment(ctx, env), stages=stages, artifact=artifact, endpoint=endpoint, retire=retire,
        rollback=rollback, policy=public_environment(env), notes=tuple(notes), warnings=tuple(warnings),
        evaluation=_evaluation(ctx, policy, env, v))


def public_environment(env: Environment) -> dict[str, Any]:
    """The environment's step, every field, each ``env`` variable shown as set, never its value."""
    doc = env.model_dump(mode="json")
    doc["env"] = {name: SET for name in env.env}
    return doc


def _strategy(env: Environment, traffic: Mapping[str, int], reuse: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": str(env.strategy)}
    served = any(w > 0 for d, w in traffic.items() if d != reuse)  # as stages._canary_steps / _shadow decide
    analysis = env.analysis.model_dump(mode="json") if env.analysis else None
    if env.strategy is Strategy.CANARY:
        steps = list(env.steps or ())
        below = [p for p in steps if p < 100]
        doc.update(steps=steps, step_hold_s=env.step_hold_s, max_error_rate=env.max_error_rate,
                   max_p95_ms=env.max_p95_ms, mirror=env.mirror, effective_steps=steps if served else [100],
                   hold_total_s=(env.step_hold_s or 0) * len(below) if served else 0.0,
                   how=(f"traffic to the new version in steps {steps}%, each below 100 held {env.step_hold_s:g} s "
                        f"while its 5xx share stays within {env.max_error_rate}"
                        + (f" and its p95 within {env.max_p95_ms:g} ms" if env.max_p95_ms else "")
                        + (", its answers compared on copies of live requests" if env.mirror else "")
                        if served else "nothing serves here yet, so all traffic moves at once"))
        if env.mirror:
            doc.update(sample_rate=env.sample_rate, analysis=analysis)
    elif env.strategy is Strategy.SHADOW:
        doc.update(shadow_s=env.shadow_s, sample_rate=env.sample_rate, analysis=analysis, shadowed=served,
                   how=(f"the new version gets copies of {env.sample_rate:.0%} of live requests for at most "
                        f"{env.shadow_s:g} s while the serving one answers; its answers are judged, then all traffic "
                        "moves" if served else "nothing serves here yet (no answers to compare with), so all traffic "
                        "moves at once"))
    elif env.strategy is Strategy.RECREATE:
        doc["how"] = "all traffic moves at once after smoke; only the serving and previous deployments stay"
    else:
        doc["how"] = "the new version starts beside the serving one; all traffic moves at once after smoke"
    return doc


def _evaluation(ctx: Context, policy: Policy, env: Environment, v: ModelVersion) -> dict[str, Any]:
    """The evaluation gate with its thresholds, and the version's latest stored figure on its data."""
    gate = policy.evaluation_gate(env)
    if gate is None:
        return {"required": False}
    stored = ctx.registry.evaluations(v.model, v.version, limit=1, data_uri=gate.data, label=gate.label)
    latest = ({"value": stored[0]["metrics"].get(gate.metric), "rows": stored[0]["rows"],
               "created_at": stored[0]["created_at"], "job_id": stored[0]["job_id"]} if stored else None)
    return {"required": True, **gate.model_dump(mode="json"), "thresholds": gate.thresholds(), "latest": latest,
            "how": f"after the build, {v.model} v{v.version} and the version serving {env.name} are evaluated on "
                   f"{gate.data} (a stored evaluation of the same data younger than {gate.max_age_s:g} s is used); "
                   "a figure outside the limits fails the release before anything is deployed"}


def _approval(env: Environment) -> dict[str, Any]:
    if not env.approval:
        return {"required": False}
    return {"required": True, "timeout_s": env.approval_timeout_s or DEFAULT_APPROVAL_TIMEOUT_S,
            "how": "after smoke the release waits for `modelcd releases approve|reject`; traffic untouched"}


def _smoke(policy: Policy, env: Environment, v: ModelVersion, where: str) -> dict[str, Any]:
    return {**policy.smoke.model_dump(mode="json"), "runs_in": where, "sample": v.sample is not None,
            "expected": v.expected is not None}


def _deployment(ctx: Context, env: Environment) -> dict[str, Any]:
    network = str(env.network) if env.network else (ctx.settings.docker_network if env.target == TargetKind.DOCKER
                                                     else None)
    return {"workers": env.scoring_workers or ctx.settings.scoring_workers,
            "health_timeout_s": ctx.settings.health_timeout_s, "cpu": env.resources.cpu,
            "memory": env.resources.memory, "network": network, "auth": str(env.auth),
            "env_names": sorted(env.env), "secret_names": sorted(k for k, val in env.env.items()
                                                                 if not isinstance(val, str))}


# ---------------------------------------------------------------------------------------------
# the artifact


def _artifact(ctx: Context, policy: Policy, env: Environment, v: ModelVersion, built: dict[str, str]) -> dict[str, Any]:
    where = stage_place(policy, env, "build")
    try:
        if where is Place.RUNNER:
            doc = _runner_image(ctx, policy, v)
        elif env.target == TargetKind.DOCKER:
            doc = _image(ctx, v)
        else:
            doc = _bundle(ctx, v)
    except ModelcdError as e:
        return {"kind": "image" if env.target == TargetKind.DOCKER else "bundle", "built_in": str(where),
                "cache_hit": None, "error": e.message}
    doc["built_in"] = str(where)
    identity = str(doc.get("env_key") or doc.get("image") or "")
    if identity and not doc.get("cache_hit") and identity in built:
        doc["cache_hit"] = True
        doc["note"] = f"built by the release to {built[identity]}, earlier in the chain"
    elif identity:
        built.setdefault(identity, env.name)
    return doc


def _bundle(ctx: Context, v: ModelVersion) -> dict[str, Any]:
    """The process target's bundle: the virtualenv keyed by interpreter + requirements (shared,
    the expensive part) and the version's folder."""
    home = ctx.home.absolute()
    reqs = normalise_requirements(v.requirements)
    runtime = runtime_requirements()
    interpreter = resolve_python(ctx.settings.python)
    note = None
    python: str | None = str(interpreter)
    if v.flavor == Flavor.PYFUNC:  # as bundle.pyfunc_interpreter: the Python the model was saved with
        files = ctx.registry.files_dir(v.digest)
        wanted = model_python(files, v) if files.is_dir() else None
        want = python_minor(wanted) if wanted else None
        if want is not None and want != sys.version_info[:2] and interpreter == Path(sys.executable):
            python, note = None, f"saved with Python {wanted}: the build uses an interpreter of that version"
    if python == sys.executable:  # its identity is known without running it
        key: str | None = env_key(python_identity(interpreter), reqs, runtime)
        env_built: bool | None = _env_complete(home / "envs" / str(key))
    else:  # another interpreter tells who it is only to a build; a built env records its path
        key = _env_with(home, python, [*reqs, *runtime])
        env_built = key is not None
        note = note or (None if key else f"interpreter {interpreter}: the build reads its identity")
    bundle = home / "bundles" / v.model / f"{v.version}-{v.digest12}"
    doc: dict[str, Any] = {
        "kind": "bundle", "env_key": key, "env": str(home / "envs" / key) if key else None, "env_built": env_built,
        "requirements": reqs, "bundle": str(bundle), "bundle_built": (bundle / BUNDLE_MARKER).is_file(),
        "cache_hit": env_built}
    if note:
        doc["note"] = note
    return doc


def _env_complete(env: Path) -> bool:
    return (env / ENV_MARKER).is_file() and (env / "bin" / "python").exists()


def _env_with(home: Path, python: str | None, requirements: list[str]) -> str | None:
    """The key of a complete env built from ``requirements`` (with ``python``, when given)."""
    envs = home / "envs"
    for marker in sorted(envs.glob(f"*/{ENV_MARKER}")) if envs.is_dir() else ():
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("requirements") == requirements and (python is None or meta.get("python") == python) \
                and _env_complete(marker.parent):
            return marker.parent.name
    return None


def _image(ctx: Context, v: ModelVersion) -> dict[str, Any]:
    """The docker target's image, built by the service: its tag, and whether the engine has it."""
    options = ImageOptions.from_settings(ctx.settings)
    tag = image_tag(options, v)
    context = ctx.home.absolute() / "images" / v.model / f"{v.version}-{v.digest12}"
    built, why = image_present(options.docker_host, tag)
    doc: dict[str, Any] = {"kind": "image", "image": tag, "image_built": built, "cache_hit": built,
                           "engine": engine_url(options.docker_host), "context": str(context),
                           "context_built": (context / "scoring.json").is_file(),
                           "push_to": f"{options.registry}/{tag}" if options.registry else None,
                           "base_image": options.base_image}
    if why:
        doc["note"] = why
    return doc


def _runner_image(ctx: Context, policy: Policy, v: ModelVersion) -> dict[str, Any]:
    """An image the pipeline's runner builds with its own engine (``pipeline.stages.build: runner``)."""
    registry = policy.pipeline.registry if policy.pipeline else None
    tag = image_tag(ImageOptions(repository=ctx.settings.docker_repository), v)
    return {"kind": "image", "image": f"{registry}/{tag}" if registry else tag, "image_built": None,
            "cache_hit": None, "push_to": registry, "base_image": ctx.settings.docker_base_image,
            "note": "built by the pipeline's runner with its own engine: whether it has the layers is unknown here"}


def image_present(docker_host: str | None, tag: str, timeout_s: float = ENGINE_TIMEOUT_S) -> tuple[bool | None, str]:
    """Whether the engine at ``docker_host`` has image ``tag``: True, False, or None (unknown)
    with the reason when the engine does not answer within ``timeout_s``."""
    from docker.errors import DockerException, ImageNotFound

    try:
        client = connect(docker_host, ModelcdError, timeout=timeout_s)
    except ModelcdError as e:
        return None, f"unknown: {e.message}"
    try:
        client.images.get(tag)
        return True, ""
    except ImageNotFound:
        return False, ""
    except (DockerException, OSError) as e:
        return None, f"unknown: the engine did not answer ({type(e).__name__})"
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# the endpoint: traffic, what retires, what a rollback returns to


def _endpoint(ctx: Context, v: ModelVersion, env: Environment,
              artifact: Mapping[str, Any]) -> tuple[dict[str, Any], list[Deployment], str | None]:
    try:
        ep = ctx.traffic.get(v.model, env.name)
        traffic, previous, exists = dict(ep.traffic), dict(ep.previous_traffic or {}), True
    except NotFound:
        traffic, previous, exists = {}, {}, False
    live = ctx.deployments.list(model=v.model, environment=env.name, live_only=True)
    versions = {d.id: d.version for d in ctx.deployments.list(model=v.model, environment=env.name)}
    path = artifact.get("bundle") or artifact.get("context")
    reuse = next((d.id for d in live if d.version == v.version and path and d.bundle == path), None)  # stages.deploy
    doc = {"exists": exists, "uri": ctx.router.endpoint_uri(v.model, env.name),
           "traffic": _by_version(traffic, versions), "deployments": traffic,
           "previous_traffic": _by_version(previous, versions), "previous_deployments": previous,
           "serves_this_version": any(versions.get(d) == v.version and w > 0 for d, w in traffic.items()),
           "reuses_deployment": reuse}
    return doc, live, reuse


def _by_version(split: Mapping[str, int], versions: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for dep, weight in split.items():
        key = str(versions.get(dep, "?"))
        out[key] = out.get(key, 0) + int(weight)
    return out


def _retire(live: list[Deployment], traffic: dict[str, int], previous: dict[str, int], reuse: str | None,
            keep: int) -> dict[str, Any]:
    """What ``Traffic.retire`` would stop right after the promotion, by ``retention_choice``
    over the split the promotion leaves: all traffic on the new deployment, and as the previous
    split the one it found (or, when the endpoint already serves only it, the one it had)."""
    new = reuse or NEW
    after = {new: 100}
    found = previous if traffic == after else traffic  # as stages.promote / record_previous
    candidates = [replace(d, state=DeploymentState.SERVING) if d.id == new else d for d in live]
    if reuse is None:
        candidates.append(Deployment(id=NEW, model="", version=0, environment="", target="",
                                     state=DeploymentState.SERVING, url=None, pid=None, port=None, bundle=None,
                                     release_id=None, created_at="9999"))
    retired = retention_choice(candidates, after, found or None, keep)
    gone = {d.id for d in retired}
    return {"keep": keep,
            "deployments": [{"id": d.id, "version": d.version, "state": str(d.state), "created_at": d.created_at}
                            for d in retired],
            "kept": [d.id for d in candidates if d.id not in gone
                     and d.state in (DeploymentState.SERVING, DeploymentState.STANDBY)]}


def _rollback(ctx: Context, v: ModelVersion, env: Environment, endpoint: Mapping[str, Any],
              reuse: str | None) -> dict[str, Any]:
    """What `modelcd rollback` returns to once the release succeeded: the split it found
    (``stages.record_previous``), or the endpoint's own previous one when nothing moved."""
    traffic = endpoint["deployments"]
    already = reuse is not None and traffic == {reuse: 100}
    target = endpoint["previous_deployments"] if already else traffic
    target = {d: w for d, w in target.items() if w > 0}
    on_failure = (f"a failed or stopped release removes its new deployment; {env.name} keeps serving "
                  + (f"v{', v'.join(sorted(endpoint['traffic']))}" if traffic else "nothing"))
    if not target:
        return {"to": {}, "versions": {}, "available": False, "on_failure": on_failure,
                "note": "nothing to return to: no other version served here before (rollback answers 409)"}
    records = {d.id: d for d in ctx.deployments.list(model=v.model, environment=env.name)}
    versions = {d: records[d].version for d in target if d in records}
    warm = all(d in records and records[d].state.live for d in target)
    shown = ", ".join(f"v{versions.get(d, '?')} ({d}, {w}%)" for d, w in target.items())
    return {"to": target, "versions": _by_version(target, versions), "available": True, "warm": warm,
            "on_failure": on_failure,
            "note": (f"back to {shown}" + (": kept warm, instant" if warm else
                                           ": no longer running, so a release of it is queued")
                     + (" (already serves this version: the endpoint's previous split)" if already else ""))}


# ---------------------------------------------------------------------------------------------
# a policy before it is applied


@dataclass(frozen=True)
class VersionChange:
    """How one current version would behave under the new policy compared with now."""

    model: str
    version: int
    why: str  # latest version | serves production, ...
    serving: tuple[str, ...]
    before: dict[str, Any]  # {name, revision}
    after: dict[str, Any]
    changed: bool
    differences: tuple[str, ...]


@dataclass(frozen=True)
class PolicyChangePlan:
    """``plan_policy_change``'s answer: nothing is stored."""

    name: str
    revision: str
    stored_revision: int | None  # None: a new policy
    unchanged_text: bool  # the policy as stored already has this content
    versions: tuple[VersionChange, ...]

    @property
    def changed(self) -> tuple[VersionChange, ...]:
        return tuple(c for c in self.versions if c.changed)

    def to_dict(self) -> dict[str, Any]:
        doc = json.loads(json.dumps(asdict(self), default=str))
        doc["changed"] = sum(1 for c in self.versions if c.changed)
        return doc


BEHAVIOUR_EXCLUDED = ("name", "match")  # which policy applies is shown apart; these change no behaviour


def plan_policy_change(ctx: Context, text: str, source: str = "<policy>") -> PolicyChangePlan:
    """Which current versions (each model's latest, and every version an endpoint serves) would
    get another policy, or their policy with other settings, once ``text`` is applied; the
    policy is validated (InvalidPolicy as ``apply`` would answer) and nothing is stored."""
    new = parse_policy(text, source)
    stored = ctx.policies.all()
    revisions = _stored_revisions(ctx)
    old = next((p for p in stored if p.name == new.name), None)
    after_all = [p for p in stored if p.name != new.name] + [new]
    serving: dict[tuple[str, int], list[str]] = {}
    for ep in ctx.traffic.list():
        for number, weight in ep.versions.items():
            if weight > 0:
                serving.setdefault((ep.model, number), []).append(ep.environment)
    picked: dict[tuple[str, int], str] = {}
    for m in ctx.registry.list_models():
        versions = ctx.registry.list_versions(str(m["name"]))
        if versions:
            picked[(versions[-1].model, versions[-1].version)] = "latest version"
    for key, envs in serving.items():
        picked[key] = ", ".join(filter(None, (picked.get(key), f"serves {', '.join(sorted(envs))}")))
    changes = []
    for (model, number), why in sorted(picked.items()):
        v = ctx.registry.get_version(model, number)
        before = select_policy(stored, model, v.tags, str(v.source))
        after = select_policy(after_all, model, v.tags, str(v.source))
        diffs = policy_differences(before, after)
        if before.name != after.name:
            diffs = [f"policy: {before.name} → {after.name}", *diffs]
        changes.append(VersionChange(
            model=model, version=number, why=why, serving=tuple(sorted(serving.get((model, number), ()))),
            before={"name": before.name, "revision": before.revision},
            after={"name": after.name, "revision": after.revision}, changed=bool(diffs), differences=tuple(diffs)))
    return PolicyChangePlan(name=new.name, revision=new.revision, stored_revision=revisions.get(new.name),
                            unchanged_text=old is not None and old.revision == new.revision,
                            versions=tuple(changes))


def policy_differences(before: Policy, after: Policy) -> list[str]:
    """What a release would do differently under ``after`` than under ``before``: one line per
    setting (``environments.production.strategy: blue-green → canary``); env values never shown."""
    a = {k: v for k, v in before.to_dict().items() if k not in BEHAVIOUR_EXCLUDED}
    b = {k: v for k, v in after.to_dict().items() if k not in BEHAVIOUR_EXCLUDED}
    a["environments"] = {e["name"]: e for e in a["environments"]}
    b["environments"] = {e["name"]: e for e in b["environments"]}
    out: list[str] = []
    order_a, order_b = list(a["environments"]), list(b["environments"])
    if order_a != order_b:
        out.append(f"environments: {' → '.join(order_a)} becomes {' → '.join(order_b)}")
    _diff(a, b, "", out)
    return out


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    parts = path.split(".")
    if path == "environments":
        for name in dict.fromkeys([*a, *b]):
            if name not in b:
                out.append(f"environments.{name}: removed")
            elif name not in a:
                out.append(f"environments.{name}: added ({b[name]['target']} target, {b[name]['strategy']})")
            else:
                _diff(a[name], b[name], f"environments.{name}", out)
    elif len(parts) == 3 and parts[0] == "environments" and parts[2] == "env":  # names only, never values
        for name in dict.fromkeys([*a, *b]):
            if name not in b:
                out.append(f"{path}.{name}: removed")
            elif name not in a:
                out.append(f"{path}.{name}: added")
            elif a[name] != b[name]:
                out.append(f"{path}.{name}: changed (values not shown)")
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            _diff(a.get(key), b.get(key), f"{path}.{key}" if path else str(key), out)
    elif a != b:
        out.append(f"{path}: {_show(a)} → {_show(b)}")


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(x) for x in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


__all__ = ["EnvironmentPlan", "PolicyChangePlan", "PolicyMatch", "ReleasePlan", "VersionChange", "explain_match",
           "image_present", "plan_policy_change", "plan_release", "policy_differences", "public_environment"]
