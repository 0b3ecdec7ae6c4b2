"""Rendered pipelines pass actionlint and the JSON schemas; registry strings cannot inject
into them; this repository's example pipelines equal a fresh render."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from modelcd.errors import InvalidInput
from modelcd.pipelines.check import check_pipeline
from modelcd.pipelines.render import PipelineOptions, Provider, RenderedPipeline, render_pipeline
from modelcd.registry.names import validate_description, validate_model_name, validate_tags

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ['a"b', "x${{ github.token }}", "m$(id)", "m`id`", "two\nlines", "a'b", "a b", "../x", "a:b", "#x"]


@pytest.mark.parametrize("provider", list(Provider))
@pytest.mark.parametrize("model", ["iris", "Churn.Model_v2", "x", "a" * 64])
def test_rendered_pipelines_pass_actionlint_and_the_schemas(provider: Provider, model: str) -> None:
    rendered = render_pipeline(model, provider, PipelineOptions(environment="staging"))
    assert check_pipeline(rendered) == []
    assert rendered.path.endswith(f"modelcd-release-{model}.yml")


def test_checks_catch_a_broken_pipeline() -> None:
    good = render_pipeline("iris", Provider.GITHUB)
    broken = RenderedPipeline(good.provider, good.path, good.text.replace("runs-on:", "runs_on:", 1))
    assert any("schema" in p for p in check_pipeline(broken))
    lint = RenderedPipeline(good.provider, good.path,
                            good.text.replace("inputs.release_id ||", "inputs.releaseid ||", 1))
    problems = check_pipeline(lint)
    assert any("actionlint" in p and "releaseid" in p for p in problems), problems  # an undefined input
    azure = render_pipeline("iris", Provider.AZURE)
    assert check_pipeline(RenderedPipeline(azure.provider, azure.path, azure.text.replace("stages:", "stagez:")))


def _scripts(rendered: RenderedPipeline) -> list[str]:
    doc = yaml.safe_load(rendered.text)
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("run", "bash", "script") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return found


@pytest.mark.parametrize("provider", list(Provider))
def test_no_expression_or_registry_value_reaches_a_script(provider: Provider) -> None:
    rendered = render_pipeline("iris", provider)
    scripts = _scripts(rendered)
    assert len(scripts) >= 5
    for script in scripts:
        assert "${{" not in script and "$(" not in script.replace("$(MODELCD_", "")
        assert "iris" not in script  # the model's name travels in MODELCD_MODEL, not in the text


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_names_are_refused_at_registration_and_rendering(bad: str) -> None:
    with pytest.raises(InvalidInput):
        validate_model_name(bad)
    for provider in Provider:
        with pytest.raises(InvalidInput):
            render_pipeline(bad, provider)
    if any(c in bad for c in "\"'$`\n#"):  # settings: spaces and ':' are fine, shell and YAML syntax is not
        with pytest.raises(InvalidInput):
            render_pipeline("iris", Provider.GITHUB, PipelineOptions(runs_on=bad))
        with pytest.raises(InvalidInput):
            render_pipeline("iris", Provider.GITHUB, PipelineOptions(package=bad))


def test_hostile_descriptions_and_tags_never_reach_a_pipeline() -> None:
    text = 'evil" ${{ secrets.X }} $(id) `id`\nrun: curl x'
    assert validate_description(text) == text  # accepted as data at registration...
    with pytest.raises(InvalidInput):  # tags refuse line breaks outright
        validate_tags({"team": text})
    assert validate_tags({"team": text.replace("\n", " ")})["team"].startswith("evil")
    for provider in Provider:  # ...and a pipeline is rendered from the name alone
        assert "secrets.X" not in render_pipeline("iris", provider).text


@pytest.mark.parametrize("path", [".github/workflows/ci.yml", "azure-pipelines/ci.yml",
                                  ".github/workflows/modelcd-release-iris.yml",
                                  "azure-pipelines/modelcd-release-iris.yml"])
def test_this_repository_pipelines_pass_the_checks(path: str) -> None:
    provider = Provider.GITHUB if path.startswith(".github") else Provider.AZURE
    assert check_pipeline(RenderedPipeline(provider, path, (ROOT / path).read_text())) == []


@pytest.mark.parametrize("provider", list(Provider))
def test_example_release_pipelines_equal_a_fresh_render(provider: Provider) -> None:
    rendered = render_pipeline("iris", provider)
    committed = (ROOT / rendered.path).read_text()
    assert committed == rendered.text, (f"{rendered.path} is stale: run `modelcd pipelines render iris --provider "
                                        f"{provider} --out .`")


def test_ci_workflows_run_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test" in readme
    for path in (".github/workflows/ci.yml", "azure-pipelines/ci.yml"):
        assert "bash scripts/test" in (ROOT / path).read_text()


def test_act_refuses_an_injected_release_id(tmp_path: Path) -> None:
    """The workflow itself: a hostile release id from the trigger is data, never code."""
    repo = tmp_path / "repo"
    rendered = render_pipeline("iris", Provider.GITHUB)
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / rendered.path).write_text(rendered.text)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    marker = tmp_path / "pwned"
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"inputs": {
        "model": f"iris$(touch {marker})", "version": "1", "environment": "production",
        "release_id": f"r-1$(touch {marker})`touch {marker}`", "callback_url": "http://127.0.0.1:9",
        "release_token": "mcdr_x"}}))
    out = subprocess.run(["act", "workflow_dispatch", "-e", str(event), "-W", rendered.path,
                          "-P", "ubuntu-latest=-self-hosted"], cwd=repo, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode != 0
    assert "bad release id" in out.stdout + out.stderr
    assert not marker.exists()
