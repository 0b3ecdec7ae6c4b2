"""Wiring: one object holding the store and the adapters chosen by name in settings."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from modelcd.config import Settings
from modelcd.inbox.store import Inbox
from modelcd.jobs.service import Jobs, Redactor
from modelcd.pipelines.runs import PipelineRuns
from modelcd.registry.artifacts import get_artifact_store
from modelcd.registry.service import Registry
from modelcd.releases.deployments import Deployments
from modelcd.releases.policies import Policies
from modelcd.releases.service import Releases
from modelcd.releases.traffic import Traffic
from modelcd.routing.base import Router, get_router
from modelcd.store.db import Database
from modelcd.targets import get_target
from modelcd.targets.base import Target
from modelcd.users import Users


@dataclass
class Context:
    """Everything the control plane works with; built once per process."""

    settings: Settings
    db: Database
    redact: Redactor
    jobs: Jobs
    registry: Registry
    policies: Policies
    releases: Releases
    deployments: Deployments
    router: Router
    traffic: Traffic
    targets: dict[str, Target]
    inbox: Inbox
    pipeline_runs: PipelineRuns
    users: Users  # named users, their tokens, and who a bearer token is (users.principal_for)
    wake: threading.Event = field(default_factory=threading.Event)  # outbox or queue has new work
    inbox_wake: threading.Event = field(default_factory=threading.Event)  # a webhook delivery was stored

    @property
    def home(self) -> Path:
        return self.settings.home

    def target(self, name: str) -> Target:
        if name not in self.targets:
            self.targets[name] = get_target(name, self.settings)
        return self.targets[name]


def build_context(settings: Settings) -> Context:
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.db_url)
    redact = Redactor()
    for secret in (settings.token, settings.hooks_mlflow_secret, settings.hooks_generic_secret, settings.hooks_s3_token,
                   settings.hooks_azureml_secret, settings.hooks_sagemaker_api_key,
                   settings.docker_registry_password):
        redact.add(secret)
    jobs = Jobs(db, redact)
    registry = Registry(db, get_artifact_store(settings), home, settings.max_artifact_bytes)
    deployments = Deployments(db)
    router = get_router("builtin", settings)
    return Context(
        settings=settings, db=db, redact=redact, jobs=jobs, registry=registry, policies=Policies(db),
        releases=Releases(db, jobs), deployments=deployments, router=router,
        traffic=Traffic(db, router, deployments), targets={}, inbox=Inbox(db), pipeline_runs=PipelineRuns(db),
        users=Users(db, settings.token),
    )
