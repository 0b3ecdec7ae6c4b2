"""One small error tree: every expected failure carries a stable code, an HTTP status and
(when one input is to blame) the field that caused it, so the API and the CLI can say what
to fix."""

from __future__ import annotations

from http import HTTPStatus


class ModelcdError(Exception):
    """Base of every expected modelcd failure."""

    code = "error"
    http_status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


class InvalidInput(ModelcdError):
    """The caller sent something we cannot accept; the message names the field and the fix."""

    code = "invalid_input"
    http_status = HTTPStatus.BAD_REQUEST


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"
    http_status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NotFound(ModelcdError):
    code = "not_found"
    http_status = HTTPStatus.NOT_FOUND


class Conflict(ModelcdError):
    code = "conflict"
    http_status = HTTPStatus.CONFLICT


class Unauthorized(ModelcdError):
    code = "unauthorized"
    http_status = HTTPStatus.UNAUTHORIZED


class Forbidden(ModelcdError):
    """The caller is known but their role does not grant the action; the message names the roles that do."""

    code = "forbidden"
    http_status = HTTPStatus.FORBIDDEN


class ConfigError(ModelcdError):
    """A setting is invalid; raised at start, naming the setting and the fix."""

    code = "config_error"


class StageFailed(ModelcdError):
    """A release stage failed for a reason the job log explains (bad model, failed smoke...)."""

    code = "stage_failed"


class BuildError(StageFailed):
    code = "build_failed"


class DeployError(StageFailed):
    code = "deploy_failed"


class SmokeFailed(StageFailed):
    code = "smoke_failed"


class BatchFailed(StageFailed):
    """A batch scoring run failed (too many bad rows, no environment, unreadable input); no
    output of it is visible."""

    code = "batch_failed"


class RouterError(ModelcdError):
    code = "router_error"
    http_status = HTTPStatus.BAD_GATEWAY


class Cancelled(ModelcdError):
    """The job or release was stopped by a person; production is untouched."""

    code = "cancelled"
    http_status = HTTPStatus.CONFLICT


class ArtifactStoreError(ModelcdError):
    code = "artifact_store_error"
