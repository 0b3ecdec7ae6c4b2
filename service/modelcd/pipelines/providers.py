"""The ``PipelineProvider`` port: how the external runner starts a release's pipeline run and
asks how it is doing. One implementation per CI system, each in its own module
(``provider_github``, ``provider_azure``), chosen by the policy's ``runner`` from ``PROVIDERS``.

Credentials come by reference (``pipeline.token_env`` names an environment variable,
``pipeline.token_file`` a file under ``$MODELCD_HOME/secrets/``) and are read when needed;
they reach only the CI system's API, never logs or events.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from modelcd.errors import ConfigError
from modelcd.ports import Ports

if TYPE_CHECKING:
    from modelcd.context import Context
    from modelcd.releases.policy import PipelineSpec
    from modelcd.releases.service import Release


@dataclass(frozen=True)
class RunRef:
    run_id: str | None  # None when the CI system gives no id at once (found later by title)
    url: str | None


@dataclass(frozen=True)
class RunStatus:
    finished: bool
    conclusion: str | None  # success, failure, cancelled... (the CI system's word)
    url: str | None = None
    stages: dict[str, str] = field(default_factory=dict)  # modelcd stage -> pending|running|succeeded|failed...

    def describe(self) -> str:
        """``build succeeded, deploy failed, ...`` (stages that ran or failed)."""
        return ", ".join(f"{stage} {outcome}" for stage, outcome in self.stages.items()
                         if outcome not in ("pending", "skipped"))


STAGE_NAMES = ("build", "deploy", "smoke", "promote", "rollback")  # job ids in the rendered templates


class PipelineProvider(ABC):
    """A CI system that runs release pipelines. Made with the policy's ``pipeline`` spec and
    the credential it names (already read)."""

    name: str

    @abstractmethod
    def __init__(self, spec: PipelineSpec, token: str) -> None:
        """Keep the spec; make the API client (no request yet)."""

    @abstractmethod
    def trigger(self, release: Release, token: str, callback_url: str) -> RunRef:
        """Start the release's pipeline run; raise a ModelcdError (``retryable`` attribute
        True for rate limits, 5xx, timeouts) when it cannot."""

    @abstractmethod
    def status(self, run_id: str) -> RunStatus:
        """The run's state, for when reports stop coming."""

    def locate(self, release: Release, since: datetime) -> RunRef | None:
        """Find a run started for ``release`` whose id the trigger did not return."""
        return None


def resolve_credential(spec: PipelineSpec, home: Path) -> str:
    """The secret a policy names: ``token_env`` (environment variable) or ``token_file``
    (file under ``home/secrets``); ConfigError naming the reference when it is not there."""
    if spec.token_env:
        value = os.environ.get(spec.token_env, "").strip()
        if not value:
            raise ConfigError(f"pipeline.token_env: environment variable {spec.token_env} is not set in the "
                              "service's environment", field="pipeline.token_env")
        return value
    if spec.token_file:
        path = home / "secrets" / spec.token_file
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"pipeline.token_file: cannot read {path} ({e.strerror}); write the token there "
                              "(mode 0600)", field="pipeline.token_file") from None
        if value:
            return value
        raise ConfigError(f"pipeline.token_file: {path} is empty", field="pipeline.token_file")
    raise ConfigError("the policy's pipeline names no credential: set pipeline.token_env or pipeline.token_file",
                      field="pipeline")


def release_inputs(release: Release, callback_url: str) -> dict[str, str]:
    """What every run gets: strings only, each already validated by modelcd's own rules."""
    return {"model": release.model, "version": str(release.version), "environment": release.environment,
            "release_id": release.id, "callback_url": callback_url}


# runner name -> the provider class, called with the policy's pipeline spec and the
# credential; a new CI system adds one line here (imported when used).
PROVIDERS: Ports[[PipelineSpec, str], PipelineProvider] = Ports(
    {"azure": "modelcd.pipelines.provider_azure:AzureProvider",
     "github": "modelcd.pipelines.provider_github:GitHubProvider"},
    unknown="runner {name!r} has no pipeline provider; known: {known}", field="runner")


def get_provider(ctx: Context, release: Release) -> PipelineProvider:
    """The provider of the release's policy runner, with its credential resolved."""
    from modelcd.releases.policy import PipelineSpec

    spec = release.policy.pipeline or PipelineSpec()
    provider = PROVIDERS.factory(str(release.runner))  # an unknown runner is named before a missing credential
    return provider(spec, resolve_credential(spec, ctx.home))
