"""``/api/v1/users`` and ``/api/v1/tokens``: named users and their API tokens (``users``).

An admin manages users and everyone's tokens; any user may make, list and revoke their own
tokens. A new token is in the answer that makes it and nowhere else. Each change is an event
naming who made it (never a token)."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, request

from modelcd.access import Principal, refusal, validate_user_name
from modelcd.app.api import SIGNED_IN, _ctx, _json_body, admin, by, requires
from modelcd.errors import Forbidden, InvalidInput
from modelcd.users import TokenInfo

bp = Blueprint("users_api", __name__, url_prefix="/api/v1")

signed_in = requires(SIGNED_IN)


def _event(kind: str, message: str) -> None:
    _ctx().jobs.event(None, None, kind, message, actor=by())


def _own_or_admin(user: str) -> None:
    """Forbidden unless who asks is ``user`` or an admin."""
    principal: Principal = g.principal
    if principal.name != user and (why := refusal(principal, "admin")) is not None:
        raise Forbidden(f"{why} (without it, only your own tokens)")


def _user_field(body_value: object) -> str:
    return validate_user_name(body_value, field="user")


# users (admin)
@bp.get("/users")
@admin
def list_users() -> Response:
    return jsonify({"users": [u.to_dict() for u in _ctx().users.list()]})


@bp.post("/users")
@admin
def add_user() -> tuple[Response, int]:
    body = _json_body()
    for key in ("name", "role"):
        if key not in body:
            raise InvalidInput(f"missing `{key}`: send {{name, role}}", field=key)
    user = _ctx().users.add(body["name"], body["role"])
    _event("user.added", f"user {user.name} added as {user.role}")
    return jsonify(user.to_dict()), 201


@bp.post("/users/<user>/role")
@admin
def set_user_role(user: str) -> Response:
    if "role" not in (body := _json_body()):
        raise InvalidInput("missing `role`: send {role}", field="role")
    changed = _ctx().users.set_role(validate_user_name(user), body["role"])
    _event("user.role", f"user {changed.name} is now {changed.role}")
    return jsonify(changed.to_dict())


@bp.post("/users/<user>/disable")
@admin
def disable_user(user: str) -> Response:
    """Refuse every token of the user from the next request on, keeping the user and the tokens."""
    return _set_disabled(user, True)


@bp.post("/users/<user>/enable")
@admin
def enable_user(user: str) -> Response:
    return _set_disabled(user, False)


def _set_disabled(user: str, disabled: bool) -> Response:
    changed = _ctx().users.set_disabled(validate_user_name(user), disabled)
    _event(f"user.{'disabled' if disabled else 'enabled'}", f"user {changed.name} "
           + ("disabled: their tokens are refused" if disabled else "enabled: their tokens work again"))
    return jsonify(changed.to_dict())


@bp.delete("/users/<user>")
@admin
def remove_user(user: str) -> Response:
    revoked = _ctx().users.remove(validate_user_name(user))
    _event("user.removed", f"user {user} removed; {len(revoked)} token(s) revoked")
    return jsonify({"deleted": user, "revoked_tokens": revoked})


# tokens (admin: anyone's; a user: their own)
@bp.post("/tokens")
@signed_in
def create_token() -> tuple[Response, int]:
    body = _json_body()
    user = _user_field(body.get("user", g.principal.name))
    _own_or_admin(user)
    made = _ctx().users.create_token(user, body.get("name"))
    _event("token.created", f"token {made.info.id} of {user} created" + (f" ({made.info.name})" if made.info.name
                                                                          else ""))
    return jsonify(made.to_dict()), 201


@bp.get("/tokens")
@signed_in
def list_tokens() -> Response:
    user = request.args.get("user")
    if user is not None:
        _own_or_admin(_user_field(user))
    elif refusal(g.principal, "admin") is not None:
        user = g.principal.name  # a non-admin sees their own
    return jsonify({"tokens": [t.to_dict() for t in _ctx().users.list_tokens(user)]})


@bp.delete("/tokens/<token_id>")
@signed_in
def revoke_token(token_id: str) -> Response:
    info: TokenInfo = _ctx().users.get_token(token_id)
    _own_or_admin(info.user)
    revoked = _ctx().users.revoke_token(token_id)
    if info.revoked_at is None:
        _event("token.revoked", f"token {token_id} of {info.user} revoked")
    return jsonify(revoked.to_dict())
