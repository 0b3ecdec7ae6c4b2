"""MinIO (and S3-style) bucket notifications.

MinIO's webhook target sends ``Authorization: Bearer <auth_token>`` (the token verbatim when
it is two words, e.g. ``Basic abc=``); it must match ``MODELCD_HOOKS_S3_TOKEN``. When the
target starts MinIO probes the endpoint with ``HEAD``, answered 200 without a token.

Bodies: MinIO's ``{"EventName", "Key", "Records": [...]}`` or AWS's ``{"Records": [...]}``
(relayed by a Lambda or similar); ``eventName`` with or without the ``s3:`` prefix;
``object.key`` URL-encoded (``+`` for spaces). The delivery id is ``<bucket>/<key>@<sequencer>``
(``eTag`` when there is no sequencer; a digest of the body when neither is sent).

Layout: a model version is the folder ``<prefix><name>/<version>/`` (prefix ``models/`` by
default) and is announced by an ``ObjectCreated`` event on its marker object, directly in that
folder (``MLmodel`` or ``modelcd.yaml`` by default; upload it last). Every other object and
event, and S3's ``s3:TestEvent``, is ignored."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote_plus

from modelcd import domain
from modelcd.config import Settings
from modelcd.errors import ConfigError, InvalidInput, Unauthorized
from modelcd.sources.base import (
    Accepted,
    Event,
    HookRequest,
    Ignored,
    Registered,
    Respond,
    Source,
    batch_id,
    env_name,
    keep,
    obj,
    parse_json,
    require_secret,
    respond_json,
    same,
)

DEFAULT_PREFIX = "models/"
DEFAULT_MARKERS = ("MLmodel", "modelcd.yaml")
TEST_EVENT = "s3:TestEvent"
KEPT = ("content-type", "user-agent")


class S3Source(Source):
    """``/hooks/s3``: MinIO webhook notifications with a bearer token.

    ``prefix`` is where model folders start inside the bucket ("" for the bucket root);
    ``markers`` are the object names that announce a complete version."""

    name = "s3"

    def __init__(self, settings: Settings, *, prefix: str = DEFAULT_PREFIX,
                 markers: Sequence[str] = DEFAULT_MARKERS) -> None:
        super().__init__(settings)
        prefix = prefix.strip("/")
        self.prefix = prefix + "/" if prefix else ""
        self.markers = tuple(markers)
        if not self.markers or any(not m or "/" in m for m in self.markers):
            raise ConfigError("markers: give one or more object names without '/', e.g. ('MLmodel',)",
                              field="markers")

    def receive_other(self, req: HookRequest, now: float) -> Accepted | Respond:
        """MinIO's liveness probe: HEAD → 200."""
        if req.method == "HEAD":
            return Respond(200)
        return respond_json(405, {"code": "method_not_allowed",
                                  "message": f"/hooks/s3 takes POST (and HEAD), not {req.method}"},
                            {"Allow": "POST, HEAD"})

    def receive_post(self, req: HookRequest, now: float) -> Accepted | Respond:
        self._check_token(req.header("authorization"))
        doc = obj(parse_json(req.body, "bucket notification"), "body")
        if doc.get("Event") == TEST_EVENT:
            request_id = doc.get("RequestId")
            ident = f"{TEST_EVENT}:{request_id}" if isinstance(request_id, str) and request_id else _body_id(req.body)
            return Accepted(ident, keep(req.headers, KEPT))
        ids = [_record_id(r, f"Records[{i}]") or _body_id(req.body) for i, r in enumerate(_records(doc))]
        return Accepted(batch_id(ids), keep(req.headers, KEPT))

    def _check_token(self, presented: str | None) -> None:
        token = require_secret(self.settings.hooks_s3_token, "hooks_s3_token", "S3/MinIO").decode()
        setting = env_name("hooks_s3_token")
        if presented is None:
            raise Unauthorized(f"no Authorization header: set the MinIO webhook target's auth_token to the value "
                               f"of {setting}")
        if len(token.split()) == 2:  # MinIO sends a two-word token (e.g. "Basic abc=") verbatim
            ok = same(presented.strip(), token)
        else:
            scheme, _, credentials = presented.strip().partition(" ")
            ok = scheme.lower() == "bearer" and same(credentials.strip(), token)
        if not ok:
            raise Unauthorized(f"the Authorization token does not match: check the MinIO webhook target's "
                               f"auth_token equals {setting}")

    def normalise(self, body: bytes, headers: Mapping[str, str]) -> list[Event]:
        """An ObjectCreated event on a marker object → Registered; everything else → Ignored."""
        doc = obj(parse_json(body, "bucket notification"), "body")
        if doc.get("Event") == TEST_EVENT:
            return [Ignored("S3 test event, sent when a bucket notification is configured")]
        return [self._record(r, f"Records[{i}]") for i, r in enumerate(_records(doc))]

    def _record(self, record: dict[str, Any], where: str) -> Event:
        event_name = record.get("eventName")
        if not isinstance(event_name, str) or not event_name:
            raise InvalidInput(f"{where}.eventName: missing", field=f"{where}.eventName")
        event_name = event_name.removeprefix("s3:")
        if not event_name.startswith("ObjectCreated:"):
            return Ignored(f"event {event_name} is not an ObjectCreated event")
        major = str(record.get("eventVersion", "2")).partition(".")[0]
        if major != "2":
            return Ignored(f"event version {record.get('eventVersion')!r} is not 2.x")
        bucket, key = _bucket_key(record, where)
        folder = self._version_folder(key)
        if folder is None:
            return Ignored(f"object {key!r} is not a version marker ({self.prefix}<model>/<version>/"
                           f"{' or '.join(self.markers)})")
        name, version = folder
        uri = f"s3://{bucket}/{self.prefix}{name}/{version}/"
        return Registered(source=domain.Source.S3, model=name, external_version=version, external_ref=uri,
                          artifact_uri=uri)

    def _version_folder(self, key: str) -> tuple[str, str] | None:
        """(model, version) if ``key`` is ``<prefix><model>/<version>/<marker>``."""
        if not key.startswith(self.prefix):
            return None
        parts = key[len(self.prefix):].split("/")
        if len(parts) != 3 or parts[2] not in self.markers:
            return None
        name, version = parts[0], parts[1]
        if name in ("", ".", "..") or version in ("", ".", ".."):
            return None
        return name, version


def _records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    records = doc.get("Records")
    if not isinstance(records, list) or not records:
        raise InvalidInput("body.Records: missing or empty; expected a MinIO/S3 bucket notification",
                           field="Records")
    return [obj(r, f"Records[{i}]") for i, r in enumerate(records)]


def _bucket_key(record: dict[str, Any], where: str) -> tuple[str, str]:
    s3 = obj(record.get("s3"), f"{where}.s3")
    bucket = obj(s3.get("bucket"), f"{where}.s3.bucket").get("name")
    key = obj(s3.get("object"), f"{where}.s3.object").get("key")
    if not isinstance(bucket, str) or not bucket:
        raise InvalidInput(f"{where}.s3.bucket.name: missing", field=f"{where}.s3.bucket.name")
    if not isinstance(key, str) or not key:
        raise InvalidInput(f"{where}.s3.object.key: missing", field=f"{where}.s3.object.key")
    return bucket, unquote_plus(key)


def _record_id(record: dict[str, Any], where: str) -> str | None:
    """``<bucket>/<key>@<sequencer or eTag>``, None when the record carries neither."""
    bucket, key = _bucket_key(record, where)
    o = record["s3"]["object"]
    tag = o.get("sequencer") or o.get("eTag")
    return f"{bucket}/{key}@{tag}" if isinstance(tag, str) and tag else None


def _body_id(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()
