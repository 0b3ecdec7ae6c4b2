"""What every source must do: accept an authentic delivery, refuse a tampered, wrongly
keyed, unconfigured, stale, malformed or oversize one with the right status and a message
that names the fix but never a secret, and ignore events that announce no version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from modelcd.config import Settings
from modelcd.errors import NotFound
from modelcd.sources import KNOWN_SOURCES, Accepted, HookRequest, Ignored, Registered, Respond, get_source
from modelcd.sources.base import batch_id, safe_delivery_id
from tests.sources.conftest import NOW, WRONG, Kit, make_settings, refused

KITS = ["mlflow", "generic", "azureml", "s3", "sagemaker-eventbridge", "sagemaker-sns"]
SIGNED = ["mlflow", "generic", "sagemaker-sns"]


def _setup(kits: dict[str, Kit], name: str, tmp_path: Path, **overrides: object) -> tuple[Kit, object]:
    kit = kits[name]
    return kit, kit.make(make_settings(tmp_path, **overrides))


@pytest.mark.parametrize("name", KITS)
def test_authentic_delivery_is_accepted_and_normalised(kits: dict[str, Kit], name: str, tmp_path: Path) -> None:
    kit, source = _setup(kits, name, tmp_path)
    req = kit.deliver(kit.valid)
    result = source.receive(req, NOW)
    assert isinstance(result, Accepted) and result.delivery_id
    assert source.receive(req, NOW) == result  # a retry names the same delivery
    assert not any(k in result.kept_headers for k in ("authorization", "x-modelcd-secret", "x-modelcd-api-key"))
    assert not any("signature" in k for k in result.kept_headers)
    [event] = source.normalise(req.body, result.kept_headers)
    assert isinstance(event, Registered)
    assert (event.model, event.external_version) == ("churn", "3")
    assert event.dedup_key


@pytest.mark.parametrize("name", SIGNED)
def test_tampered_body_is_refused(kits: dict[str, Kit], name: str, tmp_path: Path) -> None:
    kit, source = _setup(kits, name, tmp_path)
    req = kit.deliver(kit.valid)
    tampered = dataclasses.replace(req, body=req.body.replace(b"churn", b"churm", 1))
    assert tampered.body != req.body
    refused(source, tampered, 401, "does not match")


@pytest.mark.parametrize("name", KITS)
def test_wrong_secret_is_refused(kits: dict[str, Kit], name: str, tmp_path: Path) -> None:
    kit, source = _setup(kits, name, tmp_path)
    refused(source, kit.deliver(kit.valid, secret=WRONG), 401, "does not match")


@pytest.mark.parametrize("name", KITS)
def test_unset_secret_refuses_every_delivery_naming_the_setting(kits: dict[str, Kit], name: str,
                                                                 tmp_path: Path) -> None:
    kit = kits[name]
    unset = [] if kit.setting == "hooks_sns_topic_arns" else None
    source = kit.make(make_settings(tmp_path, **{kit.setting: unset}))
    refused(source, kit.deliver(kit.valid), 401, "MODELCD_" + kit.setting.upper())


@pytest.mark.parametrize("name", [n for n in KITS if n in ("mlflow", "generic", "sagemaker-sns")])
def test_replayed_old_delivery_is_refused(kits: dict[str, Kit], name: str, tmp_path: Path) -> None:
    kit, source = _setup(kits, name, tmp_path)
    old = kit.deliver(kit.valid, ts=NOW - 2 * 3600)
    refused(source, old, 401, "replay window")
    future = kit.deliver(kit.valid, ts=NOW + 2 * 3600)
    refused(source, future, 401, "in the future")


def test_sources_with_timestamps_are_the_expected_ones(kits: dict[str, Kit]) -> None:
    assert sorted(n for n, k in kits.items() if k.timestamped) == ["generic", "mlflow", "sagemaker-sns"]


@pytest.mark.parametrize("name", KITS)
def test_malformed_json_is_400(kits: dict[str, Kit], name: str, tmp_path: Path) -> None:
    kit, source = _setup(kits, name, tmp_path)
    err = refused(source, kit.bad_json(), 400, "not valid JSON")
    assert err.code == "invalid_input"


@pytest.mark.parametrize("name", KITS)
def test_oversize_body_is_413(kits: dict[str, Kit], name: str, tmp_path: Path) -> None:
    kit, source = _setup(kits, name, tmp_path, hooks_max_body_bytes=64)
    refused(source, kit.deliver(kit.valid), 413, "MODELCD_HOOKS_MAX_BODY_BYTES")


@pytest.mark.parametrize("name", KITS)
def test_other_event_types_are_ignored_with_a_reason(kits: dict[str, Kit], name: str, tmp_path: Path) -> None:
    kit, source = _setup(kits, name, tmp_path)
    req = kit.deliver(kit.unknown)
    result = source.receive(req, NOW)
    assert isinstance(result, Accepted)
    [event] = source.normalise(req.body, result.kept_headers)
    assert isinstance(event, Ignored) and len(event.reason) > 10


@pytest.mark.parametrize("name", ["mlflow", "generic", "sagemaker-eventbridge"])
def test_other_methods_get_405(kits: dict[str, Kit], name: str, tmp_path: Path) -> None:
    _, source = _setup(kits, name, tmp_path)
    result = source.receive(HookRequest("GET", {}, {}, b""), NOW)
    assert isinstance(result, Respond) and result.status == 405 and "POST" in result.headers["Allow"]


def test_get_source_knows_every_source() -> None:
    settings = Settings()
    assert list(KNOWN_SOURCES) == ["mlflow", "azureml", "sagemaker", "s3", "generic"]
    for name in KNOWN_SOURCES:
        assert get_source(name, settings).name == name


def test_unknown_source_lists_the_known_ones() -> None:
    with pytest.raises(NotFound) as info:
        get_source("github", Settings())
    assert "mlflow, azureml, sagemaker, s3, generic" in info.value.message
    assert info.value.http_status == 404


def test_hook_request_headers_are_case_insensitive() -> None:
    req = HookRequest("post", {"X-MLflow-Timestamp": "1", "Content-TYPE": "a"}, {"code": "x"}, b"")
    assert req.method == "POST"
    assert req.header("x-mlflow-timestamp") == "1" and req.header("CONTENT-type") == "a"
    assert req.headers == {"x-mlflow-timestamp": "1", "content-type": "a"}
    assert req.header("missing", "d") == "d"


def test_delivery_ids_are_safe_and_deterministic() -> None:
    assert safe_delivery_id("3f1c2a7e-0000") == "3f1c2a7e-0000"
    odd = safe_delivery_id("has space\nand newline")
    assert odd.startswith("sha256:") and odd == safe_delivery_id("has space\nand newline")
    assert safe_delivery_id("x" * 129).startswith("sha256:")
    assert batch_id(["a"]) == "a"
    assert batch_id(["a", "b", "c"]) == batch_id(["a", "b", "c"]) != batch_id(["a", "c", "b"])
    assert batch_id(["a", "b", "c"]).startswith("a+2:")


def test_registered_dedup_key_defaults_to_source_and_ref() -> None:
    from modelcd.domain import Source

    event = Registered(Source.MLFLOW, "churn", "3", "models:/churn/3", "models:/churn/3")
    assert event.dedup_key == "mlflow:models:/churn/3"
    assert event.release is True and event.tags == {} and event.description == ""
