"""Name, tag, environment and description checks: literal inputs, no fixtures."""

from __future__ import annotations

import pytest

from modelcd.errors import InvalidInput
from modelcd.registry.names import (
    validate_description,
    validate_environment_name,
    validate_model_name,
    validate_tags,
)


@pytest.mark.parametrize("name", ["a", "iris", "Iris-Classifier_v2.1", "0model", "a" * 64, "x.y-z_0"])
def test_valid_model_names_pass_unchanged(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(("name", "problems", "suggestion"), [
    ("", ["it is empty"], "'model'"),
    ("-iris", ["starts with '-'"], "'iris'"),
    (".hidden", ["starts with '.'"], "'hidden'"),
    ("my model", ["contains ' '"], "'my-model'"),
    ("a/../b", ["contains '/'"], "'a-..-b'"),
    ("fraud$(touch pwned)", ["contains '$', '(', ' ', ')'"], "'fraud-touch-pwned'"),
    ("x\ny", ["contains '\\n'"], "'x-y'"),
    ("a" * 65, ["65 characters long (at most 64)"], "'" + "a" * 64 + "'"),
    ("_bad name!" + "b" * 70, ["characters long", "starts with '_'", "contains ' ', '!'"], "'bad-name-"),
])
def test_bad_model_name_lists_every_problem_and_suggests_a_fix(name: str, problems: list[str],
                                                               suggestion: str) -> None:
    with pytest.raises(InvalidInput) as e:
        validate_model_name(name)
    assert e.value.field == "name"
    for problem in problems:
        assert problem in e.value.message
    assert f"try {suggestion}" in e.value.message
    assert "letters, digits, '.', '_' and '-'" in e.value.message


def test_suggested_model_name_is_itself_valid() -> None:
    for bad in ["-a b", "__x__", "héllo wörld", "a" * 100, "!!!", "${{ github.token }}"]:
        with pytest.raises(InvalidInput) as e:
            validate_model_name(bad)
        suggestion = e.value.message.rsplit("try ", 1)[1].strip("'")
        assert validate_model_name(suggestion) == suggestion


def test_model_name_field_and_type() -> None:
    with pytest.raises(InvalidInput) as e:
        validate_model_name(42, field="model")
    assert e.value.field == "model"
    assert "must be a string" in e.value.message and "'my-model'" in e.value.message


@pytest.mark.parametrize("name", ["staging", "production", "prod-eu-1", "a", "0", "a" * 32])
def test_valid_environment_names(name: str) -> None:
    assert validate_environment_name(name) == name


@pytest.mark.parametrize(("name", "problem", "suggestion"), [
    ("Staging", "contains 'S'", "'staging'"),
    ("prod_eu", "contains '_'", "'prod-eu'"),
    ("-prod", "starts with '-'", "'prod'"),
    ("a" * 33, "33 characters long (at most 32)", "'" + "a" * 32 + "'"),
    ("", "it is empty", "'production'"),
    ("prod.1", "contains '.'", "'prod-1'"),
])
def test_bad_environment_names(name: str, problem: str, suggestion: str) -> None:
    with pytest.raises(InvalidInput) as e:
        validate_environment_name(name)
    assert e.value.field == "environment"
    assert problem in e.value.message
    assert f"try {suggestion}" in e.value.message


def test_valid_tags_pass() -> None:
    tags = {"team": "fraud detection", "stage": "candidate", "git.sha": "3f2a9c", "owner_email": "a@b.c",
            "k" * 63: "v" * 256, "unicode": "ünïcødé ✓"}
    assert validate_tags(tags) == tags
    assert validate_tags(None) == {}
    assert validate_tags({}) == {}


@pytest.mark.parametrize(("tags", "expected"), [
    ({"bad key": "v"}, ["key 'bad key'", "contains ' '", "try 'bad-key'"]),
    ({"-k": "v"}, ["key '-k'", "starts with '-'"]),
    ({"k" * 64: "v"}, ["64 characters long (at most 63)"]),
    ({"": "v"}, ["key ''", "it is empty"]),
    ({"k": "a\nb"}, ["value of 'k'", "non-printable", "'\\n'", "remove them"]),
    ({"k": "a\x1b[31m"}, ["'\\x1b'"]),
    ({"k": "tab\there"}, ["'\\t'"]),
    ({"k": "v" * 257}, ["257 characters long (at most 256)", "shorten it"]),
    ({"k": 3}, ["value of 'k' is a int", "quote it", "'3'"]),
    ({1: "v"}, ["key 1 is a int"]),
])
def test_bad_tags(tags: dict, expected: list[str]) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidInput) as e:
        validate_tags(tags)
    assert e.value.field == "tags"
    for text in expected:
        assert text in e.value.message


def test_bad_tags_are_all_listed_in_one_message() -> None:
    with pytest.raises(InvalidInput) as e:
        validate_tags({"a b": "ok", "c": "x\ny", "d": "v" * 300}, field="metadata.tags")
    assert e.value.field == "metadata.tags"
    assert "'a b'" in e.value.message and "value of 'c'" in e.value.message and "value of 'd'" in e.value.message


def test_tags_must_be_a_mapping_and_not_too_many() -> None:
    with pytest.raises(InvalidInput, match='e.g. {"team": "fraud"}') as e:
        validate_tags(["team=fraud"])
    assert e.value.field == "tags"
    with pytest.raises(InvalidInput, match=r"there are 65 tags \(at most 64\); drop some"):
        validate_tags({f"k{i}": "v" for i in range(65)})


def test_description_allows_newlines_and_tabs() -> None:
    text = "Iris classifier.\n\n\tTrained on 2024-05 data; ünïcødé fine."
    assert validate_description(text) == text
    assert validate_description(None) == ""
    assert validate_description("x" * 4096) == "x" * 4096


@pytest.mark.parametrize(("text", "expected"), [
    ("x" * 4097, ["4097 characters long (at most 4096)", "shorten it"]),
    ("bell\x07", ["'\\x07'", "remove them"]),
    ("carriage\rreturn", ["'\\r'"]),
    ("nul\x00", ["'\\x00'"]),
])
def test_bad_descriptions(text: str, expected: list[str]) -> None:
    with pytest.raises(InvalidInput) as e:
        validate_description(text)
    assert e.value.field == "description"
    for item in expected:
        assert item in e.value.message


def test_description_must_be_text() -> None:
    with pytest.raises(InvalidInput, match="pass plain text") as e:
        validate_description(["x"])
    assert e.value.field == "description"
