"""Release policies: literal YAML in, exact problems (path, line, message) out; precedence; default."""

from __future__ import annotations

import pytest

from modelcd.domain import Source
from modelcd.errors import InvalidInput
from modelcd.releases.policy import (
    DEFAULT_CANARY_STEPS,
    DEFAULT_POLICY,
    InvalidPolicy,
    Policy,
    Problem,
    Runner,
    SecretRef,
    Strategy,
    TargetKind,
    parse_policy,
    render_path,
    select_policy,
)

EXAMPLE = """\
name: iris-auto
match:
  models: ["iris*"]
  tags: {deploy: "true"}
  sources: [native, mlflow]
runner: local
auto: true
environments:
  - name: production
    target: process
    strategy: blue-green
    scoring_workers: 2
smoke:
  requests: 20
  p95_ms: 500
  tolerance: 1.0e-6
  timeout_s: 10
retention:
  keep_deployments: 2
"""


def problems(text: str, source: str = "<policy>") -> list[tuple[int | None, str, str]]:
    with pytest.raises(InvalidPolicy) as info:
        parse_policy(text, source)
    return [(p.line, p.path, p.message) for p in info.value.problems]


# --- parsing -----------------------------------------------------------------------------------


def test_example_parses_to_typed_values():
    p = parse_policy(EXAMPLE)
    assert p.name == "iris-auto"
    assert p.match.models == ("iris*",)
    assert p.match.tags == {"deploy": "true"}
    assert p.match.sources == (Source.NATIVE, Source.MLFLOW)
    assert p.runner is Runner.LOCAL
    assert p.auto is True
    (env,) = p.environments
    assert (env.name, env.target, env.strategy, env.scoring_workers) == (
        "production", TargetKind.PROCESS, Strategy.BLUE_GREEN, 2)
    assert env.steps is None
    assert (p.smoke.requests, p.smoke.p95_ms, p.smoke.tolerance, p.smoke.timeout_s) == (20, 500.0, 1e-6, 10.0)
    assert p.retention.keep_deployments == 2


def test_minimal_policy_takes_defaults():
    p = parse_policy("name: everything\n")
    assert p.match.models == ("*",)
    assert p.match.tags == {}
    assert p.match.sources is None
    assert p.runner is Runner.LOCAL and p.auto is True
    assert [e.name for e in p.environments] == ["production"]
    assert p.environments[0].strategy is Strategy.BLUE_GREEN
    assert p.environments[0].target is TargetKind.PROCESS
    assert p.environments[0].scoring_workers is None  # the service's scoring_workers setting decides


def test_later_runners_targets_and_canary_are_accepted_by_the_schema():
    p = parse_policy("""\
name: staged
runner: github
pipeline: {repo: acme/models, token_env: GITHUB_TOKEN}
environments:
  - name: staging
    target: docker
    strategy: recreate
  - name: production
    target: docker
    strategy: canary
    steps: [10, 50, 100]
""")
    assert p.runner is Runner.GITHUB
    assert [(e.name, e.strategy, e.steps) for e in p.environments] == [
        ("staging", Strategy.RECREATE, None), ("production", Strategy.CANARY, (10, 50, 100))]
    azure = ("name: a\nrunner: azure\n"
             "pipeline: {organization_url: 'https://dev.azure.com/o', project: p, pipeline_id: 3, ")
    assert parse_policy(azure + "token_file: ado}\n").runner is Runner.AZURE
    with pytest.raises(InvalidPolicy, match="runner azure needs pipeline.organization_url"):
        parse_policy("name: a\nrunner: azure\n")
    with pytest.raises(InvalidPolicy, match="needs pipeline.token_env"):
        parse_policy(azure + "}\n")


def test_canary_without_steps_gets_default_steps():
    p = parse_policy("name: a\nenvironments:\n  - name: production\n    strategy: canary\n")
    env = p.environments[0]
    assert env.steps == DEFAULT_CANARY_STEPS == (10, 50, 100)
    assert (env.step_hold_s, env.max_error_rate) == (60.0, 0.01)
    p = parse_policy("name: a\nenvironments:\n  - name: production\n    strategy: canary\n    step_hold_s: 5\n"
                     "    max_error_rate: 0\n")
    assert (p.environments[0].step_hold_s, p.environments[0].max_error_rate) == (5.0, 0.0)
    assert parse_policy("name: a\n").environments[0].step_hold_s is None


def test_yaml_scalars_in_tags_read_as_text_and_single_glob_as_list():
    p = parse_policy("name: a\nmatch:\n  models: iris*\n  tags: {deploy: true, tier: 1}\n  sources: s3\n")
    assert p.match.models == ("iris*",)
    assert p.match.tags == {"deploy": "true", "tier": "1"}
    assert p.match.sources == (Source.S3,)


def test_bad_strategy_names_path_line_and_choices():
    text = """\
name: iris-auto
environments:
  - name: production
    strategy: bluegreen
"""
    with pytest.raises(InvalidInput) as info:
        parse_policy(text, "iris.yaml")
    e = info.value
    assert e.field == "environments[0].strategy"
    assert e.message == (
        "iris.yaml:4: environments[0].strategy: must be one of recreate, blue-green, canary, shadow (got 'bluegreen')")
    assert e.code == "invalid_input"


def test_every_problem_is_listed_in_line_order():
    text = """\
name: Iris Auto
match:
  models: ["iris*"]
  sources: [native, pypi]
runner: jenkins
auto: maybe
environments:
  - name: production
    target: kubernetes
    scoring_workers: 0
    stratgy: canary
  - target: process
smoke:
  p95_ms: -5
  timeout_s: soon
hooks: []
"""
    assert problems(text) == [
        (1, "name", "must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit "
                    "(got 'Iris Auto')"),
        (4, "match.sources[1]", "must be one of native, mlflow, azureml, sagemaker, s3 (got 'pypi')"),
        (5, "runner", "must be one of local, github, azure (got 'jenkins')"),
        (6, "auto", "must be true or false (got 'maybe')"),
        (9, "environments[0].target", "must be one of process, docker (got 'kubernetes')"),
        (10, "environments[0].scoring_workers", "must be greater than or equal to 1 (got 0)"),
        (11, "environments[0].stratgy",
         "unknown key (did you mean 'strategy'?); known keys: name, target, strategy, steps, step_hold_s, "
         "max_error_rate, max_p95_ms, approval, approval_timeout_s, scoring_workers, idle, resources, env, network, "
         "auth, "
         "shadow_s, sample_rate, mirror, analysis, watch, gates"),
        (12, "environments[1].name", "required"),
        (14, "smoke.p95_ms", "must be greater than 0 (got -5)"),
        (15, "smoke.timeout_s", "must be a number (got 'soon')"),
        (16, "hooks", "unknown key; known keys: name, match, runner, auto, environments, smoke, retention, "
                      "pipeline, gates"),
    ]


def test_message_lists_all_problems_and_field_is_the_first():
    with pytest.raises(InvalidPolicy) as info:
        parse_policy("name: a\nrunner: x\nauto: maybe\n", "p.yaml")
    assert info.value.field == "runner"
    assert info.value.message == (
        "p.yaml: 2 problems in release policy:\n"
        "  p.yaml:2: runner: must be one of local, github, azure (got 'x')\n"
        "  p.yaml:3: auto: must be true or false (got 'maybe')")
    assert info.value.to_dict()["field"] == "runner"


def test_missing_name_has_no_line_and_names_the_field():
    assert problems("runner: local\n") == [(None, "name", "required")]


def test_canary_steps_rules():
    text = """\
name: a
environments:
  - name: one
    strategy: canary
    steps: [50, 10, 100]
  - name: two
    strategy: canary
    steps: [10, 50]
  - name: three
    strategy: blue-green
    steps: [10, 100]
  - name: four
    strategy: canary
    steps: [0, 100]
  - name: five
    step_hold_s: 30
    max_error_rate: 0.05
  - name: six
    strategy: canary
    step_hold_s: 0
    max_error_rate: 1.5
  - name: seven
    max_p95_ms: 50
"""
    assert problems(text) == [
        (5, "environments[0].steps", "must be increasing percentages ending at 100 (got [50, 10, 100])"),
        (8, "environments[1].steps", "must be increasing percentages ending at 100 (got [10, 50])"),
        (11, "environments[2].steps", "only used with strategy canary (strategy is blue-green)"),
        (14, "environments[3].steps[0]", "must be greater than or equal to 1 (got 0)"),
        (16, "environments[4].step_hold_s", "only used with strategy canary (strategy is blue-green) (got 30)"),
        (17, "environments[4].max_error_rate", "only used with strategy canary (strategy is blue-green) (got 0.05)"),
        (20, "environments[5].step_hold_s", "must be greater than 0 (got 0)"),
        (21, "environments[5].max_error_rate", "must be less than or equal to 1 (got 1.5)"),
        (23, "environments[6].max_p95_ms", "only used with strategy canary (strategy is blue-green) (got 50)"),
    ]


def test_duplicate_environment_reported_with_other_problems():
    text = """\
name: a
auto: maybe
environments:
  - name: production
  - name: staging
  - name: production
"""
    assert problems(text) == [
        (2, "auto", "must be true or false (got 'maybe')"),
        (6, "environments[2].name", "duplicate environment 'production' (first at environments[0])"),
    ]


def test_duplicate_environment_alone():
    assert problems("name: a\nenvironments:\n  - name: x\n  - name: x\n") == [
        (4, "environments[1].name", "duplicate environment 'x' (first at environments[0])")]


def test_duplicate_yaml_key_is_a_problem_not_silently_last_wins():
    assert problems("name: a\nauto: true\nauto: false\n") == [
        (3, "auto", "duplicate key; YAML would silently keep only the last")]


def test_wrong_shapes():
    text = """\
name: a
match: [iris]
environments: []
smoke: 3
retention:
  keep_deployments: 1.5
"""
    assert problems(text) == [
        (2, "match", "must be a mapping (got a list)"),
        (3, "environments", "must have at least 1 item"),
        (4, "smoke", "must be a mapping (got 3)"),
        (6, "retention.keep_deployments", "must be a whole number (got 1.5)"),
    ]


def test_null_tag_value_and_empty_models():
    assert problems("name: a\nmatch:\n  models: []\n  tags:\n    deploy:\n") == [
        (3, "match.models", "must have at least 1 item"),
        (5, "match.tags.deploy", "must be a string (got null)"),
    ]


def test_yaml_syntax_error_has_line():
    with pytest.raises(InvalidPolicy) as info:
        parse_policy("name: a\nenvironments:\n  - name: [production\n", "bad.yaml")
    (p,) = info.value.problems
    assert p.path == ""
    assert p.line == 4
    assert p.message.startswith("invalid YAML: ")
    assert info.value.message.startswith("bad.yaml:4: invalid YAML: ")
    assert info.value.field is None


@pytest.mark.parametrize(("text", "expected"), [
    ("", "<policy>: policy is empty; it needs at least `name:`"),
    ("# only a comment\n", "<policy>: policy is empty; it needs at least `name:`"),
    ("- name: a\n", "<policy>:1: a release policy must be a mapping (got a list)"),
    ("just text\n", "<policy>:1: a release policy must be a mapping (got 'just text')"),
])
def test_document_that_is_not_a_policy(text: str, expected: str):
    with pytest.raises(InvalidPolicy) as info:
        parse_policy(text)
    assert info.value.message == expected


def test_two_documents_are_refused():
    with pytest.raises(InvalidPolicy, match=r"invalid YAML: expected a single document"):
        parse_policy("name: a\n---\nname: b\n")


def test_alias_bomb_is_refused_quickly():
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    with pytest.raises(InvalidPolicy, match="too large or too deep"):
        parse_policy("\n".join(lines) + "\nname: a\n")


def test_recursive_alias_is_refused():
    with pytest.raises(InvalidPolicy, match="too large or too deep"):
        parse_policy("name: a\nmatch: &m\n  models: *m\n")


def test_from_dict_validates_without_lines():
    with pytest.raises(InvalidPolicy) as info:
        Policy.from_dict({"name": "a", "environments": [{"name": "p", "strategy": "bg"}]}, "api")
    assert [(p.line, p.path) for p in info.value.problems] == [(None, "environments[0].strategy")]
    assert info.value.message.startswith("api: environments[0].strategy: must be one of")


def test_render_path():
    assert render_path(("environments", 0, "strategy")) == "environments[0].strategy"
    assert render_path(()) == ""
    assert Problem("a.b", "bad", 3).render("x.yaml") == "x.yaml:3: a.b: bad"
    assert Problem("", "bad").render("x.yaml") == "x.yaml: bad"


# --- snapshot ----------------------------------------------------------------------------------


def test_to_dict_round_trips_and_revision_is_content_hash():
    p = parse_policy(EXAMPLE)
    d = p.to_dict()
    assert d["environments"] == [{"name": "production", "target": "process", "strategy": "blue-green",
                                  "steps": None, "step_hold_s": None, "max_error_rate": None, "max_p95_ms": None,
                                  "approval": False,
                                  "approval_timeout_s": None, "scoring_workers": 2, "idle": None,
                                  "resources": {"cpu": None, "memory": None}, "env": {}, "network": None,
                                  "auth": "key", "shadow_s": None, "sample_rate": 1.0, "mirror": False,
                                  "analysis": None, "watch": None, "gates": {"evaluation": None}}]
    assert d["match"] == {"models": ["iris*"], "tags": {"deploy": "true"}, "sources": ["native", "mlflow"]}
    assert Policy.from_dict(d) == p
    snap = p.snapshot()
    assert snap == {"name": "iris-auto", "revision": p.revision, "policy": d}
    assert len(p.revision) == 16
    assert parse_policy(EXAMPLE.replace("p95_ms: 500", "p95_ms: 500.0")).revision == p.revision
    assert parse_policy(EXAMPLE.replace("p95_ms: 500", "p95_ms: 400")).revision != p.revision


def test_policy_is_immutable():
    with pytest.raises(ValueError, match="frozen"):
        DEFAULT_POLICY.auto = False  # type: ignore[misc]


# --- default and selection ------------------------------------------------------------------------


def test_default_policy():
    d = DEFAULT_POLICY
    assert d.name == "default" and d.auto is True and d.runner is Runner.LOCAL
    assert d.match.models == ("*",) and d.match.sources is None
    assert [(e.name, e.target, e.strategy) for e in d.environments] == [
        ("production", TargetKind.PROCESS, Strategy.BLUE_GREEN)]
    assert d.environment("production") is d.environments[0]
    assert d.environment("staging") is None


def pol(text: str) -> Policy:
    return parse_policy(text)


ANY = pol("name: any\n")
IRIS = pol("name: iris\nmatch: {models: ['iris*']}\n")
IRIS_PROD = pol("name: iris-prod\nmatch: {models: ['iris-prod*']}\n")
IRIS_EXACT = pol("name: iris-exact\nmatch: {models: ['iris']}\n")
TAGGED = pol("name: tagged\nmatch: {models: ['*'], tags: {deploy: 'true'}}\n")
TWO_TAGS = pol("name: two-tags\nmatch: {models: ['*'], tags: {deploy: 'true', team: 'a'}}\n")
MLFLOW_ONLY = pol("name: from-mlflow\nmatch: {models: ['iris*'], sources: [mlflow]}\n")


def test_no_policies_or_no_match_gives_default():
    assert select_policy([], "iris", {}, "native") is DEFAULT_POLICY
    assert select_policy([IRIS], "wine", {}, "native") is DEFAULT_POLICY
    assert select_policy([TAGGED], "iris", {"deploy": "false"}, "native") is DEFAULT_POLICY
    assert select_policy([MLFLOW_ONLY], "iris", {}, "native") is DEFAULT_POLICY


def test_source_filter():
    assert select_policy([MLFLOW_ONLY], "iris", {}, "mlflow") is MLFLOW_ONLY
    assert select_policy([MLFLOW_ONLY], "iris", {}, Source.MLFLOW) is MLFLOW_ONLY


def test_more_tag_filters_win_over_longer_prefix():
    everything = [ANY, IRIS, IRIS_PROD, TAGGED, TWO_TAGS]
    assert select_policy(everything, "iris-prod-1", {"deploy": "true", "team": "a"}, "native") is TWO_TAGS
    assert select_policy(everything, "iris-prod-1", {"deploy": "true"}, "native") is TAGGED


def test_longer_literal_prefix_wins():
    assert select_policy([ANY, IRIS, IRIS_PROD], "iris-prod-1", {}, "native") is IRIS_PROD
    assert select_policy([IRIS_PROD, IRIS, ANY], "iris-dev", {}, "native") is IRIS
    assert select_policy([IRIS, ANY], "wine", {}, "native") is ANY


def test_exact_name_beats_glob_with_same_prefix():
    assert select_policy([IRIS, IRIS_EXACT], "iris", {}, "native") is IRIS_EXACT
    assert select_policy([IRIS_EXACT, IRIS], "iris2", {}, "native") is IRIS


def test_the_most_specific_matching_glob_of_a_policy_counts():
    broad_and_narrow = pol("name: zz\nmatch: {models: ['*', 'iris-prod*']}\n")
    assert select_policy([IRIS, broad_and_narrow], "iris-prod-1", {}, "native") is broad_and_narrow
    assert select_policy([IRIS, broad_and_narrow], "iris-dev", {}, "native") is IRIS


def test_tie_broken_by_name_then_list_order():
    b = pol("name: b\nmatch: {models: ['iris*']}\n")
    a = pol("name: a\nmatch: {models: ['iris*']}\n")
    assert select_policy([b, a], "iris", {}, "native") is a
    a2 = pol("name: a\nmatch: {models: ['iris*']}\nauto: false\n")
    assert select_policy([a2, a], "iris", {}, "native") is a2


def test_globs_are_case_sensitive_fnmatch():
    q = pol("name: q\nmatch: {models: ['iris-?', 'wine-[ab]']}\n")
    assert select_policy([q], "iris-1", {}, "native") is q
    assert select_policy([q], "wine-b", {}, "native") is q
    assert select_policy([q], "wine-c", {}, "native") is DEFAULT_POLICY
    assert select_policy([IRIS], "IRIS", {}, "native") is DEFAULT_POLICY


def test_approval_gate_rules() -> None:
    env = parse_policy("name: a\nenvironments:\n  - name: production\n    approval: true\n"
                       "    approval_timeout_s: 3600\n").environments[0]
    assert (env.approval, env.approval_timeout_s) == (True, 3600.0)
    text = """\
name: a
environments:
  - name: one
    approval_timeout_s: 60
  - name: two
    approval: true
    approval_timeout_s: 0
"""
    assert problems(text) == [
        (4, "environments[0].approval_timeout_s", "only used with approval: true (got 60)"),
        (7, "environments[1].approval_timeout_s", "must be greater than 0 (got 0)"),
    ]
    with pytest.raises(InvalidPolicy, match="approval gates of runner github are the CI system's own"):
        parse_policy("name: a\nrunner: github\npipeline: {repo: acme/m, token_env: GH}\n"
                     "environments:\n  - name: production\n    approval: true\n")


def test_env_values_can_be_secret_references() -> None:
    p = Policy.from_dict({"name": "p", "environments": [{"name": "production", "env": {
        "A": "text", "N": 3, "B": {"secret_env": "DB_PASSWORD"}, "C": {"secret_file": "api-key"}}}]})
    env = p.environments[0].env
    assert env["A"] == "text" and env["N"] == "3"
    assert env["B"] == SecretRef(secret_env="DB_PASSWORD") and env["C"] == SecretRef(secret_file="api-key")
    assert Policy.from_dict(p.to_dict()) == p  # snapshots replay


@pytest.mark.parametrize(("value", "message"), [
    ({"secret_env": "DB", "secret_file": "x"}, "environments[0].env.B: give exactly one of secret_env or secret_file"),
    ({"secret_env": "1bad"}, "environments[0].env.B.secret_env: must be an environment variable name"),
    ({"secret_file": "../etc/passwd"}, "environments[0].env.B.secret_file: must be a file name"),
    ({"secret_envv": "X"}, "environments[0].env.B.secret_envv: unknown key (did you mean 'secret_env'?)"),
])
def test_bad_secret_references_name_the_field(value: object, message: str) -> None:
    with pytest.raises(InvalidPolicy) as e:
        Policy.from_dict({"name": "p", "environments": [{"name": "production", "env": {"B": value}}]})
    assert message in str(e.value)


# --- the evaluation gate -------------------------------------------------------------------------


def test_evaluation_gate_thresholds_follow_the_metrics_direction():
    p = parse_policy("name: gated\ngates:\n  evaluation: {data: s3://eval/iris.csv, label: species, metric: accuracy, "
                     "min: 0.9, max_drop_vs_champion: 0.01, max_age_s: 86400}\n")
    gate = p.evaluation_gate(p.environments[0])
    assert gate is not None and gate.thresholds() == "accuracy >= 0.9, at most 0.01 below the champion's"
    own = parse_policy("name: own\ngates:\n  evaluation: {data: a.csv, label: y, min: 0.5}\nenvironments:\n"
                       "  - name: production\n    gates:\n      evaluation: {data: b.csv, label: y, metric: rmse, "
                       "max: 2, max_rise_vs_champion: 0.1}\n")
    assert own.evaluation_gate(own.environments[0]).data == "b.csv"  # the environment's own wins
    assert problems("name: g\ngates:\n  evaluation: {data: x.csv, label: y, metric: rmse, min: 0.3}\n") == [
        (3, "gates.evaluation", "rmse is an error metric (lower is better): use max and max_rise_vs_champion "
                                "instead of min")]
    assert problems("name: g\ngates:\n  evaluation: {data: x.csv, label: y, max_rise_vs_champion: 0.1}\n") == [
        (3, "gates.evaluation", "accuracy: higher is better: use min and max_drop_vs_champion instead of "
                                "max_rise_vs_champion")]
    assert problems("name: g\ngates:\n  evaluation: {data: x.csv, label: y, metric: auc, min: 0.3}\n") == [
        (3, "gates.evaluation.metric", "must be one of accuracy, f1, precision, recall, roc_auc, rmse, mae, r2 "
                                       "(got 'auc')")]
    assert problems("name: g\ngates:\n  evaluation: {data: x.csv, label: y}\n") == [
        (3, "gates.evaluation", "set min or max_drop_vs_champion: a gate without a limit never fails")]
    assert problems("name: g\nrunner: github\npipeline: {repo: a/b}\ngates:\n  evaluation: {data: x.csv, label: y, "
                    "min: 0.9}\n")[0][1:] == (
        "gates.evaluation", "evaluation gates run with runner local: the service scores the labelled data between "
                            "build and deploy; use runner: local or drop the gate")
