"""GitHub Actions as a ``PipelineProvider`` (``runner: github``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from modelcd.pipelines.github import GitHubClient, run_outcome
from modelcd.pipelines.providers import STAGE_NAMES, PipelineProvider, RunRef, RunStatus, release_inputs
from modelcd.pipelines.render import PATHS, Provider
from modelcd.releases.policy import PipelineSpec
from modelcd.releases.service import Release


class GitHubProvider(PipelineProvider):
    """GitHub Actions: ``workflow_dispatch`` (default; run id returned at once) or
    ``repository_dispatch`` (``model-registered``; the run is found by its title)."""

    name = "github"

    def __init__(self, spec: PipelineSpec, token: str) -> None:
        self.spec = spec
        self.client = GitHubClient(spec.repo or "", token, api_url=spec.api_url)

    def workflow(self, model: str) -> str:
        return self.spec.workflow or Path(PATHS[Provider.GITHUB].format(model=model)).name

    def trigger(self, release: Release, token: str, callback_url: str) -> RunRef:
        inputs = {**release_inputs(release, callback_url), "release_token": token}
        started = datetime.now(UTC) - timedelta(seconds=5)
        workflow = self.workflow(release.model)
        if self.spec.trigger == "repository_dispatch":
            self.client.repository_dispatch("model-registered", inputs)
            run_id = None
        else:
            run_id = self.client.workflow_dispatch(workflow, self.spec.ref, inputs)
        if run_id is None:
            return self.locate(release, started) or RunRef(None, None)
        return RunRef(str(run_id), None)

    def locate(self, release: Release, since: datetime) -> RunRef | None:
        """The run whose title carries ``[release id]`` (the template's ``run-name``)."""
        event = self.spec.trigger
        found = self.client.find_run(self.workflow(release.model), event, since, f"[{release.id}]")
        return RunRef(str(found.id), found.html_url) if found is not None else None

    def status(self, run_id: str) -> RunStatus:
        run = self.client.get_run(int(run_id))
        stages: dict[str, str] = {}
        if run.completed:  # which stage the run stopped at (jobs are named like the stages)
            stages = dict(run_outcome(run, self.client.list_jobs(run.id), {s: s for s in STAGE_NAMES}))
        return RunStatus(finished=run.completed, conclusion=run.conclusion, url=run.html_url, stages=stages)
