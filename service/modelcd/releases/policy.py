"""Release policies: which model versions release on their own, through which runner, to which
environments in which order, with which strategy, smoke checks and retention.

YAML at the edge, validated by pydantic; every problem is reported with its YAML path and line.
Choosing the policy for a version (`select_policy`) is a pure function.

Precedence when several policies match one version (most specific wins):
  1. more tag filters (``match.tags``);
  2. a longer literal prefix of the matching model glob (``iris-prod*`` beats ``iris*`` beats
     ``*``); at equal prefix, a glob without wildcards (an exact name) wins;
  3. the policy name, alphabetically; then the order of the list.
No match falls back to `DEFAULT_POLICY`.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from modelcd.batch.metric_names import LOWER_IS_BETTER
from modelcd.batch.metric_names import METRICS as METRIC_NAMES
from modelcd.domain import Source
from modelcd.errors import InvalidInput

MAX_POLICY_BYTES = 256 * 1024  # a policy is a page of YAML, not a data set
MAX_POLICY_NODES = 10_000  # bounds the walk (and pydantic) against alias bombs
DEFAULT_CANARY_STEPS = (10, 50, 100)  # traffic percent of each canary step
DEFAULT_STEP_HOLD_S = 60.0  # how long each canary step below 100% holds
DEFAULT_MAX_ERROR_RATE = 0.01  # share of the new version's answers that may be 5xx during a step
DEFAULT_APPROVAL_TIMEOUT_S = 86_400.0  # an approval gate left unanswered this long fails the release

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_WILDCARDS = "*?["


class Runner(StrEnum):
    """Who runs the stages of a release."""

    LOCAL = "local"  # this service (serve/worker) runs build → deploy → smoke → promote itself
    GITHUB = "github"  # a rendered GitHub Actions workflow runs them and reports back
    AZURE = "azure"  # a rendered Azure Pipelines pipeline runs them and reports back


class Strategy(StrEnum):
    """How traffic moves from the serving deployment to the new one."""

    RECREATE = "recreate"  # stop the old deployment, then start the new one: brief downtime
    BLUE_GREEN = "blue-green"  # new beside old; all traffic moves at once once smoke passed
    CANARY = "canary"  # new beside old; traffic moves through `steps` percentages
    SHADOW = "shadow"  # new beside old gets copies of live requests; its answers judged, then all traffic moves


class Network(StrEnum):
    """How a docker deployment is reached."""

    BRIDGE = "bridge"  # the container's port is published on the engine host
    HOST = "host"  # the container shares the engine host's network


class Auth(StrEnum):
    """Who may score through an environment's endpoint."""

    KEY = "key"  # clients send `Authorization: Bearer <endpoint key>` (primary or secondary)
    NONE = "none"  # anyone who reaches the router (refused off loopback unless allowed)


class TargetKind(StrEnum):
    """Where deployments run."""

    PROCESS = "process"  # scoring processes on this host (embedded default)
    DOCKER = "docker"  # containers on a Docker engine


# ---------------------------------------------------------------------------------------------
# field types


def _show(value: Any) -> str:
    """A short, YAML-flavoured rendering of a bad input for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _choice(enum: type[StrEnum]) -> BeforeValidator:
    """A validator accepting only the enum's values, with a message listing them."""
    allowed = ", ".join(m.value for m in enum)

    def check(value: Any) -> Any:
        if isinstance(value, enum):
            return value
        if isinstance(value, str) and value in enum._value2member_map_:
            return enum(value)
        raise PydanticCustomError("choice", "must be one of {allowed} (got {got})",
                                  {"allowed": allowed, "got": _show(value)})

    return BeforeValidator(check)


def _optional(validator: BeforeValidator) -> BeforeValidator:
    """``validator``, letting None (the field left unset) through."""
    return BeforeValidator(lambda value: None if value is None else validator.func(value))  # type: ignore[call-arg]


def _check_name(value: Any) -> Any:
    if isinstance(value, str) and not _NAME_RE.match(value):
        raise PydanticCustomError(
            "name", "must be 1-63 lowercase letters, digits or '-', starting and ending with a letter "
            "or digit (got {got})", {"got": _show(value)})
    return value


def _as_list(value: Any) -> Any:
    """Let a single string stand for a one-item list (``models: iris*``)."""
    return [value] if isinstance(value, str) else value


def _scalar_text(value: Any) -> Any:
    """Tag values are strings; read YAML ``true``/``3`` as the text a person typed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _as_tags(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {_scalar_text(k): _scalar_text(v) for k, v in value.items()}
    return value


Name = Annotated[str, BeforeValidator(_check_name)]
Glob = Annotated[str, Field(min_length=1, max_length=200)]
Percent = Annotated[int, Field(ge=1, le=100)]
RunnerName = Annotated[Runner, _choice(Runner)]
StrategyName = Annotated[Strategy, _choice(Strategy)]
TargetName = Annotated[TargetKind, _choice(TargetKind)]
AuthName = Annotated[Auth, _choice(Auth)]
SourceName = Annotated[Source, _choice(Source)]


# ---------------------------------------------------------------------------------------------
# the policy document


class _Edge(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(_Edge):
    """Which versions a policy applies to; every given filter must match."""

    models: Annotated[tuple[Glob, ...], BeforeValidator(_as_list), Field(min_length=1)] = ("*",)
    tags: Annotated[dict[str, str], BeforeValidator(_as_tags)] = Field(default_factory=dict)
    sources: Annotated[tuple[SourceName, ...] | None, BeforeValidator(_as_list)] = None  # None: any

    def matching_glob(self, model: str) -> str | None:
        """The most specific of `models` matching ``model``, or None."""
        hits = [g for g in self.models if fnmatch.fnmatchcase(model, g)]
        return max(hits, key=_glob_specificity, default=None)

    def matches(self, model: str, tags: Mapping[str, str], source: str) -> bool:
        """True when the model name, every tag filter and the source all match."""
        return (
            self.matching_glob(model) is not None
            and all(tags.get(k) == v for k, v in self.tags.items())
            and (self.sources is None or source in self.sources)
        )


_MEMORY_RE = re.compile(r"^([1-9][0-9]{0,12})([kmg]|[KMG]i)?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


_REPO_RE = re.compile(r"^[A-Za-z0-9-]{1,39}/[A-Za-z0-9._-]{1,100}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_HTTP_RE = re.compile(r"^https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9._~/-]*)?$")


def _pattern(regex: re.Pattern[str], what: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        if value is not None and (not isinstance(value, str) or not regex.match(value)):
            raise PydanticCustomError("pattern", "must be {what} (got {got})", {"what": what, "got": _show(value)})
        return value

    return BeforeValidator(check)


def _check_memory(value: Any) -> Any:
    """``512m``, ``1g``, ``512Mi``, ``1Gi`` or a byte count; returned in docker's spelling."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    match = _MEMORY_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise PydanticCustomError("memory", "must be a size like 512m, 2g, 512Mi or 1Gi (got {got})",
                                  {"got": _show(value)})
    number, unit = match.groups()
    return number + (unit or "")[:1].lower()


def _check_env(value: Any) -> Any:
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str) or not _ENV_NAME_RE.match(key) or key.startswith("MODELCD_"):
                raise PydanticCustomError(
                    "env_name", "variable names are letters, digits and '_' not starting with a digit, and not "
                    "MODELCD_* (got {got})", {"got": _show(key)})
        return {k: v if isinstance(v, Mapping | SecretRef) else _scalar_text(v) for k, v in value.items()}
    return value


class SecretRef(_Edge):
    """An environment variable's value kept out of the policy and the store: read when the
    deployment starts (and starts again) from the service's own environment
    (``secret_env``) or from a file under ``$MODELCD_HOME/secrets/`` (``secret_file``)."""

    secret_env: Annotated[str | None, _pattern(_ENV_NAME_RE, "an environment variable name")] = None
    secret_file: Annotated[str | None, _pattern(_FILE_RE, "a file name under $MODELCD_HOME/secrets/")] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.secret_env is None) == (self.secret_file is None):
            raise PydanticCustomError("secret_ref", "give exactly one of secret_env or secret_file", {})
        return self


def _env_kind(value: Any) -> str:
    return "secret" if isinstance(value, Mapping | SecretRef) else "text"


# a variable's value: text, or a reference to a secret (a mapping)
EnvValue = Annotated[Annotated[str, Tag("text")] | Annotated[SecretRef, Tag("secret")], Discriminator(_env_kind)]


class Resources(_Edge):
    """Limits of each deployment (enforced by the docker target; the process target logs them only)."""

    cpu: float | None = Field(default=None, gt=0, le=256, allow_inf_nan=False)  # CPUs, e.g. 0.5
    memory: Annotated[str | None, BeforeValidator(_check_memory)] = None  # e.g. 512m, 1Gi


_DATA_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,1024}$")
_COLUMN_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")
DEFAULT_EVALUATION_MAX_AGE_S = 86_400.0  # a stored evaluation younger than this (same data) is reused


def _check_metric(value: Any) -> Any:
    if not isinstance(value, str) or value not in METRIC_NAMES:
        raise PydanticCustomError("choice", "must be one of {allowed} (got {got})",
                                  {"allowed": ", ".join(METRIC_NAMES), "got": _show(value)})
    return value


class EvaluationGate(_Edge):
    """Before deploying, the version is evaluated on labelled data (``modelcd evaluate``), or a
    stored evaluation of the same data younger than ``max_age_s`` is used; the version serving
    the environment (the champion) is judged on the same data. Higher-is-better metrics take
    ``min`` and ``max_drop_vs_champion``; error metrics (rmse, mae) ``max`` and
    ``max_rise_vs_champion``."""

    data: Annotated[str, _pattern(_DATA_RE, "a local path, s3://bucket/prefix/ or sql://CONNECTION/TABLE")]
    label: Annotated[str, _pattern(_COLUMN_RE, "the name of the column holding the true values")]
    metric: Annotated[str, BeforeValidator(_check_metric)] = "accuracy"
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)
    max_drop_vs_champion: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_rise_vs_champion: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_age_s: float = Field(default=DEFAULT_EVALUATION_MAX_AGE_S, ge=0, le=365 * 86_400, allow_inf_nan=False)
    format: Literal["csv", "parquet", "jsonl"] | None = None
    max_errors: int = Field(default=0, ge=0, le=2**31)  # rows the model may fail to score (left out)

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    @model_validator(mode="after")
    def _thresholds(self) -> EvaluationGate:
        if self.lower_is_better:
            wrong = [k for k in ("min", "max_drop_vs_champion") if getattr(self, k) is not None]
            if wrong:
                raise PydanticCustomError(
                    "evaluation_direction", "{metric} is an error metric (lower is better): use max and "
                    "max_rise_vs_champion instead of {wrong}", {"metric": self.metric, "wrong": " and ".join(wrong)})
        else:
            wrong = [k for k in ("max", "max_rise_vs_champion") if getattr(self, k) is not None]
            if wrong:
                raise PydanticCustomError(
                    "evaluation_direction", "{metric}: higher is better: use min and max_drop_vs_champion instead "
                    "of {wrong}", {"metric": self.metric, "wrong": " and ".join(wrong)})
        if not any(getattr(self, k) is not None for k in ("min", "max", "max_drop_vs_champion",
                                                          "max_rise_vs_champion")):
            names = "max or max_rise_vs_champion" if self.lower_is_better else "min or max_drop_vs_champion"
            raise PydanticCustomError("evaluation_direction", "set {names}: a gate without a limit never fails",
                                      {"names": names})
        return self

    def thresholds(self) -> str:
        """The limits in words: ``accuracy >= 0.9, at most 0.01 below the champion``."""
        parts = []
        if self.min is not None:
            parts.append(f"{self.metric} >= {self.min:g}")
        if self.max is not None:
            parts.append(f"{self.metric} <= {self.max:g}")
        if self.max_drop_vs_champion is not None:
            parts.append(f"at most {self.max_drop_vs_champion:g} below the champion's")
        if self.max_rise_vs_champion is not None:
            parts.append(f"at most {self.max_rise_vs_champion:g} above the champion's")
        return ", ".join(parts)


class Gates(_Edge):
    """Checks a release must pass; ``evaluation`` runs between build and deploy."""

    evaluation: EvaluationGate | None = None


class Environment(_Edge):
    """One step of a release: an environment, where its deployments run and how traffic moves."""

    name: Name
    target: TargetName = TargetKind.PROCESS
    strategy: StrategyName = Strategy.BLUE_GREEN
    steps: tuple[Percent, ...] | None = None  # canary only: traffic percent per step, ending at 100
    step_hold_s: float | None = Field(default=None, gt=0, le=86_400, allow_inf_nan=False)  # canary only
    max_error_rate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)  # canary only
    max_p95_ms: float | None = Field(default=None, gt=0, le=600_000, allow_inf_nan=False)  # canary only; None: off
    approval: bool = False  # a person approves (modelcd releases approve) after smoke, before traffic moves
    approval_timeout_s: float | None = Field(default=None, gt=0, le=30 * 86_400, allow_inf_nan=False)
    scoring_workers: int | None = Field(default=None, ge=1, le=64)  # None: the service's setting
    idle: Idle | None = None  # scale to zero when no request comes for a while (releases.idle); None: never
    resources: Resources = Field(default_factory=Resources)
    env: Annotated[dict[str, EnvValue], BeforeValidator(_check_env)] = Field(default_factory=dict)  # for scoring
    network: Annotated[Network | None, _optional(_choice(Network))] = None  # docker only; None: docker_network
    auth: AuthName = Auth.KEY  # the endpoint's scoring requests need one of its keys
    # judged on what the model predicts (shadow traffic; canary steps with mirror: true)
    shadow_s: float | None = Field(default=None, gt=0, le=7 * 86_400, allow_inf_nan=False)  # shadow only
    sample_rate: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)  # share of live requests copied
    mirror: bool = False  # canary only: each step also compares the candidate's answers on copies
    analysis: Analysis | None = None  # shadow, or canary with mirror: the gates on the pairs of answers
    watch: Watch | None = None  # after the release: live inputs and outputs against limits (releases.watch)
    gates: Gates = Field(default_factory=Gates)  # unset: the policy's own gates

    @model_validator(mode="before")
    @classmethod
    def _default_steps(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("strategy") == Strategy.CANARY:
            defaults = {"steps": list(DEFAULT_CANARY_STEPS), "step_hold_s": DEFAULT_STEP_HOLD_S,
                        "max_error_rate": DEFAULT_MAX_ERROR_RATE}
            return {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}
        if isinstance(data, Mapping) and data.get("strategy") == Strategy.SHADOW:
            defaults: dict[str, Any] = {"shadow_s": DEFAULT_SHADOW_S,
                                        "analysis": {"min_agreement": DEFAULT_MIN_AGREEMENT}}
            return {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}
        return data

    @model_validator(mode="after")
    def _pairs_for_analysis(self) -> Environment:
        if self.mirror and self.strategy != Strategy.CANARY:
            raise PydanticCustomError("mirror_canary", "mirror: true is for strategy canary (strategy is {strategy}; "
                                      "strategy shadow mirrors anyway)", {"strategy": str(self.strategy)})
        if self.shadow_s is not None and self.strategy != Strategy.SHADOW:
            raise PydanticCustomError("shadow_only", "shadow_s is for strategy shadow (strategy is {strategy})",
                                      {"strategy": str(self.strategy)})
        if self.analysis is not None and not (self.strategy == Strategy.SHADOW or self.mirror):
            raise PydanticCustomError("analysis_pairs", "analysis judges pairs of answers: use strategy shadow, or "
                                      "strategy canary with mirror: true", {})
        return self

    @field_validator("approval_timeout_s")
    @classmethod
    def _approval_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("approval") is False:
            raise PydanticCustomError("approval_only", "only used with approval: true", {})
        return value

    @field_validator("step_hold_s", "max_error_rate", "max_p95_ms")
    @classmethod
    def _canary_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        strategy = info.data.get("strategy")
        if value is not None and strategy is not None and strategy != Strategy.CANARY:
            raise PydanticCustomError("canary_only", "only used with strategy canary (strategy is {strategy})",
                                      {"strategy": str(strategy)})
        return value

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: tuple[int, ...] | None, info: ValidationInfo) -> tuple[int, ...] | None:
        if steps is None:
            return None
        strategy = info.data.get("strategy")
        if strategy is not None and strategy != Strategy.CANARY:
            raise PydanticCustomError("steps_unused", "only used with strategy canary (strategy is {strategy})",
                                      {"strategy": str(strategy)})
        if not steps or any(a >= b for a, b in pairwise(steps)) or steps[-1] != 100:
            raise PydanticCustomError("steps_order", "must be increasing percentages ending at 100 (got {got})",
                                      {"got": list(steps)})
        return steps


DEFAULT_SHADOW_S = 300.0  # longest a shadow phase may take
DEFAULT_MIN_AGREEMENT = 0.98  # a shadow with no analysis given judges agreement at this level


class Analysis(_Edge):
    """How a candidate is judged on what it predicts, from pairs of answers to the same live
    requests (shadow traffic, or canary steps with ``mirror: true``). Each gate set is a check;
    verdicts are pass, fail, inconclusive, error and the worst wins."""

    min_samples: int = Field(default=200, ge=1, le=1_000_000)  # pairs before a verdict (inconclusive until)
    min_agreement: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)  # share of agreeing pairs
    tolerance: float = Field(default=1e-6, ge=0, le=1e6, allow_inf_nan=False)  # numbers agree within it (relative)
    max_prediction_psi: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)  # outputs' PSI
    max_input_psi: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)  # inputs vs training


def _check_whole_seconds(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PydanticCustomError("choice", "must be a positive whole number of seconds, e.g. 300 (got {got})",
                                  {"got": _show(value)})
    return value


class OnBreach(StrEnum):
    ALERT = "alert"  # an event, a metric and a signed notification
    ROLLBACK = "rollback"  # the same, and traffic returns to the previous version


class Watch(_Edge):
    """Watching production after a release: live inputs and outputs, sampled by the router off
    the request path, over a sliding window, against the version's training statistics (inputs)
    and the first full window after the release (outputs)."""

    window_s: float = Field(default=300.0, gt=0, le=7 * 86_400, allow_inf_nan=False)  # the sliding window
    sample_rate: float = Field(default=0.1, gt=0, le=1, allow_inf_nan=False)  # share of live requests sampled
    min_samples: int = Field(default=200, ge=1, le=1_000_000)  # rows in the window before it is judged
    check_every_s: float = Field(default=10.0, gt=0, le=86_400, allow_inf_nan=False)
    max_input_psi: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    max_prediction_psi: float | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    on_breach: Annotated[OnBreach, _choice(OnBreach)] = OnBreach.ALERT

    @model_validator(mode="after")
    def _a_gate(self) -> Watch:
        if self.max_input_psi is None and self.max_prediction_psi is None:
            raise PydanticCustomError("watch_gate", "set max_input_psi, max_prediction_psi or both: a watch "
                                      "without a limit never breaches", {})
        return self


class IdleStandby(StrEnum):
    KEEP = "keep"  # the standby a rollback returns to stays warm (instant rollback)
    SLEEP = "sleep"  # it sleeps too once idle; a rollback then waits for its wake


class Idle(_Edge):
    """Scale to zero (``releases.idle``): a deployment with no request for
    ``scale_to_zero_after_s`` seconds is stopped; the router holds the next request while a
    warm start brings it back, up to ``wake_timeout_s``, then answers 503 with Retry-After."""

    scale_to_zero_after_s: Annotated[int, BeforeValidator(_check_whole_seconds)] = Field(ge=1, le=30 * 86_400)
    wake_timeout_s: float = Field(default=10.0, gt=0, le=300, allow_inf_nan=False)
    standby: Annotated[IdleStandby, _choice(IdleStandby)] = IdleStandby.KEEP


def _production() -> tuple[Environment, ...]:
    return (Environment(name="production"),)


class SmokePolicy(_Edge):
    """Smoke checks run against a new deployment's own URI before any traffic moves."""

    requests: int = Field(default=20, ge=0, le=10_000)  # N requests for the latency check; 0 skips it
    p95_ms: float = Field(default=500.0, gt=0, allow_inf_nan=False)  # latency budget at p95
    tolerance: float = Field(default=1e-6, ge=0, allow_inf_nan=False)  # abs or rel, vs expected output
    timeout_s: float = Field(default=10.0, gt=0, le=600, allow_inf_nan=False)  # per request


class Retention(_Edge):
    """What stays after a promotion."""

    keep_deployments: int = Field(default=2, ge=1, le=100)  # per endpoint, including the serving one


class Place(StrEnum):
    """Where a stage of a pipeline-driven release does its work."""

    RUNNER = "runner"  # in the CI runner: its Docker engine, its registry credentials, its network
    SERVICE = "service"  # on the modelcd service's host (the runner asks the service to run it)


PlaceName = Annotated[Place, _choice(Place)]
RUNNER_STAGES = ("build", "deploy", "smoke")  # the stages a runner can do itself
_IMAGE_REPO_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*$")


class StagePlaces(_Edge):
    """Per stage, where it runs (``pipeline.stages``); unset: the environment's target decides
    (``docker``: the runner; ``process``: the service, whose host runs it)."""

    build: Annotated[Place | None, _optional(_choice(Place))] = None
    deploy: Annotated[Place | None, _optional(_choice(Place))] = None
    smoke: Annotated[Place | None, _optional(_choice(Place))] = None
    promote: Annotated[Place | None, _optional(_choice(Place))] = None
    rollback: Annotated[Place | None, _optional(_choice(Place))] = None

    @field_validator("promote", "rollback")
    @classmethod
    def _service_only(cls, value: Place | None, info: ValidationInfo) -> Place | None:
        if value is Place.RUNNER:
            raise PydanticCustomError(
                "service_only", "{stage} moves traffic at the service's router, so it always runs on the service "
                "(the runner's `modelcd {stage}` asks it to); drop it or say service", {"stage": info.field_name})
        return value


class PipelineSpec(_Edge):
    """Where an external runner's pipeline lives and how modelcd starts it. Credentials are
    given by reference only: the name of an environment variable or of a file under
    ``$MODELCD_HOME/secrets/``, never the secret itself."""

    # GitHub Actions (runner: github)
    repo: Annotated[str | None, _pattern(_REPO_RE, "owner/name")] = None
    workflow: Annotated[str | None, _pattern(_FILE_RE, "a workflow file name")] = None  # default: rendered name
    ref: Annotated[str, _pattern(_REF_RE, "a branch or tag")] = "main"
    api_url: Annotated[str, _pattern(_HTTP_RE, "an http(s) URL")] = "https://api.github.com"
    trigger: Literal["workflow_dispatch", "repository_dispatch"] = "workflow_dispatch"
    # Azure Pipelines (runner: azure)
    organization_url: Annotated[str | None, _pattern(_HTTP_RE, "an http(s) URL like https://dev.azure.com/org")] = None
    project: Annotated[str | None, _pattern(_FILE_RE, "a project name")] = None
    pipeline_id: int | None = Field(default=None, ge=1)
    # both
    token_env: Annotated[str | None, _pattern(_ENV_NAME_RE, "an environment variable name")] = None
    token_file: Annotated[str | None, _pattern(_FILE_RE, "a file name under $MODELCD_HOME/secrets/")] = None
    callback_url: Annotated[str | None, _pattern(_HTTP_RE, "an http(s) URL")] = None  # default: the service's url
    start_timeout_s: float = Field(default=300.0, gt=0, le=86_400)  # trigger retries stop after this long
    report_timeout_s: float = Field(default=3600.0, gt=0, le=7 * 86_400)  # silence before the release fails
    poll_interval_s: float = Field(default=30.0, gt=0, le=3600)  # run status, when reports stop coming
    # stages in the runner (issue: stages that run in the CI runner)
    stages: StagePlaces = Field(default_factory=StagePlaces)
    registry: Annotated[str | None, _pattern(_IMAGE_REPO_RE, "a registry address and optional path, like "
                                                            "ghcr.io/acme or 127.0.0.1:5000/models")] = None
    registry_username_env: Annotated[str, _pattern(_ENV_NAME_RE, "an environment variable name")] = \
        "MODELCD_REGISTRY_USERNAME"  # in the runner, from its secrets
    registry_password_env: Annotated[str, _pattern(_ENV_NAME_RE, "an environment variable name")] = \
        "MODELCD_REGISTRY_PASSWORD"


class Policy(_Edge):
    """A release policy, as written in YAML (see the module docstring for precedence)."""

    name: Name
    match: Match = Field(default_factory=Match)
    runner: RunnerName = Runner.LOCAL
    auto: bool = True  # False: versions are recorded; releases start only by hand (promote)
    environments: tuple[Environment, ...] = Field(default_factory=_production, min_length=1)  # in order
    smoke: SmokePolicy = Field(default_factory=SmokePolicy)
    retention: Retention = Field(default_factory=Retention)
    pipeline: PipelineSpec | None = None  # runner github / azure: where the pipeline is and how to start it
    gates: Gates = Field(default_factory=Gates)  # of every environment that sets none

    def evaluation_gate(self, env: Environment) -> EvaluationGate | None:
        """The evaluation gate of ``env``: its own, else the policy's."""
        return env.gates.evaluation or self.gates.evaluation

    @model_validator(mode="after")
    def _evaluation_with_local_runner(self) -> Policy:
        gated = [f"environments[{i}].gates.evaluation" for i, e in enumerate(self.environments)
                 if e.gates.evaluation] + (["gates.evaluation"] if self.gates.evaluation else [])
        if self.runner != Runner.LOCAL and gated:
            raise PydanticCustomError("evaluation_runner", "evaluation gates run with runner local: the service "
                                      "scores the labelled data between build and deploy; use runner: local or drop "
                                      "the gate", {"path": gated[0]})
        return self

    @model_validator(mode="after")
    def _approval_with_local_runner(self) -> Policy:
        gated = [i for i, e in enumerate(self.environments) if e.approval]
        if self.runner != Runner.LOCAL and gated:
            raise PydanticCustomError("approval_runner", "approval gates of runner {runner} are the CI system's "
                                      "own (GitHub environment protection rules, Azure environment approvals); "
                                      "drop approval from the environments",
                                      {"runner": str(self.runner), "path": f"environments[{gated[0]}].approval"})
        return self

    @model_validator(mode="after")
    def _pipeline_for_runner(self) -> Policy:
        spec = self.pipeline
        need = {Runner.GITHUB: ("repo",), Runner.AZURE: ("organization_url", "project", "pipeline_id")}.get(self.runner)
        if need is None:
            return self
        missing = [k for k in need if spec is None or getattr(spec, k) is None]
        if missing:
            raise PydanticCustomError("pipeline_missing", "runner {runner} needs pipeline.{keys}",
                                      {"runner": str(self.runner), "keys": ", pipeline.".join(missing)})
        if spec is not None and not (spec.token_env or spec.token_file):
            raise PydanticCustomError("pipeline_token", "runner {runner} needs pipeline.token_env (an environment "
                                      "variable name) or pipeline.token_file (a file under $MODELCD_HOME/secrets/)",
                                      {"runner": str(self.runner)})
        return self

    @model_validator(mode="after")
    def _stage_places(self) -> Policy:
        spec = self.pipeline
        given = {k: v for k, v in (spec.stages.model_dump() if spec else {}).items() if v is not None}
        if self.runner == Runner.LOCAL:
            if given:
                raise PydanticCustomError("stages_local", "runner local runs every stage on the service; "
                                          "pipeline.stages is for runner github or azure",
                                          {"path": "pipeline.stages"})
            return self
        for env in self.environments:
            problem = _places_problem(self, env)
            if problem:
                raise PydanticCustomError("stage_place", "{message}", {"message": problem, "path": "pipeline.stages"})
        return self

    @model_validator(mode="after")
    def _unique_environments(self) -> Policy:
        problems = _duplicate_environments([e.name for e in self.environments])
        if problems:
            first = problems[0]
            raise PydanticCustomError("duplicate_environment", "{message}",
                                      {"message": first.message, "path": first.path})
        return self

    @classmethod
    def from_dict(cls, data: Any, source: str = "<policy>") -> Policy:
        """Validate plain data (a stored snapshot, an API body); raise `InvalidPolicy` listing problems."""
        return _validate(data, source, {})

    def matches(self, model: str, tags: Mapping[str, str], source: str) -> bool:
        return self.match.matches(model, tags, source)

    def environment(self, name: str) -> Environment | None:
        """The environment step called ``name``, if the policy has one."""
        return next((e for e in self.environments if e.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data, every field included (defaults too), so a snapshot replays exactly."""
        return self.model_dump(mode="json")

    @property
    def revision(self) -> str:
        """Content hash of the policy: the same text always has the same revision."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def snapshot(self) -> dict[str, Any]:
        """What a release stores about the policy revision it used; `Policy.from_dict(s["policy"])`."""
        return {"name": self.name, "revision": self.revision, "policy": self.to_dict()}


def deployments_kept(policy: Policy, env: Environment) -> int:
    """How many deployments an endpoint keeps after a promotion (the serving one included):
    one with strategy recreate, else ``retention.keep_deployments``."""
    return 1 if env.strategy == Strategy.RECREATE else policy.retention.keep_deployments


def stage_place(policy: Policy, env: Environment, stage: str) -> Place:
    """Where ``stage`` of a release to ``env`` under ``policy`` does its work: always the service
    for runner local and for promote/rollback; otherwise ``pipeline.stages`` or, unset, the
    target's default (``docker``: the runner; ``process``: the service, whose host runs it)."""
    if policy.runner == Runner.LOCAL or stage not in RUNNER_STAGES:
        return Place.SERVICE
    given = getattr(policy.pipeline.stages, stage) if policy.pipeline else None
    if given is not None:
        return Place(given)
    return Place.RUNNER if env.target == TargetKind.DOCKER else Place.SERVICE


def _places_problem(policy: Policy, env: Environment) -> str | None:
    """Why the stage places cannot work for ``env``, with the fix; None when they can."""
    build, deploy = stage_place(policy, env, "build"), stage_place(policy, env, "deploy")
    if env.target == TargetKind.PROCESS and Place.RUNNER in (build, deploy):
        return (f"environment {env.name} uses target process, which runs on the service's host: its build and "
                "deploy stages run on the service (pipeline.stages.build/deploy: service), or use target: docker")
    if deploy is Place.RUNNER and build is Place.SERVICE:
        return (f"environment {env.name}: deploy in the runner needs the image built in the runner "
                "(pipeline.stages.build: runner)")
    if build is Place.RUNNER and deploy is Place.SERVICE:
        return (f"environment {env.name}: an image built in the runner is deployed by the runner "
                "(pipeline.stages.deploy: runner), or build it on the service (pipeline.stages.build: service)")
    return None


# ---------------------------------------------------------------------------------------------
# selection (pure)


def _literal_prefix(glob: str) -> str:
    cut = min((i for i, ch in enumerate(glob) if ch in _WILDCARDS), default=len(glob))
    return glob[:cut]


def _glob_specificity(glob: str) -> tuple[int, bool]:
    return len(_literal_prefix(glob)), not any(ch in glob for ch in _WILDCARDS)


def precedence(policy: Policy, model: str) -> tuple[int, int, int, str]:
    """Sort key: smaller sorts first, so more specific policies come first."""
    glob = policy.match.matching_glob(model) or ""
    prefix, exact = _glob_specificity(glob)
    return -len(policy.match.tags), -prefix, -int(exact), policy.name


def select_policy(policies: Sequence[Policy], model: str, tags: Mapping[str, str], source: str) -> Policy:
    """The most specific policy matching this version (see module docstring), else DEFAULT_POLICY."""
    candidates = [p for p in policies if p.matches(model, tags, source)]
    if not candidates:
        return DEFAULT_POLICY
    return min(candidates, key=lambda p: precedence(p, model))


# ---------------------------------------------------------------------------------------------
# parsing and error reporting


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy: where (YAML path, line) and what to fix."""

    path: str  # e.g. "environments[0].strategy"; "" for the document itself
    message: str
    line: int | None = None  # 1-based line in the YAML text, when known

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class InvalidPolicy(InvalidInput):
    """A policy failed to parse or validate; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[Problem], source: str) -> None:
        self.problems = tuple(problems)
        lines = [p.render(source) for p in self.problems]
        if len(lines) == 1:
            message = lines[0]
        else:
            message = f"{source}: {len(lines)} problems in release policy:\n" + "\n".join(
                f"  {line}" for line in lines)
        super().__init__(message, field=(self.problems[0].path or None) if self.problems else None)


def render_path(loc: Iterable[str | int]) -> str:
    """``("environments", 0, "strategy")`` → ``environments[0].strategy``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _duplicate_environments(names: Sequence[Any]) -> list[Problem]:
    first: dict[str, int] = {}
    problems = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if name in first:
            problems.append(Problem(f"environments[{i}].name",
                                    f"duplicate environment {name!r} (first at environments[{first[name]}])"))
        else:
            first[name] = i
    return problems


def _known_keys(parent: tuple[str | int, ...]) -> list[str]:
    shape = tuple(0 if isinstance(p, int) else p for p in parent)
    if shape[:3] == ("environments", 0, "env") and len(shape) == 4:
        return list(SecretRef.model_fields)  # a variable given as a mapping
    model = _MODEL_AT.get(shape)
    return list(model.model_fields) if model else []


def _describe(err: ErrorDetails) -> str:
    """Turn a pydantic error into a message that says what to write instead."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, _show(err.get("input"))
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        key, known = str(err["loc"][-1]), _known_keys(_untag(tuple(err["loc"][:-1])))
        hint = difflib.get_close_matches(key, known, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"unknown key{did_you_mean}; known keys: {', '.join(known)}"
    simple = {
        "model_type": "must be a mapping", "model_attributes_type": "must be a mapping",
        "dict_type": "must be a mapping", "tuple_type": "must be a list", "list_type": "must be a list",
        "string_type": "must be a string", "bool_type": "must be true or false",
        "bool_parsing": "must be true or false", "int_type": "must be a whole number",
        "int_parsing": "must be a whole number", "int_from_float": "must be a whole number",
        "float_type": "must be a number", "float_parsing": "must be a number",
        "finite_number": "must be a finite number",
    }
    if kind in simple:
        return f"{simple[kind]} (got {got})"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"must have at least {n} item{'s' if n != 1 else ''}"
    if kind in ("choice", "name", "steps_unused", "steps_order", "duplicate_environment", "stages_local", "stage_place",
                "approval_runner", "mirror_canary", "shadow_only", "analysis_pairs", "watch_gate",
                "evaluation_direction", "evaluation_runner"):
        return err["msg"]
    msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    msg = msg.replace("String should have", "must have")
    return msg if "(got" in msg else f"{msg} (got {got})"


def _line_for(loc: tuple[str | int, ...], lines: Mapping[tuple[str | int, ...], int]) -> int | None:
    """The line of ``loc`` or of its nearest ancestor present in the text."""
    for cut in range(len(loc), 0, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def _problem(err: ErrorDetails, lines: Mapping[tuple[str | int, ...], int]) -> Problem:
    ctx = err.get("ctx") or {}
    if "path" in ctx:  # a whole-policy check that knows which field to blame
        return Problem(str(ctx["path"]), _describe(err), lines.get(_parse_path(str(ctx["path"]))))
    loc = _untag(tuple(err["loc"]))
    return Problem(render_path(loc), _describe(err), _line_for(loc, lines))


def _untag(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop the union tag pydantic puts after an env variable's name (``env.DB.secret``)."""
    if len(loc) > 4 and loc[0] == "environments" and loc[2] == "env" and loc[4] in ("text", "secret"):
        return loc[:4] + loc[5:]
    return loc


def _parse_path(path: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(token[1:-1]) if token.startswith("[") else token)
    return tuple(parts)


def _echo(err: ErrorDetails) -> bool:
    """A ``too_short`` that only echoes failed items (pydantic counts the items that validated)."""
    given = err.get("input")
    return err["type"] == "too_short" and isinstance(given, list | tuple) and (
        len(given) >= (err.get("ctx") or {}).get("min_length", 0))


def _validate(data: Any, source: str, lines: Mapping[tuple[str | int, ...], int],
              found: Sequence[Problem] = ()) -> Policy:
    """Validate parsed data; ``found`` are problems the YAML reading already noticed."""
    if not isinstance(data, Mapping):
        raise InvalidPolicy([*found, Problem("", f"a release policy must be a mapping (got {_show(data)})", 1)],
                            source)
    envs = data.get("environments")
    names = [e.get("name") for e in envs if isinstance(e, Mapping)] if isinstance(envs, list | tuple) else []
    problems = [*found, *(Problem(p.path, p.message, lines.get(_parse_path(p.path)))
                          for p in _duplicate_environments(names))]
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        problems += [_problem(err, lines) for err in e.errors() if not _echo(err)]
    if problems:
        unique = list(dict.fromkeys(problems))
        unique.sort(key=lambda p: (p.line or 0))
        raise InvalidPolicy(unique, source)
    return policy


def _line_map(root: yaml.Node, source: str) -> tuple[dict[tuple[str | int, ...], int], list[Problem]]:
    """YAML path → 1-based line (of the key for mapping entries, of the item for list items), and
    the duplicate keys found on the way."""
    lines: dict[tuple[str | int, ...], int] = {}
    duplicates: list[Problem] = []
    stack: list[tuple[yaml.Node, tuple[str | int, ...], int]] = [(root, (), 0)]
    visited = 0
    while stack:
        node, path, depth = stack.pop()
        visited += 1
        if visited > MAX_POLICY_NODES or depth > 50:
            raise InvalidPolicy([Problem("", f"policy too large or too deep (more than {MAX_POLICY_NODES} "
                                             "values after expanding aliases, or nested over 50 levels)")],
                                source)
        children: list[tuple[yaml.Node, tuple[str | int, ...], int]] = []
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.tag)
                line = key_node.start_mark.line + 1
                if (*path, key) in lines or any(c[1] == (*path, key) for c in children):
                    duplicates.append(Problem(render_path((*path, key)),
                                              "duplicate key; YAML would silently keep only the last", line))
                children.append((value_node, (*path, key), line))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, (*path, i), item.start_mark.line + 1) for i, item in enumerate(node.value)]
        for child, child_path, line in children:
            lines.setdefault(child_path, line)
            stack.append((child, child_path, depth + 1))
    return lines, duplicates


def _load(text: str, source: str) -> tuple[Any, dict[tuple[str | int, ...], int], list[Problem]]:
    """Parse one YAML document; return the data, the line of each path and duplicate keys."""
    if len(text.encode("utf-8", "replace")) > MAX_POLICY_BYTES:
        raise InvalidPolicy([Problem("", f"policy is larger than {MAX_POLICY_BYTES // 1024} KiB")], source)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise InvalidPolicy([Problem("", "policy is empty; it needs at least `name:`")], source)
        lines, duplicates = _line_map(node, source)
        return loader.construct_document(node), lines, duplicates
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        what = f"{e.context}, {e.problem}" if e.context else str(e.problem)
        raise InvalidPolicy([Problem("", f"invalid YAML: {what}", line)], source) from e
    except yaml.YAMLError as e:
        raise InvalidPolicy([Problem("", f"invalid YAML: {e}")], source) from e
    finally:
        loader.dispose()


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate one policy; raise `InvalidPolicy` (an `InvalidInput`) listing every problem
    as ``source:line: path: message``, with ``field`` the path of the first one."""
    data, lines, duplicates = _load(text, source)
    return _validate(data, source, lines, duplicates)


DEFAULT_POLICY = Policy(name="default")
"""Every new version auto-releases to ``production``, blue-green, on the ``process`` target,
smoke-tested with the version's own sample; used when no policy matches."""

_MODEL_AT: dict[tuple[str | int, ...], type[BaseModel]] = {
    (): Policy,
    ("match",): Match,
    ("environments", 0): Environment,
    ("smoke",): SmokePolicy,
    ("retention",): Retention,
    ("pipeline",): PipelineSpec,
    ("environments", 0, "resources"): Resources,
    ("gates",): Gates,
    ("gates", "evaluation"): EvaluationGate,
    ("environments", 0, "gates"): Gates,
    ("environments", 0, "gates", "evaluation"): EvaluationGate,
}
