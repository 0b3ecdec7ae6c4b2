"""Both rendered pipelines carry the same stages, and only the stages that may do work with the
registry (build, deploy) get the registry secrets, under the names the policy gives; the files
still pass actionlint and the JSON schemas, and a bad secret name is refused."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from modelcd.errors import InvalidInput
from modelcd.pipelines.check import check_pipeline
from modelcd.pipelines.render import PipelineOptions, Provider, render_pipeline

STAGES = ["build", "deploy", "smoke", "promote", "rollback"]
OPTIONS = PipelineOptions(registry_username_env="ACME_REGISTRY_USER", registry_password_env="ACME_REGISTRY_TOKEN")


def _github_step_env(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {name: next(s for s in job["steps"] if s["name"] == f"modelcd {name}").get("env", {})
            for name, job in doc["jobs"].items()}


def _azure_step_env(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    out = {}
    for stage in doc["stages"]:
        job = stage["jobs"][0]
        steps = job["steps"] if "steps" in job else job["strategy"]["runOnce"]["deploy"]["steps"]
        name = stage["stage"].lower()
        out[name] = next(s for s in steps if s.get("displayName") == f"modelcd {name}")["env"]
    return out


@pytest.mark.parametrize("provider", list(Provider))
def test_both_pipelines_run_the_same_stages_and_hand_registry_secrets_to_build_and_deploy_only(
        provider: Provider) -> None:
    rendered = render_pipeline("iris", provider, OPTIONS)
    assert check_pipeline(rendered) == []
    doc = yaml.safe_load(rendered.text)
    env = _github_step_env(doc) if provider is Provider.GITHUB else _azure_step_env(doc)
    assert list(env) == STAGES
    for stage, variables in env.items():
        names = {"ACME_REGISTRY_USER", "ACME_REGISTRY_TOKEN"} & set(variables)
        assert names == ({"ACME_REGISTRY_USER", "ACME_REGISTRY_TOKEN"} if stage in ("build", "deploy") else set())
    build = env["build"]
    if provider is Provider.GITHUB:
        assert build["ACME_REGISTRY_TOKEN"] == "${{ secrets.ACME_REGISTRY_TOKEN }}"
    else:  # an Azure secret variable reaches a script only when mapped explicitly
        assert build["ACME_REGISTRY_TOKEN"] == "$(ACME_REGISTRY_TOKEN)"


@pytest.mark.parametrize("name", ["GITHUB_TOKEN", "1ABC", "A-B", "A B", "${{ x }}", "", "A" * 101])
def test_a_bad_secret_name_is_refused(name: str) -> None:
    with pytest.raises(InvalidInput) as e:
        render_pipeline("iris", Provider.GITHUB, PipelineOptions(registry_password_env=name))
    assert e.value.field == "registry_password_env"
