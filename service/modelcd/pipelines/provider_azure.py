"""Azure Pipelines as a ``PipelineProvider`` (``runner: azure``)."""

from __future__ import annotations

from modelcd.pipelines.azure import AzureDevOpsClient, stage_outcome
from modelcd.pipelines.providers import STAGE_NAMES, PipelineProvider, RunRef, RunStatus, release_inputs
from modelcd.releases.policy import PipelineSpec
from modelcd.releases.service import Release


class AzureProvider(PipelineProvider):
    """Azure Pipelines: the Runs API with ``templateParameters``; the release token goes as
    the secret variable ``MODELCD_RELEASE_TOKEN``."""

    name = "azure"

    def __init__(self, spec: PipelineSpec, token: str) -> None:
        self.spec = spec
        self.client = AzureDevOpsClient(spec.organization_url or "", spec.project or "", token)

    def trigger(self, release: Release, token: str, callback_url: str) -> RunRef:
        run = self.client.run_pipeline(self.spec.pipeline_id or 0, release_inputs(release, callback_url),
                                       branch=self.spec.ref,
                                       secret_variables={"MODELCD_RELEASE_TOKEN": token})
        return RunRef(str(run.id), run.web_url)

    def status(self, run_id: str) -> RunStatus:
        run = self.client.get_run(self.spec.pipeline_id or 0, int(run_id))
        stages: dict[str, str] = {}
        if run.completed:  # stages are named like modelcd's, capitalised
            records = self.client.timeline(run.id)
            stages = dict(stage_outcome(records, {s: s.capitalize() for s in STAGE_NAMES}, run))
        return RunStatus(finished=run.completed, conclusion=run.result, url=run.web_url, stages=stages)
