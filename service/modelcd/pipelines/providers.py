"""``PipelineProvider``: how the external runner starts a release's pipeline run and asks
how it is doing, one implementation per CI system, chosen by the policy's ``runner``.

Credentials come by reference (``pipeline.token_env`` names an environment variable,
``pipeline.token_file`` a file under ``$MODELCD_HOME/secrets/``) and are read when needed;
they reach only the CI system's API, never logs or events.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelcd.errors import ConfigError, StageFailed
from modelcd.pipelines.render import PATHS, Provider

if TYPE_CHECKING:
    from modelcd.context import Context
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
    name: str

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


def resolve_credential(spec: dict[str, Any], home: Path) -> str:
    """The secret a policy names: ``token_env`` (environment variable) or ``token_file``
    (file under ``home/secrets``); ConfigError naming the reference when it is not there."""
    if spec.get("token_env"):
        value = os.environ.get(str(spec["token_env"]), "").strip()
        if not value:
            raise ConfigError(f"pipeline.token_env: environment variable {spec['token_env']} is not set in the "
                              "service's environment", field="pipeline.token_env")
        return value
    if spec.get("token_file"):
        path = home / "secrets" / str(spec["token_file"])
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


class GitHubProvider(PipelineProvider):
    """GitHub Actions: ``workflow_dispatch`` (default; run id returned at once) or
    ``repository_dispatch`` (``model-registered``; the run is found by its title)."""

    name = "github"

    def __init__(self, spec: dict[str, Any], token: str) -> None:
        from modelcd.pipelines.github import GitHubClient

        self.spec = spec
        self.client = GitHubClient(spec["repo"], token, api_url=spec.get("api_url") or "https://api.github.com")

    def workflow(self, model: str) -> str:
        return str(self.spec.get("workflow") or Path(PATHS[Provider.GITHUB].format(model=model)).name)

    def trigger(self, release: Release, token: str, callback_url: str) -> RunRef:
        inputs = {**release_inputs(release, callback_url), "release_token": token}
        started = datetime.now(UTC) - timedelta(seconds=5)
        workflow = self.workflow(release.model)
        if self.spec.get("trigger") == "repository_dispatch":
            self.client.repository_dispatch("model-registered", inputs)
            run_id = None
        else:
            run_id = self.client.workflow_dispatch(workflow, str(self.spec.get("ref") or "main"), inputs)
        if run_id is None:
            return self.locate(release, started) or RunRef(None, None)
        return RunRef(str(run_id), None)

    def locate(self, release: Release, since: datetime) -> RunRef | None:
        """The run whose title carries ``[release id]`` (the template's ``run-name``)."""
        event = str(self.spec.get("trigger") or "workflow_dispatch")
        found = self.client.find_run(self.workflow(release.model), event, since, f"[{release.id}]")
        return RunRef(str(found.id), found.html_url) if found is not None else None

    def status(self, run_id: str) -> RunStatus:
        from modelcd.pipelines.github import run_outcome

        run = self.client.get_run(int(run_id))
        stages: dict[str, str] = {}
        if run.completed:  # which stage the run stopped at (jobs are named like the stages)
            stages = dict(run_outcome(run, self.client.list_jobs(run.id), {s: s for s in STAGE_NAMES}))
        return RunStatus(finished=run.completed, conclusion=run.conclusion, url=run.html_url, stages=stages)


class AzureProvider(PipelineProvider):
    """Azure Pipelines: the Runs API with ``templateParameters``; the release token goes as
    the secret variable ``MODELCD_RELEASE_TOKEN``."""

    name = "azure"

    def __init__(self, spec: dict[str, Any], token: str) -> None:
        from modelcd.pipelines.azure import AzureDevOpsClient

        self.spec = spec
        self.client = AzureDevOpsClient(spec["organization_url"], spec["project"], token)

    def trigger(self, release: Release, token: str, callback_url: str) -> RunRef:
        run = self.client.run_pipeline(int(self.spec["pipeline_id"]), release_inputs(release, callback_url),
                                       branch=str(self.spec.get("ref") or "main"),
                                       secret_variables={"MODELCD_RELEASE_TOKEN": token})
        return RunRef(str(run.id), run.web_url)

    def status(self, run_id: str) -> RunStatus:
        from modelcd.pipelines.azure import stage_outcome

        run = self.client.get_run(int(self.spec["pipeline_id"]), int(run_id))
        stages: dict[str, str] = {}
        if run.completed:  # stages are named like modelcd's, capitalised
            records = self.client.timeline(run.id)
            stages = dict(stage_outcome(records, {s: s.capitalize() for s in STAGE_NAMES}, run))
        return RunStatus(finished=run.completed, conclusion=run.result, url=run.web_url, stages=stages)


def get_provider(ctx: Context, release: Release) -> PipelineProvider:
    """The provider of the release's policy runner, with its credential resolved."""
    runner = release.runner
    spec = dict(release.policy.get("pipeline") or {})
    token = resolve_credential(spec, ctx.home)
    if runner == "github":
        return GitHubProvider(spec, token)
    if runner == "azure":
        return AzureProvider(spec, token)
    raise StageFailed(f"runner {runner!r} has no pipeline provider", field="runner")
