"""Where the stages of a pipeline-driven release run (policy ``pipeline.stages``): the target's
defaults, explicit places, and every combination that cannot work refused with the field and
the fix."""

from __future__ import annotations

import pytest

from modelcd.releases.policy import InvalidPolicy, Place, Policy, parse_policy, stage_place

GITHUB = "runner: github\npipeline:\n  repo: acme/models\n  token_env: GH_TOKEN\n"
AZURE = ("runner: azure\npipeline:\n  organization_url: 'https://dev.azure.com/acme'\n  project: models\n"
         "  pipeline_id: 7\n  token_env: ADO_TOKEN\n")
ALL = ("build", "deploy", "smoke", "promote", "rollback")


def policy(runner: str, target: str, stages: str = "", extra_env: str = "") -> Policy:
    text = f"name: p\n{runner}"
    if stages:
        text += f"  stages: {stages}\n"
    text += f"environments:\n  - name: production\n    target: {target}\n{extra_env}"
    return parse_policy(text, "p.yaml")


def places(p: Policy, env_index: int = 0) -> dict[str, Place]:
    return {s: stage_place(p, p.environments[env_index], s) for s in ALL}


def refused(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(InvalidPolicy) as info:
        parse_policy(text, "p.yaml")
    return [(p.line, p.path, p.message) for p in info.value.problems]


# --- defaults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", [GITHUB, AZURE], ids=["github", "azure"])
def test_docker_target_puts_build_deploy_smoke_in_the_runner(runner: str) -> None:
    assert places(policy(runner, "docker")) == {"build": Place.RUNNER, "deploy": Place.RUNNER,
                                                "smoke": Place.RUNNER, "promote": Place.SERVICE,
                                                "rollback": Place.SERVICE}


@pytest.mark.parametrize("runner", [GITHUB, AZURE], ids=["github", "azure"])
def test_process_target_keeps_every_stage_on_the_service(runner: str) -> None:
    assert set(places(policy(runner, "process")).values()) == {Place.SERVICE}


@pytest.mark.parametrize("target", ["docker", "process"])
def test_runner_local_runs_everything_on_the_service(target: str) -> None:
    assert set(places(policy("runner: local\n", target)).values()) == {Place.SERVICE}


def test_defaults_follow_each_environment_target() -> None:
    p = parse_policy(f"name: p\n{GITHUB}environments:\n  - name: staging\n    target: process\n"
                     "  - name: production\n    target: docker\n", "p.yaml")
    assert places(p, 0)["build"] is Place.SERVICE and places(p, 0)["deploy"] is Place.SERVICE
    assert places(p, 1)["build"] is Place.RUNNER and places(p, 1)["deploy"] is Place.RUNNER


# --- explicit places --------------------------------------------------------------------------


def test_explicit_places_override_the_target_default() -> None:
    everything_on_service = policy(GITHUB, "docker", "{build: service, deploy: service, smoke: service}")
    assert set(places(everything_on_service).values()) == {Place.SERVICE}
    smoke_on_service = policy(GITHUB, "docker", "{smoke: service}")
    assert places(smoke_on_service)["smoke"] is Place.SERVICE
    assert places(smoke_on_service)["build"] is Place.RUNNER and places(smoke_on_service)["deploy"] is Place.RUNNER
    smoke_in_runner = policy(GITHUB, "process", "{smoke: runner}")
    assert places(smoke_in_runner)["smoke"] is Place.RUNNER and places(smoke_in_runner)["build"] is Place.SERVICE


def test_promote_and_rollback_may_say_service() -> None:
    p = policy(GITHUB, "docker", "{promote: service, rollback: service}")
    assert places(p)["promote"] is Place.SERVICE and places(p)["rollback"] is Place.SERVICE
    assert places(p)["build"] is Place.RUNNER


def test_the_places_survive_a_snapshot() -> None:
    p = policy(AZURE, "docker", "{smoke: service}")
    again = Policy.from_dict(p.snapshot()["policy"])
    assert places(again) == places(p)
    assert again.pipeline is not None and again.pipeline.stages.smoke is Place.SERVICE


# --- refused combinations ----------------------------------------------------------------------


def test_stages_with_runner_local_are_refused() -> None:
    ((_, _, message),) = refused("name: p\nrunner: local\npipeline:\n  stages: {smoke: runner}\n")
    assert message.startswith("runner local runs every stage on the service; pipeline.stages is for runner "
                              "github or azure")
    # even saying "service" is refused: the key means nothing there
    ((_, _, message),) = refused("name: p\npipeline:\n  stages: {build: service}\n")
    assert "pipeline.stages is for runner github or azure" in message


@pytest.mark.parametrize("stage", ["promote", "rollback"])
def test_promote_or_rollback_in_the_runner_is_refused_at_its_line(stage: str) -> None:
    assert refused(f"name: p\n{GITHUB}  stages:\n    {stage}: runner\n") == [
        (7, f"pipeline.stages.{stage}",
         f"{stage} moves traffic at the service's router, so it always runs on the service (the runner's "
         f"`modelcd {stage}` asks it to); drop it or say service (got 'runner')")]


@pytest.mark.parametrize("stages", ["{build: runner}", "{deploy: runner}", "{build: runner, deploy: runner}"])
def test_process_target_with_build_or_deploy_in_the_runner_is_refused(stages: str) -> None:
    text = f"name: p\n{GITHUB}  stages: {stages}\nenvironments:\n  - name: prod-eu\n    target: process\n"
    ((_, _, message),) = refused(text)
    assert message.startswith("environment prod-eu uses target process, which runs on the service's host: its "
                              "build and deploy stages run on the service (pipeline.stages.build/deploy: service), "
                              "or use target: docker")


def test_one_process_environment_among_docker_ones_is_named() -> None:
    text = (f"name: p\n{GITHUB}  stages: {{build: runner, deploy: runner}}\nenvironments:\n"
            "  - name: staging\n    target: docker\n  - name: legacy\n    target: process\n")
    ((_, _, message),) = refused(text)
    assert message.startswith("environment legacy uses target process")


def test_deploy_in_the_runner_with_build_on_the_service_is_refused() -> None:
    ((_, _, message),) = refused(f"name: p\n{GITHUB}  stages: {{build: service}}\nenvironments:\n"
                                 "  - name: production\n    target: docker\n")
    assert message.startswith("environment production: deploy in the runner needs the image built in the runner "
                              "(pipeline.stages.build: runner)")
    ((_, _, same),) = refused(f"name: p\n{AZURE}  stages: {{build: service, deploy: runner}}\nenvironments:\n"
                              "  - name: production\n    target: docker\n")
    assert same == message


def test_build_in_the_runner_with_deploy_on_the_service_is_refused() -> None:
    ((_, _, message),) = refused(f"name: p\n{GITHUB}  stages: {{deploy: service}}\nenvironments:\n"
                                 "  - name: production\n    target: docker\n")
    assert message.startswith("environment production: an image built in the runner is deployed by the runner "
                              "(pipeline.stages.deploy: runner), or build it on the service "
                              "(pipeline.stages.build: service)")


def test_unknown_place_names_the_choices() -> None:
    ((line, path, message),) = refused(f"name: p\n{GITHUB}  stages:\n    build: cloud\n")
    assert (line, path) == (7, "pipeline.stages.build")
    assert "runner" in message and "service" in message and "cloud" in message


def test_registry_must_be_an_address() -> None:
    assert policy(GITHUB + "  registry: 127.0.0.1:5000/models\n", "docker").pipeline.registry == \
        "127.0.0.1:5000/models"
    ((line, path, message),) = refused(f"name: p\n{GITHUB}  registry: 'https://ghcr.io/acme'\n")
    assert (line, path) == (6, "pipeline.registry")
    assert "ghcr.io/acme or 127.0.0.1:5000/models" in message


def test_whole_policy_stage_refusals_point_at_pipeline_stages() -> None:
    ((line, path, message),) = refused("name: p\npipeline:\n  stages: {build: runner}\n")
    assert (line, path) == (3, "pipeline.stages") and "(got" not in message
