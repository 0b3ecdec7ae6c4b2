"""MinIO / S3 bucket notifications: MinIO's and AWS's record shapes, URL-encoded keys, the
marker layout, the HEAD probe and MinIO's token forms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modelcd.domain import Source as Kind
from modelcd.errors import ConfigError
from modelcd.sources import Accepted, HookRequest, Ignored, Registered, Respond, get_source
from modelcd.sources.base import Source
from tests.sources.conftest import NOW, S3_TOKEN, make_settings, refused, s3_body, s3_request

URI = "s3://models/models/churn/3/"
EXPECTED = Registered(Kind.S3, "churn", "3", URI, URI)


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return get_source("s3", make_settings(tmp_path))


def aws_body(key: str, event: str = "ObjectCreated:Put", **obj: Any) -> bytes:
    """An AWS S3 event notification record (eventVersion 2.1, no s3: prefix)."""
    return json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-01-01T00:00:00.000Z", "eventName": event,
        "userIdentity": {"principalId": "AWS:AIDA"}, "requestParameters": {"sourceIPAddress": "10.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D1", "x-amz-id-2": "FMyU"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "modelcd",
               "bucket": {"name": "ml-artifacts", "ownerIdentity": {"principalId": "A3"},
                          "arn": "arn:aws:s3:::ml-artifacts"},
               "object": {"key": key, "size": 1024, "eTag": "0123abcd", "versionId": "v1",
                          "sequencer": "0055AED6DCD90281E5", **obj}}}]}).encode()


def test_minio_record_on_the_marker(source: Source) -> None:
    req = s3_request(s3_body())
    result = source.receive(req, NOW)
    assert result == Accepted("models/models/churn/3/MLmodel@17A2B3C4D5E6F708", {"content-type": "application/json"})
    assert source.normalise(req.body, result.kept_headers) == [EXPECTED]
    assert EXPECTED.dedup_key == f"s3:{URI}"


def test_aws_record_with_encoded_key(source: Source) -> None:
    req = s3_request(aws_body("models/churn%2Dv2/2026.01/modelcd.yaml"))
    result = source.receive(req, NOW)
    assert isinstance(result, Accepted) and result.delivery_id == \
        "ml-artifacts/models/churn-v2/2026.01/modelcd.yaml@0055AED6DCD90281E5"
    [event] = source.normalise(req.body, {})
    assert event == Registered(Kind.S3, "churn-v2", "2026.01", "s3://ml-artifacts/models/churn-v2/2026.01/",
                               "s3://ml-artifacts/models/churn-v2/2026.01/")


def test_plus_in_a_key_is_a_space(source: Source) -> None:
    [event] = source.normalise(aws_body("models/my+model/1/MLmodel"), {})
    assert isinstance(event, Registered) and event.model == "my model"


@pytest.mark.parametrize("key", [
    "models/churn/3/model.pkl",  # not a marker
    "models/churn/3/sub/MLmodel",  # a marker, but not at the version folder
    "models/churn/MLmodel",  # no version folder
    "other/churn/3/MLmodel",  # outside the prefix
    "models/churn/../MLmodel",
    "models//3/MLmodel",
])
def test_other_objects_are_ignored(source: Source, key: str) -> None:
    [event] = source.normalise(aws_body(key), {})
    assert isinstance(event, Ignored) and "not a version marker" in event.reason


def test_only_object_created_counts(source: Source) -> None:
    [event] = source.normalise(s3_body(event="s3:ObjectRemoved:Delete"), {})
    assert isinstance(event, Ignored) and "ObjectRemoved:Delete" in event.reason
    [event] = source.normalise(aws_body("models/churn/3/MLmodel", "ObjectCreated:CompleteMultipartUpload"), {})
    assert isinstance(event, Registered)


def test_unknown_major_event_version_is_ignored(source: Source) -> None:
    doc = json.loads(aws_body("models/churn/3/MLmodel"))
    doc["Records"][0]["eventVersion"] = "3.0"
    [event] = source.normalise(json.dumps(doc).encode(), {})
    assert isinstance(event, Ignored) and "3.0" in event.reason


def test_s3_test_event_is_accepted_then_ignored(source: Source) -> None:
    body = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-01-01T00:00:00.000Z",
                       "Bucket": "ml-artifacts", "RequestId": "5582815E1AEA5ADF", "HostId": "8cLe"}).encode()
    req = s3_request(body)
    result = source.receive(req, NOW)
    assert isinstance(result, Accepted) and result.delivery_id == "s3:TestEvent:5582815E1AEA5ADF"
    [event] = source.normalise(body, {})
    assert isinstance(event, Ignored) and "test event" in event.reason


def test_delivery_id_falls_back_to_etag_then_body(source: Source) -> None:
    no_seq = aws_body("models/churn/3/MLmodel", sequencer=None)
    result = source.receive(s3_request(no_seq), NOW)
    assert isinstance(result, Accepted) and result.delivery_id.endswith("@0123abcd")
    bare = aws_body("models/churn/3/MLmodel", sequencer=None, eTag=None)
    result = source.receive(s3_request(bare), NOW)
    assert isinstance(result, Accepted) and result.delivery_id.startswith("sha256:")


def test_layout_is_configurable(tmp_path: Path) -> None:
    src = get_source("s3", make_settings(tmp_path), prefix="", markers=["READY"])
    [event] = src.normalise(aws_body("fraud/7/READY"), {})
    assert event == Registered(Kind.S3, "fraud", "7", "s3://ml-artifacts/fraud/7/", "s3://ml-artifacts/fraud/7/")
    [ignored] = src.normalise(aws_body("fraud/7/MLmodel"), {})
    assert isinstance(ignored, Ignored)
    with pytest.raises(ConfigError):
        get_source("s3", make_settings(tmp_path), markers=["a/b"])


def test_head_liveness_probe(source: Source, tmp_path: Path) -> None:
    assert source.receive(HookRequest("HEAD", {}, {}, b""), NOW) == Respond(200)
    unset = get_source("s3", make_settings(tmp_path, hooks_s3_token=None))
    assert unset.receive(HookRequest("HEAD", {}, {}, b""), NOW) == Respond(200)
    result = source.receive(HookRequest("GET", {}, {}, b""), NOW)
    assert isinstance(result, Respond) and result.status == 405


def test_token_forms(tmp_path: Path) -> None:
    src = get_source("s3", make_settings(tmp_path))
    body = s3_body()
    assert isinstance(src.receive(HookRequest("POST", {"authorization": f"bearer {S3_TOKEN}"}, {}, body), NOW),
                      Accepted)
    refused(src, HookRequest("POST", {"Authorization": S3_TOKEN}, {}, body), 401, "MODELCD_HOOKS_S3_TOKEN")
    refused(src, HookRequest("POST", {}, {}, body), 401, "no Authorization header", "MODELCD_HOOKS_S3_TOKEN")
    two_words = get_source("s3", make_settings(tmp_path, hooks_s3_token="Basic dXNlcjpwYXNz"))
    assert isinstance(two_words.receive(HookRequest("POST", {"Authorization": "Basic dXNlcjpwYXNz"}, {}, body), NOW),
                      Accepted)
    with pytest.raises(Exception) as info:
        two_words.receive(HookRequest("POST", {"Authorization": "Bearer Basic dXNlcjpwYXNz"}, {}, body), NOW)
    assert "dXNlcjpwYXNz" not in str(info.value)


@pytest.mark.parametrize(("body", "needle"), [
    (b'{"EventName": "s3:ObjectCreated:Put"}', "Records: missing"),
    (b'{"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {}}}]}',
     "s3.object.key: missing"),
    (b'{"Records": [{"s3": {"bucket": {"name": "b"}, "object": {"key": "k", "sequencer": "1"}}}]}',
     "eventName: missing"),
])
def test_malformed_records_are_400(source: Source, body: bytes, needle: str) -> None:
    refused(source, s3_request(body), 400, needle)
