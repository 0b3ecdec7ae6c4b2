"""Fixtures for the webhook sources: settings with every secret, a signed-request "kit" per
source (so the checks every source must pass run as one table), an SNS signing key with a
self-signed certificate trusted through a cert dir, and a loopback HTTP server that feeds
real senders' requests (MLflow, azure-eventgrid) to a source."""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from modelcd.config import Settings
from modelcd.errors import ModelcdError
from modelcd.sources import sns
from modelcd.sources.base import Accepted, HookRequest, Respond, Source, get_source
from modelcd.sources.generic import sign as generic_sign
from modelcd.sources.mlflow import sign as mlflow_sign

NOW = 1767225600.0  # 2026-01-01T00:00:00Z
MLFLOW_SECRET = "mlflow-secret-4f9c2e"
GENERIC_SECRET = "generic-secret-8d1a7b"
S3_TOKEN = "s3-token-93bd0c1e"
AZURE_SECRET = "azure-secret-51ce7a"
SM_API_KEY = "sagemaker-key-c0ffee42"
TOPIC = "arn:aws:sns:us-east-2:123456789012:modelcd-models"
CERT_URL = "https://sns.us-east-2.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem"
ALL_SECRETS = (MLFLOW_SECRET, GENERIC_SECRET, S3_TOKEN, AZURE_SECRET, SM_API_KEY)
WRONG = "wrong-secret-77aa"
PKG_ARN = "arn:aws:sagemaker:us-east-2:123456789012:model-package/churn/3"


def make_settings(tmp: Path | None = None, **overrides: Any) -> Settings:
    """Settings with every hook secret set (override one with None to unset it)."""
    values: dict[str, Any] = {
        "hooks_mlflow_secret": MLFLOW_SECRET, "hooks_generic_secret": GENERIC_SECRET, "hooks_s3_token": S3_TOKEN,
        "hooks_azureml_secret": AZURE_SECRET, "hooks_sagemaker_api_key": SM_API_KEY,
        "hooks_sns_topic_arns": [TOPIC], "hooks_sns_cert_dir": tmp,
    }
    values.update(overrides)
    return Settings(**values)


def refused(source: Source, req: HookRequest, status: int, *needles: str, now: float = NOW) -> ModelcdError:
    """Assert ``receive`` raises an error with ``status`` whose message contains each needle and
    none of the secrets, the signature headers' values or the wrong secret used."""
    with pytest.raises(ModelcdError) as info:
        source.receive(req, now)
    err = info.value
    assert int(err.http_status) == status, err.message
    shown = f"{err} {err.message} {err!r} {json.dumps(err.to_dict())}"
    for needle in needles:
        assert needle in shown
    secret_values = [*ALL_SECRETS, WRONG, *(v for k, v in req.headers.items() if "signature" in k or
                                            k in ("authorization", "x-modelcd-secret", "x-modelcd-api-key"))]
    body = _json_or_none(req.body)
    if isinstance(body, dict) and isinstance(body.get("Signature"), str):
        secret_values.append(body["Signature"])
    for secret in secret_values:
        assert secret not in shown, f"{secret!r} leaked into {shown!r}"
    return err


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


# --- SageMaker / EventBridge / SNS ----------------------------------------------------------


def sagemaker_event(approval: str = "Approved", status: str = "Completed", *, event_id: str = "844e2571-0001",
                    version: int = 3, detail_type: str = "SageMaker Model Package State Change") -> dict[str, Any]:
    """A SageMaker Model Package State Change event as EventBridge sends it."""
    arn = PKG_ARN.replace("/3", f"/{version}")
    return {
        "version": "0", "id": event_id, "detail-type": detail_type, "source": "aws.sagemaker",
        "account": "123456789012", "time": "2026-01-01T00:00:00Z", "region": "us-east-2", "resources": [arn],
        "detail": {
            "ModelPackageGroupName": "churn", "ModelPackageVersion": version, "ModelPackageArn": arn,
            "ModelApprovalStatus": approval, "ModelPackageStatus": status,
            "CreationTime": 1767225000000, "LastModifiedTime": 1767225600000,
            "InferenceSpecification": {
                "Containers": [{"Image": "123456789012.dkr.ecr.us-east-2.amazonaws.com/xgb:1",
                                "ImageDigest": "sha256:ab", "ModelDataUrl": "s3://ml-bucket/churn/3/model.tar.gz"}],
                "SupportedContentTypes": ["text/csv"], "SupportedResponseMIMETypes": ["text/csv"]},
            "CustomerMetadataProperties": {"deploy": "true"}, "ModelPackageDescription": "xgboost churn",
            "MetadataProperties": {"GeneratedBy": "arn:aws:sagemaker:...:pipeline-execution/x"},
            "ModelMetrics": {}, "CertifyForMarketplace": False}}


def iso(ts: float) -> str:
    """An SNS Timestamp."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class SnsSigner:
    """Signs SNS messages exactly as AWS documents, with a key whose self-signed certificate
    sits in ``cert_dir`` under the name of ``CERT_URL``."""

    key: rsa.RSAPrivateKey
    cert_dir: Path
    counter: list[int] = field(default_factory=lambda: [0])

    def envelope(self, kind: str, message: str, *, version: str = "1", topic: str = TOPIC, ts: float = NOW,
                 subject: str | None = None, cert_url: str = CERT_URL, key: rsa.RSAPrivateKey | None = None,
                 message_id: str | None = None) -> dict[str, Any]:
        self.counter[0] += 1
        msg: dict[str, Any] = {"Type": kind, "MessageId": message_id or f"5c1a-{self.counter[0]:04d}",
                               "TopicArn": topic, "Message": message, "Timestamp": iso(ts)}
        if kind == "Notification":
            if subject is not None:
                msg["Subject"] = subject
            keys = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
            msg["UnsubscribeURL"] = "https://sns.us-east-2.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x"
        else:
            msg["Token"] = "2336412f37fb687f5d51e6e2425c464de12884d1a4"
            msg["SubscribeURL"] = ("https://sns.us-east-2.amazonaws.com/?Action=ConfirmSubscription&TopicArn="
                                   f"{topic}&Token=2336412f37fb687f5d51e6e2425c464de12884d1a4")
            keys = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
        string_to_sign = "".join(f"{k}\n{msg[k]}\n" for k in keys if k in msg)
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = (key or self.key).sign(string_to_sign.encode(), padding.PKCS1v15(), digest)
        msg.update(SignatureVersion=version, Signature=base64.b64encode(signature).decode(), SigningCertURL=cert_url)
        return msg

    def request(self, msg: dict[str, Any], *, header_type: bool = True) -> HookRequest:
        """The POST SNS makes: JSON body with Content-Type text/plain."""
        headers = {"Content-Type": "text/plain; charset=UTF-8",
                   "User-Agent": "Amazon Simple Notification Service Agent",
                   "x-amz-sns-message-id": msg["MessageId"], "x-amz-sns-topic-arn": msg["TopicArn"]}
        if header_type:
            headers["x-amz-sns-message-type"] = msg["Type"]
        return HookRequest("POST", headers, {}, json.dumps(msg, indent=2).encode())


def self_signed(key: rsa.RSAPrivateKey, not_before: float = NOW - 86400, days: int = 365) -> bytes:
    """A CA-less self-signed PEM certificate for ``key``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    start = dt.datetime.fromtimestamp(not_before, dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days)).sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.PEM)


@pytest.fixture(scope="session")
def sns_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def cert_dir(tmp_path: Path, sns_key: rsa.RSAPrivateKey) -> Path:
    folder = tmp_path / "sns-certs"
    folder.mkdir()
    (folder / sns.cert_filename(CERT_URL)).write_bytes(self_signed(sns_key))
    return folder


@pytest.fixture
def signer(sns_key: rsa.RSAPrivateKey, cert_dir: Path) -> SnsSigner:
    return SnsSigner(sns_key, cert_dir)


@dataclass
class Confirmations:
    """An injected ``confirm`` that records the SubscribeURLs it was given."""

    urls: list[str] = field(default_factory=list)

    def __call__(self, url: str) -> None:
        self.urls.append(url)


def offline_sagemaker(settings: Settings, cert_dir: Path | None,
                      confirm: Callable[[str], None] | None = None) -> Source:
    """The SageMaker source with certificates from ``cert_dir`` only (never the network)."""
    return get_source("sagemaker", settings, cert_store=sns.CertStore(cert_dir, fetch=False),
                      confirm=confirm or Confirmations())


# --- one kit per source: what an authentic delivery looks like ------------------------------


@dataclass
class Kit:
    """How to make authentic requests for one source, for the checks every source shares."""

    name: str
    setting: str  # the setting whose absence refuses every delivery
    make: Callable[..., Source]  # (settings) -> Source
    deliver: Callable[..., HookRequest]  # (payload bytes, *, secret=..., ts=...) -> authentic request
    valid: bytes  # a payload that announces churn version 3
    unknown: bytes  # a payload of an event type that announces nothing
    signed: bool  # the body is covered by a signature (tampering is detectable)
    timestamped: bool  # the signature covers a timestamp (stale deliveries are refused)
    malformed: Callable[[], HookRequest] | None = None  # an authentic request whose body is not JSON

    def bad_json(self) -> HookRequest:
        return self.malformed() if self.malformed else self.deliver(b'{"not json":')


MLFLOW_BODY = (b'{"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00", '
               b'"data": {"name": "churn", "version": "3", "source": "models:/m-abc", "run_id": null, '
               b'"tags": {"deploy": "true"}, "description": null}}')
MLFLOW_ALIAS = (b'{"entity": "model_version_alias", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00", '
                b'"data": {"name": "churn", "alias": "champion", "version": "3"}}')


def mlflow_request(body: bytes, *, secret: str = MLFLOW_SECRET, ts: float = NOW,
                   delivery_id: str = "3f1c2a7e-0000-4000-8000-000000000001") -> HookRequest:
    ts_s = str(int(ts))
    return HookRequest("POST", {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
                                "X-MLflow-Timestamp": ts_s,
                                "X-MLflow-Signature": mlflow_sign(secret, delivery_id, ts_s, body)}, {}, body)


GENERIC_BODY = b'{"model": "churn", "version": 3, "artifact_uri": "s3://models/churn/3/", "tags": {"deploy": true}}'


def generic_request(body: bytes, *, secret: str = GENERIC_SECRET, ts: float = NOW,
                    delivery_id: str | None = "ci-run-17") -> HookRequest:
    headers = {"Content-Type": "application/json", "X-Modelcd-Signature": generic_sign(secret, int(ts), body)}
    if delivery_id:
        headers["X-Modelcd-Delivery-Id"] = delivery_id
    return HookRequest("POST", headers, {}, body)


def azure_body(event_type: str = "Microsoft.MachineLearningServices.ModelRegistered") -> bytes:
    return json.dumps([{
        "id": "9b1f0000-0000-0000-0000-000000000001",
        "topic": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws",
        "subject": "models/churn:3", "eventType": event_type, "eventTime": "2026-01-01T00:00:00.0000000Z",
        "dataVersion": "", "metadataVersion": "1",
        "data": {"ModelName": "churn", "ModelVersion": "3", "ModelTags": {"deploy": "true"}, "ModelProperties": {}},
    }]).encode()


def azure_request(body: bytes, *, secret: str = AZURE_SECRET, ts: float = NOW) -> HookRequest:
    return HookRequest("POST", {"Content-Type": "application/json", "aeg-event-type": "Notification"},
                       {"code": secret}, body)


def s3_body(key: str = "churn%2F3%2FMLmodel", event: str = "s3:ObjectCreated:Put", bucket: str = "models",
            prefix_key: str = "models%2F") -> bytes:
    return json.dumps({"EventName": event, "Key": f"{bucket}/models/churn/3/MLmodel", "Records": [{
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": "2026-01-01T00:00:00.000Z",
        "eventName": event, "userIdentity": {"principalId": "ci-user"}, "requestParameters": {},
        "responseElements": {}, "s3": {
            "s3SchemaVersion": "1.0", "configurationId": "Config",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "ci-user"}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": prefix_key + key, "size": 512, "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                       "sequencer": "17A2B3C4D5E6F708"}},
        "source": {"host": "10.0.0.5", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7"}}]}).encode()


def s3_request(body: bytes, *, secret: str = S3_TOKEN, ts: float = NOW) -> HookRequest:
    return HookRequest("POST", {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"}, {}, body)


def eventbridge_request(body: bytes, *, secret: str = SM_API_KEY, ts: float = NOW) -> HookRequest:
    return HookRequest("POST", {"Content-Type": "application/json; charset=utf-8",
                                "User-Agent": "Amazon/EventBridge/ApiDestinations", "x-modelcd-api-key": secret},
                       {}, body)


@pytest.fixture
def kits(tmp_path: Path, signer: SnsSigner, other_key: rsa.RSAPrivateKey, cert_dir: Path) -> dict[str, Kit]:
    """Every source (SageMaker twice: EventBridge and SNS) as a Kit."""

    def sns_deliver(payload: bytes, *, secret: str = "", ts: float = NOW) -> HookRequest:
        key = other_key if secret == WRONG else None
        return signer.request(signer.envelope("Notification", payload.decode(), ts=ts, key=key))

    def sns_make(settings: Settings) -> Source:
        return offline_sagemaker(settings, cert_dir)

    def sns_malformed() -> HookRequest:
        return HookRequest("POST", {"x-amz-sns-message-type": "Notification"}, {}, b'{"Type": "Notif')

    eb_valid = json.dumps(sagemaker_event()).encode()
    eb_unknown = json.dumps(sagemaker_event(detail_type="SageMaker Endpoint State Change")).encode()
    return {k.name: k for k in [
        Kit("mlflow", "hooks_mlflow_secret", lambda s: get_source("mlflow", s), mlflow_request, MLFLOW_BODY,
            MLFLOW_ALIAS, signed=True, timestamped=True),
        Kit("generic", "hooks_generic_secret", lambda s: get_source("generic", s), generic_request, GENERIC_BODY,
            b'{"event": "model_version.deleted", "model": "churn", "version": "3"}', signed=True, timestamped=True),
        Kit("azureml", "hooks_azureml_secret", lambda s: get_source("azureml", s), azure_request, azure_body(),
            azure_body("Microsoft.MachineLearningServices.RunCompleted"), signed=False, timestamped=False),
        Kit("s3", "hooks_s3_token", lambda s: get_source("s3", s), s3_request, s3_body(),
            s3_body(event="s3:ObjectRemoved:Delete"), signed=False, timestamped=False),
        Kit("sagemaker-eventbridge", "hooks_sagemaker_api_key", sns_make, eventbridge_request, eb_valid, eb_unknown,
            signed=False, timestamped=False),
        Kit("sagemaker-sns", "hooks_sns_topic_arns", sns_make, sns_deliver, eb_valid, eb_unknown, signed=True,
            timestamped=True, malformed=sns_malformed),
    ]}


# --- a loopback server that hands real senders' requests to a source --------------------------


@dataclass
class HookServer:
    """``http://127.0.0.1:<port>/hooks/<name>`` answering with ``source.receive`` the way the
    hooks handler does (202 for Accepted, Respond as given, errors as {code, message})."""

    source: Source
    accepted_status: int = 202  # azure-eventgrid's publisher wants 200, as Event Grid answers it
    url: str = ""
    seen: list[tuple[HookRequest, Accepted | Respond | ModelcdError]] = field(default_factory=list)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(path)
        req = HookRequest(method, headers, dict(parse_qsl(parts.query)), body)
        try:
            result: Accepted | Respond | ModelcdError = self.source.receive(req, time.time())
        except ModelcdError as e:
            result = e
        self.seen.append((req, result))
        if isinstance(result, ModelcdError):
            return int(result.http_status), {"Content-Type": "application/json"}, json.dumps(result.to_dict()).encode()
        if isinstance(result, Respond):
            return result.status, result.headers, result.body
        out = json.dumps({"delivery_id": result.delivery_id}).encode()
        return self.accepted_status, {"Content-Type": "application/json"}, out


@pytest.fixture
def hook_server() -> Iterator[Callable[[Source], HookServer]]:
    servers: list[ThreadingHTTPServer] = []

    def start(source: Source) -> HookServer:
        hook = HookServer(source)

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, out = hook.handle(self.command, self.path, dict(self.headers.items()), body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            do_POST = do_OPTIONS = do_HEAD = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        hook.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/{source.name}"
        return hook

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
