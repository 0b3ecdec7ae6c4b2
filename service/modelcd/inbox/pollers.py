"""Pollers for registries that cannot call us (MLflow without webhooks, buckets without
notifications): each new version found becomes an inbox delivery shaped like the source's
own webhook, so it takes the one path (and the same idempotent import) as a pushed
delivery. A version seen both ways is recorded once."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from modelcd.context import Context

log = logging.getLogger(__name__)


class MlflowPoller(threading.Thread):
    """Every ``mlflow_poll_interval_s``: `search_model_versions` since the stored cursor."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(name="mlflow-poller", daemon=True)
        self.ctx = ctx
        self.stopped = threading.Event()
        self.cursor_path = ctx.home / "pollers" / "mlflow.json"

    def run(self) -> None:
        while not self.stopped.wait(self.ctx.settings.mlflow_poll_interval_s):
            try:
                self.poll_once()
            except Exception as e:
                log.warning("MLflow poll failed (retrying next interval): %s", getattr(e, "message", e))

    def poll_once(self) -> int:
        from modelcd.sources.mlflow_server import PollCursor, poll_new_versions

        tracking = self.ctx.settings.mlflow_tracking_uri or ""
        cursor = PollCursor.from_json(self.cursor_path.read_text()) if self.cursor_path.exists() else None
        found, nxt = poll_new_versions(tracking, cursor)
        for ref in found:
            body = json.dumps({"entity": "model_version", "action": "created", "data": {
                "name": ref.name, "version": ref.version, "source": ref.source, "run_id": ref.run_id,
                "tags": ref.tags, "description": ref.description or None}}).encode()
            self.ctx.inbox.accept("mlflow", f"poll:{ref.name}/{ref.version}", {"x-modelcd-poller": "mlflow"}, body)
        _write_atomic(self.cursor_path, nxt.to_json())  # only after every delivery is stored
        if found:
            self.ctx.inbox_wake.set()
        return len(found)


class S3Poller(threading.Thread):
    """Every ``s3_poll_interval_s``: list ``models/`` in the bucket; each marker object not seen
    before (by key and ETag) becomes an S3 notification in the inbox."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(name="s3-poller", daemon=True)
        self.ctx = ctx
        self.stopped = threading.Event()
        self.seen_path = ctx.home / "pollers" / "s3.json"

    def run(self) -> None:
        while not self.stopped.wait(self.ctx.settings.s3_poll_interval_s):
            try:
                self.poll_once()
            except Exception as e:
                log.warning("S3 poll failed (retrying next interval): %s", getattr(e, "message", e))

    def poll_once(self) -> int:
        from urllib.parse import quote

        from modelcd.inbox.importer import _s3_client
        from modelcd.sources.s3 import DEFAULT_MARKERS, DEFAULT_PREFIX

        bucket = self.ctx.settings.s3_poll_bucket or ""
        seen: list[str] = json.loads(self.seen_path.read_text()) if self.seen_path.exists() else []
        known = set(seen)
        found = 0
        pages = _s3_client(self.ctx).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=DEFAULT_PREFIX)
        for page in pages:
            for o in page.get("Contents", []):
                key, etag = o["Key"], str(o.get("ETag", "")).strip('"')
                mark = f"{key}@{etag}"
                if key.rsplit("/", 1)[-1] not in DEFAULT_MARKERS or mark in known:
                    continue
                body = json.dumps({"Records": [{
                    "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                    "s3": {"bucket": {"name": bucket}, "object": {"key": quote(key, safe="/"), "eTag": etag,
                                                                  "size": o.get("Size", 0)}}}]}).encode()
                self.ctx.inbox.accept("s3", f"poll:{bucket}/{mark}"[:128], {"x-modelcd-poller": "s3"}, body)
                seen.append(mark)
                known.add(mark)
                found += 1
        if found:
            _write_atomic(self.seen_path, json.dumps(seen))  # after the deliveries are stored
            self.ctx.inbox_wake.set()
        return found


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
