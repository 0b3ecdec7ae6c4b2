"""What happens elsewhere when a release moves: the source registry shows it (MLflow aliases
and tags), GitHub shows a deployment. Every phase a release enters is an outbox event
(``release.phase``, written in the same transaction as the move); the dispatcher hands it to
each observer here, at least once and in order, after the move committed. An observer must be
idempotent, quick, and quiet about releases it has nothing to do with; its failure is noted on
the event and never touches the release."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelcd.context import Context

log = logging.getLogger(__name__)

RELEASE_PHASE = "release.phase"  # outbox kind


@dataclass(frozen=True)
class ReleaseMoved:
    """A release entered ``phase`` (see ``releases.machine.Phase``)."""

    release_id: str
    model: str
    version: int
    environment: str
    phase: str
    trigger: str  # auto | manual | rollback
    runner: str  # local | github | azure
    deployment_id: str | None = None
    error: str | None = None

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ReleaseMoved:
        return cls(**{k: payload.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


Observer = Callable[["Context", ReleaseMoved], None]

# "module:function" of each observer, imported when an event comes; a new one adds a line.
OBSERVERS: list[str] = [
    "modelcd.sources.writeback:write_back",  # MLflow: the environment's alias and the version's tags
    "modelcd.pipelines.deployments:observe",  # GitHub: a deployment per release run by GitHub Actions
]


def notify(ctx: Context, payload: dict[str, Any], observers: list[str] | None = None) -> str | None:
    """Call every observer with the event; return a note naming those that failed (None if none did)."""
    moved = ReleaseMoved.from_payload(payload)
    failed = []
    for where in OBSERVERS if observers is None else observers:
        module, _, attr = where.partition(":")
        try:
            observer: Observer = getattr(import_module(module), attr)
            observer(ctx, moved)
        except Exception as e:  # one observer's failure must not stop the others, nor the outbox
            log.exception("observer %s of release %s", where, moved.release_id)
            failed.append(f"{where}: {getattr(e, 'message', None) or f'{type(e).__name__}: {e}'}")
    return ("observers failed: " + "; ".join(failed)) if failed else None
