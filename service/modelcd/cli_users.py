"""``modelcd users`` and ``modelcd tokens``: named users, their roles and API tokens, through
the API (an admin manages users and everyone's tokens; anyone their own tokens). The CLI
sends ``MODELCD_TOKEN`` or ``$MODELCD_HOME/token`` as always, so a user runs
``MODELCD_TOKEN=<their token> modelcd ...``."""

from __future__ import annotations

import click

from modelcd.access import validate_role, validate_user_name
from modelcd.cli import Obj, _out, _table, pass_obj
from modelcd.client import api_path

TOKEN_COLUMNS = ["id", "user", "name", "prefix", "created_at", "last_used_at", "revoked_at"]


def _name(value: str, field: str = "name") -> str:
    """The user name, checked here as the service would (an error names the rule)."""
    return validate_user_name(value, field=field)


@click.group()
def users() -> None:
    """Named users and their roles: viewer, deployer, approver, admin (admin only)."""


@users.command("add")
@click.argument("name")
@click.option("--role", required=True, help="viewer, deployer, approver or admin")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def users_add(obj: Obj, name: str, role: str, as_json: bool) -> None:
    """Add user NAME with ROLE (no token yet: `modelcd tokens create --user NAME`)."""
    user = obj.client.post("/api/v1/users", json={"name": _name(name), "role": validate_role(role)})
    if as_json:
        _out(user)
        return
    click.echo(f"added user {user['name']} ({user['role']}); make them a token with "
               f"`modelcd tokens create --user {user['name']}`")


@users.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def users_list(obj: Obj, as_json: bool) -> None:
    data = obj.client.get("/api/v1/users")
    _out(data) if as_json else _table(data["users"], ["name", "role", "disabled", "created_at"])


@users.command("set-role")
@click.argument("name")
@click.argument("role")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def users_set_role(obj: Obj, name: str, role: str, as_json: bool) -> None:
    """Give user NAME another ROLE (their tokens act with it from the next request)."""
    user = obj.client.post(api_path("users", _name(name), "role"), json={"role": validate_role(role)})
    _out(user) if as_json else click.echo(f"user {user['name']} is now {user['role']}")


@users.command("disable")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def users_disable(obj: Obj, name: str, as_json: bool) -> None:
    """Refuse every token of user NAME from the next request on (user and tokens kept;
    `modelcd users enable NAME` undoes it)."""
    _set_disabled(obj, name, "disable", as_json)


@users.command("enable")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def users_enable(obj: Obj, name: str, as_json: bool) -> None:
    """Accept the tokens of user NAME again."""
    _set_disabled(obj, name, "enable", as_json)


def _set_disabled(obj: Obj, name: str, verb: str, as_json: bool) -> None:
    user = obj.client.post(api_path("users", _name(name), verb))
    _out(user) if as_json else click.echo(f"user {user['name']} {verb}d: their tokens "
                                          + ("are refused" if verb == "disable" else "work again"))


@users.command("remove")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def users_remove(obj: Obj, name: str, as_json: bool) -> None:
    """Remove user NAME; their tokens are revoked at once."""
    done = obj.client.request("DELETE", api_path("users", _name(name)))
    if as_json:
        _out(done)
        return
    click.echo(f"removed user {done['deleted']}; {len(done['revoked_tokens'])} token(s) revoked")


@click.group()
def tokens() -> None:
    """API tokens of named users: made (shown once), listed, revoked."""


@tokens.command("create")
@click.option("--user", "user", default=None, help="whose token (default: yours; another's needs admin)")
@click.option("--name", "label", default=None, help="a label to recognise it by, e.g. laptop or ci")
@click.option("--json", "as_json", is_flag=True, help="print it as JSON (the token included)")
@pass_obj
def tokens_create(obj: Obj, user: str | None, label: str | None, as_json: bool) -> None:
    """Make an API token; it is printed this once and only its hash is kept."""
    body = {"name": label} | ({"user": _name(user, "user")} if user is not None else {})
    made = obj.client.post("/api/v1/tokens", json=body)
    if as_json:
        _out(made)
    else:
        label_text = f" ({made['name']})" if made["name"] else ""
        click.echo(f"token {made['id']} of {made['user']}{label_text}:", err=True)
        click.echo(made["token"])
    click.echo("Store it now: it is shown this once (modelcd keeps only its hash). Use it as "
               "MODELCD_TOKEN=<token> modelcd ...; revoke it with `modelcd tokens revoke "
               f"{made['id']}`", err=True)


@tokens.command("list")
@click.option("--user", "user", default=None, help="only this user's (yours without admin)")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def tokens_list(obj: Obj, user: str | None, as_json: bool) -> None:
    """List tokens: id, user, label, first characters, created, last used, revoked."""
    params = {"user": _name(user, "user")} if user is not None else None
    data = obj.client.get("/api/v1/tokens", params=params)
    _out(data) if as_json else _table(data["tokens"], TOKEN_COLUMNS)


@tokens.command("revoke")
@click.argument("token_id")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def tokens_revoke(obj: Obj, token_id: str, as_json: bool) -> None:
    """Revoke token ID (from `modelcd tokens list`): refused from the next request on."""
    info = obj.client.request("DELETE", api_path("tokens", token_id))
    _out(info) if as_json else click.echo(f"revoked token {info['id']} of {info['user']} at {info['revoked_at']}")
