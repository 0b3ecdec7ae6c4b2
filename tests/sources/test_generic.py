"""The generic signed hook: Stripe-like signature, delivery ids and the registration body."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from modelcd.domain import Source as Kind
from modelcd.sources import Accepted, HookRequest, Ignored, Registered, get_source
from modelcd.sources.base import Source
from tests.sources.conftest import GENERIC_BODY, GENERIC_SECRET, NOW, generic_request, make_settings, refused


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return get_source("generic", make_settings(tmp_path))


def test_signature_is_the_documented_hmac(source: Source) -> None:
    body = b'{"model": "churn", "version": "3"}'
    v1 = hmac.new(GENERIC_SECRET.encode(), b"1767225600." + body, hashlib.sha256).hexdigest()
    req = HookRequest("POST", {"X-Modelcd-Signature": f"t=1767225600,v1={v1}"}, {}, body)
    result = source.receive(req, NOW)
    assert result == Accepted("sha256:" + hashlib.sha256(body).hexdigest(), {})
    assert source.normalise(body, {}) == [Registered(Kind.NATIVE, "churn", "3", "generic:churn/3", None)]


def test_delivery_id_header_and_fields(source: Source) -> None:
    req = generic_request(GENERIC_BODY)
    result = source.receive(req, NOW)
    assert result == Accepted("ci-run-17", {"x-modelcd-delivery-id": "ci-run-17", "content-type": "application/json"})
    assert source.normalise(req.body, result.kept_headers) == [Registered(
        Kind.NATIVE, "churn", "3", "s3://models/churn/3/", "s3://models/churn/3/", {"deploy": "true"})]


def test_body_may_name_the_source_and_skip_the_release(source: Source) -> None:
    body = json.dumps({"model": "churn", "version": "4", "artifact_uri": "models:/churn/4", "source": "mlflow",
                       "release": False, "description": "retrained", "external_ref": "run-88"}).encode()
    [event] = source.normalise(body, {})
    assert event == Registered(Kind.MLFLOW, "churn", "4", "run-88", "models:/churn/4", {}, "retrained", False)


def test_rotated_secrets_one_v1_must_match(source: Source) -> None:
    req = generic_request(GENERIC_BODY)
    sig = req.header("x-modelcd-signature")
    rotated = HookRequest("POST", {**req.headers, "x-modelcd-signature": sig.replace("v1=", "v1=00ff,v1=")}, {},
                          req.body)
    assert isinstance(source.receive(rotated, NOW), Accepted)


def test_signature_header_problems(source: Source) -> None:
    req = generic_request(GENERIC_BODY)
    v1 = req.header("x-modelcd-signature").partition(",")[2]
    for value, needle in [(None, "X-Modelcd-Signature header is missing"), ("t=1767225600", "no v1= signature"),
                          (f"t=soon,{v1}", "not unix seconds"), (f"{v1}", "header is missing"),
                          (f"t=1767225601,{v1}", "does not match")]:
        headers = {k: v for k, v in req.headers.items() if k != "x-modelcd-signature"}
        if value is not None:
            headers["x-modelcd-signature"] = value
        refused(source, HookRequest("POST", headers, {}, req.body), 401, needle)


@pytest.mark.parametrize(("doc", "needle"), [
    ({"version": "1"}, "body.model: missing"),
    ({"model": "m"}, "body.version: missing"),
    ({"model": "m", "version": True}, "body.version: must be a non-empty string"),
    ({"model": "m", "version": "1", "artifact_uri": "file:///etc/passwd"}, "body.artifact_uri"),
    ({"model": "m", "version": "1", "source": "pypi"}, "body.source: must be one of native, mlflow"),
    ({"model": "m", "version": "1", "source": ["x"]}, "body.source"),
    ({"model": "m", "version": "1", "release": "yes"}, "body.release"),
    ({"model": "m", "version": "1", "tags": {"a": {"b": 1}}}, "body.tags.a"),
    ({"model": "m", "version": "1", "tags": ["a"]}, "body.tags: must be an object"),
])
def test_invalid_bodies_are_400(source: Source, doc: dict[str, object], needle: str) -> None:
    refused(source, generic_request(json.dumps(doc).encode()), 400, needle)


def test_other_events_are_ignored(source: Source) -> None:
    [event] = source.normalise(b'{"event": "ping"}', {})
    assert isinstance(event, Ignored) and "'ping'" in event.reason
