"""MLflow webhooks: the integrations.md test vector, the real sender (MLflow's own delivery
code posting to a loopback server), and what each event normalises to."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelcd.domain import Source as Kind
from modelcd.errors import InvalidInput
from modelcd.sources import Accepted, HookRequest, Ignored, Registered, get_source
from modelcd.sources.base import Source
from modelcd.sources.mlflow import sign
from tests.sources.conftest import MLFLOW_BODY, MLFLOW_SECRET, NOW, HookServer, make_settings, mlflow_request, refused

# integrations.md §1: "With secret s3cr3t, the headers and the one-line body above form a valid test vector"
VECTOR_BODY = (b'{"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00", '
               b'"data": {"name": "churn", "version": "3", "source": "models:/m-abc", "run_id": null, "tags": {}, '
               b'"description": null}}')
VECTOR_HEADERS = {"Content-Type": "application/json",
                  "X-MLflow-Delivery-Id": "3f1c2a7e-0000-4000-8000-000000000001",
                  "X-MLflow-Timestamp": "1767225600",
                  "X-MLflow-Signature": "v1,oA9hcIAgZqnxDXJoL3GXcg2cY80+QfpNeNT7Ocy2dJI=",
                  "User-Agent": "python-requests/2.32.3"}


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return get_source("mlflow", make_settings(tmp_path))


def test_integrations_test_vector() -> None:
    src = get_source("mlflow", make_settings(hooks_mlflow_secret="s3cr3t"))
    req = HookRequest("POST", VECTOR_HEADERS, {}, VECTOR_BODY)
    result = src.receive(req, NOW + 30)
    assert result == Accepted("3f1c2a7e-0000-4000-8000-000000000001", {
        "content-type": "application/json", "x-mlflow-delivery-id": "3f1c2a7e-0000-4000-8000-000000000001",
        "x-mlflow-timestamp": "1767225600", "user-agent": "python-requests/2.32.3"})
    assert src.normalise(req.body, result.kept_headers) == [Registered(
        source=Kind.MLFLOW, model="churn", external_version="3", external_ref="models:/churn/3",
        artifact_uri="models:/churn/3", tags={}, description="", release=True, dedup_key="mlflow:models:/churn/3")]
    assert sign("s3cr3t", "3f1c2a7e-0000-4000-8000-000000000001", "1767225600", VECTOR_BODY) == \
        VECTOR_HEADERS["X-MLflow-Signature"]


def test_vector_with_another_secret_or_changed_header_is_refused() -> None:
    src = get_source("mlflow", make_settings(hooks_mlflow_secret="s3cr3t"))
    for name, value in [("X-MLflow-Delivery-Id", "3f1c2a7e-0000-4000-8000-000000000002"),
                        ("X-MLflow-Timestamp", "1767225601"),
                        ("X-MLflow-Signature", "v1,oA9hcIAgZqnxDXJoL3GXcg2cY80+QfpNeNT7Ocy2dJA=")]:
        refused(src, HookRequest("POST", {**VECTOR_HEADERS, name: value}, {}, VECTOR_BODY), 401, "does not match",
                "MODELCD_HOOKS_MLFLOW_SECRET")


def test_draft_docs_signature_format_is_refused(source: Source) -> None:
    import hashlib
    import hmac

    req = mlflow_request(MLFLOW_BODY)
    draft = "sha256=" + hmac.new(MLFLOW_SECRET.encode(), MLFLOW_BODY, hashlib.sha256).hexdigest()
    refused(source, HookRequest("POST", {**req.headers, "x-mlflow-signature": draft}, {}, req.body), 401)


def test_missing_headers_say_what_to_send(source: Source) -> None:
    req = mlflow_request(MLFLOW_BODY)
    for header, needle in [("x-mlflow-signature", "give the MLflow webhook a secret"),
                           ("x-mlflow-delivery-id", "X-MLflow-Delivery-Id header is missing"),
                           ("x-mlflow-timestamp", "X-MLflow-Timestamp header is missing")]:
        headers = {k: v for k, v in req.headers.items() if k != header}
        refused(source, HookRequest("POST", headers, {}, req.body), 401, needle)
    millis = mlflow_request(MLFLOW_BODY, ts=NOW * 1000)  # the draft docs' milliseconds
    refused(source, millis, 401, "in the future")


def test_replay_window_edges(source: Source) -> None:
    req = mlflow_request(MLFLOW_BODY)
    assert isinstance(source.receive(req, NOW + 300), Accepted)
    assert isinstance(source.receive(req, NOW - 300), Accepted)
    refused(source, req, 401, "301 s old", "MODELCD_HOOKS_REPLAY_WINDOW_S", now=NOW + 301)


def test_one_of_several_signatures_may_match(source: Source) -> None:
    req = mlflow_request(MLFLOW_BODY)
    both = f"v1,AAAA {req.header('x-mlflow-signature')}"
    assert isinstance(source.receive(dataclasses.replace(req, headers={**req.headers, "x-mlflow-signature": both}),
                                     NOW), Accepted)


def test_model_version_created_keeps_tags_and_description(source: Source) -> None:
    body = json.dumps({"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": "fraud.v2", "version": "12", "source": "models:/m-1", "run_id": "r1",
                                "tags": {"deploy": "true", "tier": "1"}, "description": "gbm, café"}}).encode()
    [event] = source.normalise(body, {})
    assert event == Registered(Kind.MLFLOW, "fraud.v2", "12", "models:/fraud.v2/12", "models:/fraud.v2/12",
                               {"deploy": "true", "tier": "1"}, "gbm, café")


@pytest.mark.parametrize(("entity", "action", "data"), [
    ("model_version_tag", "set", {"name": "churn", "version": "3", "key": "deploy", "value": "true"}),
    ("model_version_tag", "deleted", {"name": "churn", "version": "3", "key": "deploy"}),
    ("model_version_alias", "created", {"name": "churn", "alias": "champion", "version": "3"}),
    ("model_version_alias", "deleted", {"name": "churn", "alias": "champion"}),
    ("registered_model", "created", {"name": "churn", "tags": {}, "description": None}),
])
def test_other_mlflow_events_are_ignored(source: Source, entity: str, action: str, data: dict[str, object]) -> None:
    body = json.dumps({"entity": entity, "action": action, "timestamp": "t", "data": data}).encode()
    [event] = source.normalise(body, {})
    assert isinstance(event, Ignored) and f"{entity}.{action}" in event.reason


def test_mlflow_test_delivery_is_ignored(source: Source) -> None:
    body = json.dumps({"entity": "model_version", "action": "created", "timestamp": "t", "data": {
        "name": "example_model", "version": "1", "source": "models:/123", "run_id": "abcd1234abcd5678",
        "tags": {"example_key": "example_value"}, "description": "An example model version"}}).encode()
    [event] = source.normalise(body, {})
    assert isinstance(event, Ignored) and "test delivery" in event.reason


def test_missing_fields_are_400_at_receive(source: Source) -> None:
    body = b'{"entity": "model_version", "action": "created", "data": {"version": "3"}}'
    err = refused(source, mlflow_request(body), 400, "data.name: missing")
    assert err.field == "data.name"
    refused(source, mlflow_request(b'["not", "an", "object"]'), 400, "must be a JSON object")
    with pytest.raises(InvalidInput, match="data: must be a JSON object"):
        source.normalise(b'{"entity": "model_version", "action": "created", "data": null}', {})


# --- the real sender ----------------------------------------------------------------------------


@pytest.fixture
def mlflow_delivery(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    delivery = pytest.importorskip("mlflow.webhooks.delivery")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    monkeypatch.setenv("MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES", "0")
    yield delivery


def _webhook(url: str, secret: str) -> object:
    from mlflow.entities.webhook import Webhook, WebhookEvent

    return Webhook(webhook_id="wh-1", name="modelcd", url=url, events=[WebhookEvent("model_version", "created")],
                   creation_timestamp=0, last_updated_timestamp=0, secret=secret)


def test_mlflow_signing_function_agrees(mlflow_delivery: object) -> None:
    payload = '{"entity": "model_version", "data": {"name": "caf\\u00e9"}}'
    theirs = mlflow_delivery._generate_hmac_signature(MLFLOW_SECRET, "id-1", "1767225600", payload)
    assert theirs == sign(MLFLOW_SECRET, "id-1", "1767225600", payload.encode())


def test_real_mlflow_delivery_round_trip(mlflow_delivery: object, hook_server: Callable[[Source], HookServer],
                                         tmp_path: Path) -> None:
    from mlflow.entities.webhook import WebhookEvent

    hook = hook_server(get_source("mlflow", make_settings(tmp_path)))
    payload = {"name": "churn", "version": "3", "source": "models:/m-abc", "run_id": None,
               "tags": {"deploy": "true"}, "description": None}
    event = WebhookEvent("model_version", "created")
    session = mlflow_delivery._get_or_create_webhook_session()
    response = mlflow_delivery._send_webhook_request(_webhook(hook.url, MLFLOW_SECRET), payload, event, session)
    assert response.status_code == 202, response.text
    [(req, result)] = hook.seen
    assert isinstance(result, Accepted) and result.delivery_id == req.header("x-mlflow-delivery-id")
    [registered] = hook.source.normalise(req.body, result.kept_headers)
    assert registered == Registered(Kind.MLFLOW, "churn", "3", "models:/churn/3", "models:/churn/3",
                                    {"deploy": "true"})


def test_real_mlflow_test_webhook_is_accepted_then_ignored(mlflow_delivery: object, tmp_path: Path,
                                                            hook_server: Callable[[Source], HookServer]) -> None:
    hook = hook_server(get_source("mlflow", make_settings(tmp_path)))
    result = mlflow_delivery.test_webhook(_webhook(hook.url, MLFLOW_SECRET))
    assert result.success and result.response_status == 202, result.error_message
    [(req, accepted)] = hook.seen
    [event] = hook.source.normalise(req.body, accepted.kept_headers)
    assert isinstance(event, Ignored) and "test delivery" in event.reason


def test_real_mlflow_delivery_with_another_secret_gets_401(mlflow_delivery: object, tmp_path: Path,
                                                           hook_server: Callable[[Source], HookServer]) -> None:
    hook = hook_server(get_source("mlflow", make_settings(tmp_path)))
    result = mlflow_delivery.test_webhook(_webhook(hook.url, "not-the-secret-123"))
    assert not result.success and result.response_status == 401
    assert "MODELCD_HOOKS_MLFLOW_SECRET" in result.response_body
    assert "not-the-secret-123" not in result.response_body and MLFLOW_SECRET not in result.response_body
