"""The release state machine: phases, the legal moves between them, and the stage that
runs in each phase. Transitions are data; ``check_transition`` refuses an illegal move."""

from __future__ import annotations

from enum import StrEnum

from modelcd.domain import JobType
from modelcd.errors import Conflict


class Phase(StrEnum):
    QUEUED = "queued"  # waiting for its endpoint: one release per endpoint runs at a time
    BUILDING = "building"  # bundle/image being made (cached by requirements)
    EVALUATING = "evaluating"  # the evaluation gate: the version (and the champion) scored on labelled data
    DEPLOYING = "deploying"  # new deployment starting next to production, no traffic
    SMOKE_TESTING = "smoke_testing"  # checks against the new deployment's own URI
    AWAITING_APPROVAL = "awaiting_approval"  # smoke passed; a person approves (or rejects) before traffic moves
    PROMOTING = "promoting"  # traffic moving to the new deployment (idempotent, re-run after a crash)
    ROLLING_BACK = "rolling_back"  # undoing what this release started; production restored
    SUCCEEDED = "succeeded"  # the version serves the endpoint
    FAILED = "failed"  # a stage failed; rolled back, production as before
    CANCELLED = "cancelled"  # stopped by a person; rolled back, production as before
    SUPERSEDED = "superseded"  # a newer version was queued for the endpoint before this one started

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Holds its endpoint: started and not finished."""
        return not self.terminal and self is not Phase.QUEUED


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED, Phase.SUPERSEDED})

TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.QUEUED: frozenset({Phase.BUILDING, Phase.SUPERSEDED, Phase.CANCELLED}),
    Phase.BUILDING: frozenset({Phase.EVALUATING, Phase.DEPLOYING, Phase.ROLLING_BACK}),
    Phase.EVALUATING: frozenset({Phase.DEPLOYING, Phase.ROLLING_BACK}),
    Phase.DEPLOYING: frozenset({Phase.SMOKE_TESTING, Phase.ROLLING_BACK}),
    Phase.SMOKE_TESTING: frozenset({Phase.PROMOTING, Phase.AWAITING_APPROVAL, Phase.ROLLING_BACK}),
    Phase.AWAITING_APPROVAL: frozenset({Phase.PROMOTING, Phase.ROLLING_BACK}),
    Phase.PROMOTING: frozenset({Phase.SUCCEEDED, Phase.ROLLING_BACK}),
    Phase.ROLLING_BACK: frozenset({Phase.FAILED, Phase.CANCELLED}),
    Phase.SUCCEEDED: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.CANCELLED: frozenset(),
    Phase.SUPERSEDED: frozenset(),
}

# the job type that does each phase's work
STAGE_OF: dict[Phase, JobType] = {
    Phase.BUILDING: JobType.BUILD,
    Phase.EVALUATING: JobType.EVALUATE,
    Phase.DEPLOYING: JobType.DEPLOY,
    Phase.SMOKE_TESTING: JobType.SMOKE,
    Phase.PROMOTING: JobType.PROMOTE,
    Phase.ROLLING_BACK: JobType.ROLLBACK,
}

# where each stage leads when it succeeds (build: to EVALUATING when the environment has an
# evaluation gate; smoke: to AWAITING_APPROVAL when it has an approval gate; see ``after_success``)
NEXT_ON_SUCCESS: dict[Phase, Phase] = {
    Phase.BUILDING: Phase.DEPLOYING,
    Phase.EVALUATING: Phase.DEPLOYING,
    Phase.DEPLOYING: Phase.SMOKE_TESTING,
    Phase.SMOKE_TESTING: Phase.PROMOTING,
    Phase.PROMOTING: Phase.SUCCEEDED,
}


def check_transition(current: Phase, to: Phase) -> None:
    """Raise Conflict when ``current → to`` is not a legal move."""
    if to not in TRANSITIONS[current]:
        raise Conflict(f"release cannot go from {current} to {to}")


def after_rollback(cancel_requested: bool) -> Phase:
    """The terminal phase a rollback ends in."""
    return Phase.CANCELLED if cancel_requested else Phase.FAILED


def after_success(phase: Phase, approval: bool, evaluation: bool = False) -> Phase:
    """The phase a stage leads to when it succeeds: build goes through the evaluation gate and
    smoke stops at the approval gate when the release's environment has them."""
    if phase is Phase.BUILDING and evaluation:
        return Phase.EVALUATING
    if phase is Phase.SMOKE_TESTING and approval:
        return Phase.AWAITING_APPROVAL
    return NEXT_ON_SUCCESS[phase]
