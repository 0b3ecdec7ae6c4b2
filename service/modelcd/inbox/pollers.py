"""Pollers for registries that cannot call us: each new version found becomes an inbox
delivery shaped like the source's own webhook, so it takes the one path (and the same
idempotent import) as a pushed delivery. A version seen both ways is recorded once."""

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


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
