"""SageMaker model package events through an EventBridge API destination (API key) and
through SNS (signatures version 1 and 2 by a self-signed test certificate trusted via the
cert dir, certificate URL rules, topics, confirmation)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from modelcd.domain import Source as Kind
from modelcd.errors import ModelcdError, Unauthorized
from modelcd.sources import Accepted, HookRequest, Ignored, Registered, Respond, get_source
from modelcd.sources import sns as sns_mod
from modelcd.sources.base import Source
from tests.sources.conftest import (
    CERT_URL,
    NOW,
    PKG_ARN,
    SM_API_KEY,
    TOPIC,
    Confirmations,
    SnsSigner,
    eventbridge_request,
    make_settings,
    offline_sagemaker,
    refused,
    sagemaker_event,
    self_signed,
)

MODEL_DATA = "s3://ml-bucket/churn/3/model.tar.gz"


@pytest.fixture
def confirmations() -> Confirmations:
    return Confirmations()


@pytest.fixture
def source(tmp_path: Path, cert_dir: Path, confirmations: Confirmations) -> Source:
    return offline_sagemaker(make_settings(tmp_path), cert_dir, confirmations)


def _normalised(src: Source, req: HookRequest) -> list[Registered | Ignored]:
    result = src.receive(req, NOW)
    assert isinstance(result, Accepted)
    return src.normalise(req.body, result.kept_headers)


# --- the event itself -----------------------------------------------------------------------------


def test_approved_completed_package_is_released(source: Source) -> None:
    req = eventbridge_request(json.dumps(sagemaker_event()).encode())
    assert source.receive(req, NOW) == Accepted("844e2571-0001", {
        "content-type": "application/json; charset=utf-8", "user-agent": "Amazon/EventBridge/ApiDestinations"})
    assert _normalised(source, req) == [Registered(
        source=Kind.SAGEMAKER, model="churn", external_version="3", external_ref=PKG_ARN, artifact_uri=MODEL_DATA,
        tags={"deploy": "true"}, description="xgboost churn", release=True, dedup_key=f"{PKG_ARN}#Approved")]


def test_pending_manual_approval_is_recorded_without_release(source: Source) -> None:
    [event] = _normalised(source, eventbridge_request(json.dumps(sagemaker_event("PendingManualApproval")).encode()))
    assert isinstance(event, Registered) and event.release is False
    assert event.dedup_key == f"{PKG_ARN}#PendingManualApproval"


@pytest.mark.parametrize(("approval", "status", "needle"), [
    ("Rejected", "Completed", "rejected"),
    ("Approved", "InProgress", "not Completed"),
    ("Approved", "Failed", "not Completed"),
    ("Unknown", "Completed", "neither Approved"),
])
def test_other_package_states_are_ignored(source: Source, approval: str, status: str, needle: str) -> None:
    [event] = _normalised(source, eventbridge_request(json.dumps(sagemaker_event(approval, status)).encode()))
    assert isinstance(event, Ignored) and needle in event.reason


def test_image_only_package_is_referenced(source: Source) -> None:
    event = sagemaker_event()
    event["detail"]["InferenceSpecification"]["Containers"][0].pop("ModelDataUrl")
    [registered] = source.normalise(json.dumps(event).encode(), {})
    assert isinstance(registered, Registered) and registered.artifact_uri is None


def test_missing_detail_fields_are_400(source: Source) -> None:
    event = sagemaker_event()
    del event["detail"]["ModelPackageGroupName"]
    refused(source, eventbridge_request(json.dumps(event).encode()), 400, "detail.ModelPackageGroupName: missing")
    refused(source, eventbridge_request(b'{"detail-type": "x"}'), 400, "event.id: missing")


# --- EventBridge API destination ------------------------------------------------------------------


def test_missing_api_key_header_names_it(source: Source) -> None:
    req = eventbridge_request(json.dumps(sagemaker_event()).encode())
    headers = {k: v for k, v in req.headers.items() if k != "x-modelcd-api-key"}
    refused(source, dataclasses.replace(req, headers=headers), 401, "no x-modelcd-api-key header",
            "MODELCD_HOOKS_SAGEMAKER_API_KEY")


def test_api_key_header_name_is_configurable(tmp_path: Path, cert_dir: Path) -> None:
    src = offline_sagemaker(make_settings(tmp_path, hooks_sagemaker_api_key_header="X-Api-Key"), cert_dir)
    body = json.dumps(sagemaker_event()).encode()
    assert isinstance(src.receive(HookRequest("POST", {"x-api-key": SM_API_KEY}, {}, body), NOW), Accepted)
    refused(src, eventbridge_request(body), 401, "no X-Api-Key header")


# --- SNS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
def test_sns_notification_signed_by_aws_rules_is_accepted(source: Source, signer: SnsSigner, version: str) -> None:
    msg = signer.envelope("Notification", json.dumps(sagemaker_event()), version=version)
    req = signer.request(msg)
    result = source.receive(req, NOW)
    assert isinstance(result, Accepted) and result.delivery_id == msg["MessageId"]
    assert result.kept_headers["x-amz-sns-message-type"] == "Notification"
    assert result.kept_headers["content-type"].startswith("text/plain")
    [event] = source.normalise(req.body, result.kept_headers)
    assert isinstance(event, Registered) and event.external_ref == PKG_ARN and event.artifact_uri == MODEL_DATA


def test_sns_subject_is_part_of_the_signed_text(source: Source, signer: SnsSigner) -> None:
    msg = signer.envelope("Notification", json.dumps(sagemaker_event()), subject="model approved")
    assert isinstance(source.receive(signer.request(msg), NOW), Accepted)
    changed = {**msg, "Subject": "model rejected"}
    refused(source, signer.request(changed), 401, "does not match")


def test_sns_recognised_by_body_when_headers_are_dropped(source: Source, signer: SnsSigner) -> None:
    msg = signer.envelope("Notification", json.dumps(sagemaker_event()))
    req = signer.request(msg, header_type=False)
    result = source.receive(req, NOW)
    assert isinstance(result, Accepted)
    assert isinstance(source.normalise(req.body, {})[0], Registered)


def test_sns_signed_by_another_key_is_refused(source: Source, signer: SnsSigner,
                                              other_key: rsa.RSAPrivateKey) -> None:
    msg = signer.envelope("Notification", json.dumps(sagemaker_event()), key=other_key, version="2")
    refused(source, signer.request(msg), 401, "not sent by Amazon SNS")


@pytest.mark.parametrize("url", [
    "https://evil.example.com/x.pem",
    "http://sns.us-east-2.amazonaws.com/SimpleNotificationService-x.pem",
    "https://sns.us-east-2.amazonaws.com.evil.com/x.pem",
    "https://sns.us-east-2.amazonaws.com@evil.example.com/x.pem",
    "https://sns.us-east-2.amazonaws.com:8443/x.pem",
    "https://sns.us-east-2.amazonaws.com/x.txt",
    "https://sqs.us-east-2.amazonaws.com/x.pem",
])
def test_untrusted_certificate_urls_are_refused_without_fetching(tmp_path: Path, signer: SnsSigner,
                                                                 url: str) -> None:
    def loader(u: str) -> bytes:
        raise AssertionError(f"fetched {u}")

    src = get_source("sagemaker", make_settings(tmp_path), cert_store=sns_mod.CertStore(None, loader=loader),
                     confirm=Confirmations())
    msg = signer.envelope("Notification", json.dumps(sagemaker_event()), cert_url=url)
    refused(src, signer.request(msg), 401, "SigningCertURL")


def test_china_region_host_is_trusted() -> None:
    assert sns_mod.is_sns_url("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-x.pem", ".pem")


def test_topic_not_listed_is_refused(source: Source, signer: SnsSigner) -> None:
    other = "arn:aws:sns:us-east-2:123456789012:someone-else"
    msg = signer.envelope("Notification", json.dumps(sagemaker_event()), topic=other)
    refused(source, signer.request(msg), 401, other, "MODELCD_HOOKS_SNS_TOPIC_ARNS")


def test_unknown_certificate_without_fetch_names_the_file(source: Source, signer: SnsSigner, cert_dir: Path) -> None:
    url = "https://sns.us-east-2.amazonaws.com/SimpleNotificationService-new.pem"
    msg = signer.envelope("Notification", json.dumps(sagemaker_event()), cert_url=url)
    refused(source, signer.request(msg), 401, sns_mod.cert_filename(url))


def test_cert_store_loader_is_cached(sns_key: rsa.RSAPrivateKey) -> None:
    calls: list[str] = []

    def loader(url: str) -> bytes:
        calls.append(url)
        return self_signed(sns_key)

    store = sns_mod.CertStore(None, loader=loader)
    assert store.certificate(CERT_URL) is store.certificate(CERT_URL)
    assert calls == [CERT_URL]


def test_cert_store_loader_failure_is_retryable(tmp_path: Path) -> None:
    def loader(url: str) -> bytes:
        raise OSError("connection refused")

    with pytest.raises(ModelcdError) as info:
        sns_mod.CertStore(None, loader=loader).certificate(CERT_URL)
    assert info.value.http_status == 500 and not isinstance(info.value, Unauthorized)


def test_expired_certificate_is_refused(tmp_path: Path, signer: SnsSigner, sns_key: rsa.RSAPrivateKey) -> None:
    folder = tmp_path / "old-certs"
    folder.mkdir()
    (folder / sns_mod.cert_filename(CERT_URL)).write_bytes(self_signed(sns_key, NOW - 400 * 86400, days=30))
    src = offline_sagemaker(make_settings(tmp_path), folder)
    msg = signer.envelope("Notification", json.dumps(sagemaker_event()))
    refused(src, signer.request(msg), 401, "not valid now")


def test_unsupported_signature_version_is_refused(source: Source, signer: SnsSigner) -> None:
    msg = {**signer.envelope("Notification", "{}"), "SignatureVersion": "3"}
    refused(source, signer.request(msg), 401, "SignatureVersion")


def test_sns_retries_within_an_hour_are_accepted(source: Source, signer: SnsSigner) -> None:
    msg = signer.envelope("Notification", json.dumps(sagemaker_event()), ts=NOW - 3500)
    assert isinstance(source.receive(signer.request(msg), NOW), Accepted)


def test_subscription_confirmation_is_confirmed_after_verification(source: Source, signer: SnsSigner,
                                                                   confirmations: Confirmations) -> None:
    msg = signer.envelope("SubscriptionConfirmation", "You have chosen to subscribe to the topic ...", version="2")
    assert source.receive(signer.request(msg), NOW) == Respond(200)
    assert confirmations.urls == [msg["SubscribeURL"]]


def test_forged_subscription_confirmation_is_not_confirmed(source: Source, signer: SnsSigner,
                                                           confirmations: Confirmations,
                                                           other_key: rsa.RSAPrivateKey) -> None:
    forged = signer.envelope("SubscriptionConfirmation", "subscribe", key=other_key)
    refused(source, signer.request(forged), 401)
    evil = {**signer.envelope("SubscriptionConfirmation", "subscribe"), "SubscribeURL": "https://evil.example.com/"}
    refused(source, signer.request(evil), 401, "does not match")
    assert confirmations.urls == []


def test_unsubscribe_confirmation_is_answered_and_not_stored(source: Source, signer: SnsSigner,
                                                             confirmations: Confirmations) -> None:
    msg = signer.envelope("UnsubscribeConfirmation", "You have chosen to deactivate subscription ...")
    assert source.receive(signer.request(msg), NOW) == Respond(200)
    assert confirmations.urls == []


@pytest.mark.parametrize("url", ["https://evil.example.com/?Action=ConfirmSubscription",
                                 "http://sns.us-east-2.amazonaws.com/?Action=ConfirmSubscription"])
def test_default_confirm_calls_only_https_sns_hosts(url: str) -> None:
    with pytest.raises(Unauthorized, match="not an https Amazon SNS host"):
        sns_mod.confirm_subscription(url)


def test_sns_message_that_is_not_an_eventbridge_event_is_ignored(source: Source, signer: SnsSigner) -> None:
    req = signer.request(signer.envelope("Notification", "plain text alarm"))
    [event] = _normalised(source, req)
    assert isinstance(event, Ignored) and "not JSON" in event.reason


def test_sns_type_header_must_match_the_body(source: Source, signer: SnsSigner) -> None:
    req = signer.request(signer.envelope("Notification", "{}"))
    lying = dataclasses.replace(req, headers={**req.headers, "x-amz-sns-message-type": "SubscriptionConfirmation"})
    refused(source, lying, 400, "does not match the message Type")


def test_topic_list_from_environment_style_string(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, hooks_sns_topic_arns=f"{TOPIC}, arn:aws:sns:eu-west-1:1:other")
    assert settings.hooks_sns_topic_arns == [TOPIC, "arn:aws:sns:eu-west-1:1:other"]


def test_default_cert_store_is_shared_by_source_objects(tmp_path: Path, cert_dir: Path) -> None:
    first = get_source("sagemaker", make_settings(cert_dir))
    second = get_source("sagemaker", make_settings(cert_dir))
    assert first.certs is second.certs is sns_mod.shared_cert_store(cert_dir)  # type: ignore[attr-defined]
    assert first.certs.certificate(CERT_URL) is not None  # type: ignore[attr-defined]  # from the dir, offline


def test_a_non_pem_certificate_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / sns_mod.cert_filename(CERT_URL)).write_text("not a certificate")
    with pytest.raises(Unauthorized, match="not a PEM X.509 certificate"):
        sns_mod.CertStore(tmp_path, fetch=False).certificate(CERT_URL)
