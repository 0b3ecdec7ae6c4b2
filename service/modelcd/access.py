"""Who may do what: roles, the permissions each grants, and the principal a request acts as.

A principal is a named user with one role. The API, the CLI and the console all resolve a
bearer token (or the console's session) to a principal with ``resolve`` and check an action
with ``can``; every event a person causes records ``principal.name``.

Roles and what they grant (a role grants exactly its set):

- viewer: read
- deployer: read, deploy (register, release, stop, rollback, promote, batch, evaluate)
- approver: read, approve (answer approval gates)
- admin: all of them, and admin (policies, sources, users, tokens, endpoint keys, connections)

The service's API token (``$MODELCD_HOME/token`` or ``MODELCD_TOKEN``) is the first admin,
named ``admin``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from modelcd.errors import InvalidInput

Role = Literal["viewer", "deployer", "approver", "admin"]
Action = Literal["read", "deploy", "approve", "admin"]

ROLES: tuple[Role, ...] = ("viewer", "deployer", "approver", "admin")
ACTIONS: tuple[Action, ...] = ("read", "deploy", "approve", "admin")

GRANTS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"read"}),
    "deployer": frozenset({"read", "deploy"}),
    "approver": frozenset({"read", "approve"}),
    "admin": frozenset({"read", "deploy", "approve", "admin"}),
}

ADMIN_NAME = "admin"  # the principal of the service's API token


@dataclass(frozen=True)
class Principal:
    """A named user acting with one role (``token_id``: which of their tokens, None for the
    service's API token)."""

    name: str
    role: Role
    token_id: str | None = None

    def can(self, action: Action) -> bool:
        return can(self.role, action)


FIRST_ADMIN = Principal(ADMIN_NAME, "admin", None)


def can(role: str, action: str) -> bool:
    """Whether ``role`` grants ``action`` (an unknown role grants nothing)."""
    return action in GRANTS.get(role, frozenset())


def roles_for(action: str) -> list[str]:
    """The roles that grant ``action``, in ``ROLES`` order."""
    return [role for role in ROLES if can(role, action)]


def refusal(principal: Principal, action: str) -> str | None:
    """Why ``principal`` may not do ``action`` (a message naming the roles that may), or None."""
    if principal.can(action):
        return None
    roles = roles_for(action)
    needed = ", ".join(roles[:-1]) + f" or {roles[-1]}" if len(roles) > 1 else roles[0]
    return f"this needs the {needed} role; your token is for {principal.role} `{principal.name}`"


USER_NAME_MAX = 32
USER_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
RESERVED_NAMES = frozenset({ADMIN_NAME, "modelcd"})  # the API token's principal; the engine in events


def validate_user_name(name: object, field: str = "name") -> str:
    """Return ``name`` if it is 1-32 lowercase letters, digits, '.', '_' or '-', starting with
    a letter or digit, and not reserved; otherwise InvalidInput naming the rule."""
    if not isinstance(name, str):
        raise InvalidInput(f"{field}: must be a string, got {type(name).__name__}; e.g. 'alice'", field=field)
    if not USER_NAME_RE.fullmatch(name):
        suggestion = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:USER_NAME_MAX] or "alice"
        raise InvalidInput(f"{field}: {name[:80]!r} is not a valid user name: user names are 1-{USER_NAME_MAX} "
                           "lowercase letters, digits, '.', '_' and '-', starting with a letter or digit; "
                           f"try {suggestion!r}", field=field)
    if name in RESERVED_NAMES:
        raise InvalidInput(f"{field}: {name!r} is reserved ({ADMIN_NAME!r} is the service's API token, 'modelcd' the "
                           "engine itself in events); choose another name", field=field)
    return name


def validate_role(role: object, field: str = "role") -> Role:
    if role not in ROLES:
        raise InvalidInput(f"{field}: {str(role)[:40]!r} is not a role; use one of {', '.join(ROLES)} "
                           "(viewer reads; deployer registers, deploys, stops and rolls back; approver answers "
                           "approval gates; admin does everything, users and tokens included)", field=field)
    return role  # type: ignore[return-value]
