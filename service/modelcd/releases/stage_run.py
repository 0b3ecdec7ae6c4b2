"""What a stage function gets: one stage of one release (``StageRun``), shared by the stage
functions (``releases.stages``) and what they call (``releases.judging``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from modelcd.context import Context
from modelcd.errors import Cancelled
from modelcd.releases.policy import Environment, Policy
from modelcd.releases.service import Release

Log = Callable[[str], None]


@dataclass(frozen=True)
class StageRun:
    """One stage of one release: what a stage function gets."""

    ctx: Context
    release: Release
    log: Log
    cancel: threading.Event

    @property
    def policy(self) -> Policy:
        return self.release.policy

    @property
    def env(self) -> Environment:
        """The policy's step for the release's environment (validated, defaults filled in)."""
        return self.release.environment_policy

    def stopped(self) -> bool:
        return self.cancel.is_set() or self.ctx.releases.get(self.release.id).cancel_requested

    def check_cancel(self) -> None:
        if self.stopped():
            raise Cancelled("stopped by a person")
