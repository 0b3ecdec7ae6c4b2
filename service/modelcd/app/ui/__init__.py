"""The console: server-rendered pages at ``/ui/`` on the API's port (``docs/console.md``).

Pages read the domain directly (``Context``), never the HTTP API. A person signs in with a
token (``/ui/login``) and gets a server-side session (``sessions``); every page needs one
(when API reads are open, ``MODELCD_OPEN_READS``, a page is shown read-only without one, as a
viewer would see it, with a link to sign in), every POST carries the session's CSRF secret
and every action checks the principal's role
(``access.can``) — a button a role cannot use is not rendered, and its POST is refused (403)
anyway. Templates autoescape and fail on an undefined name; charts are SVG drawn here; the
only script (``static/console.js``) shows times in the reader's zone and follows live parts
through server-sent events (``stream``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

from flask import Blueprint, Flask, Response, abort, current_app, g, redirect, request, url_for
from jinja2 import StrictUndefined
from markupsafe import Markup, escape
from werkzeug.exceptions import HTTPException

from modelcd.access import Action, Principal
from modelcd.app.ui.sessions import COOKIE, Session, Sessions, api_token_ref
from modelcd.context import Context
from modelcd.errors import ModelcdError, NotFound
from modelcd.users import principal_for

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static",
               static_url_path="/static")

PUBLIC = frozenset({"ui.login", "ui.login_post", "ui.static"})
# who reads the pages without a session while API reads are open: a viewer that may do nothing else
ANONYMOUS = Session(id_hash="", principal=Principal("anonymous", "viewer", None), token_ref=None, csrf="",
                    flash=None, expires_at=float("inf"))


def ctx() -> Context:
    return current_app.extensions["modelcd"]


def sessions() -> Sessions:
    return Sessions(ctx().db)


def principal_for_token(token: str) -> Principal | None:
    """Who ``token`` signs in as (the service's API token is the first admin)."""
    return principal_for(ctx(), token)


def current_principal(session: Session) -> Principal | None:
    """The session's principal as the store has it now: None once the token it signed in with
    is revoked (or the service's API token changed) or its user disabled or removed; a changed
    role applies at once."""
    who = session.principal
    if who.token_id is None:  # the service's API token: as long as it is still the same token
        same = session.token_ref == api_token_ref(current_app.extensions["modelcd_token"])
        return who if same else None
    users = ctx().users
    try:
        token = users.get_token(who.token_id)
        user = users.get(token.user)
    except NotFound:
        return None
    if token.revoked_at or user.disabled:
        return None
    return Principal(user.name, user.role, token.id)


def principal() -> Principal:
    return g.ui_session.principal


def require(action: Action) -> Principal:
    """The signed-in principal, or 403 when its role does not grant ``action``."""
    who = principal()
    if not who.can(action):
        abort(403, f"{who.name} ({who.role}) may not {action}; ask an admin for a role that may")
    return who


def flash_and_redirect(message: str, to: str) -> Response:
    sessions().set_flash(g.ui_session, message)
    return redirect(to, code=303)


def safe_next(target: str | None) -> str:
    """A local /ui/ path to return to after signing in (anything else: the models page)."""
    if target and target.startswith("/ui/") and not target.startswith("//"):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and "\\" not in target:
            return target
    return "/ui/models"


@bp.before_request
def _signed_in() -> Response | None:
    origin = request.headers.get("Origin")
    if request.method == "POST" and origin and urlsplit(origin).netloc != request.host:
        abort(403, "a form of another site may not post here")
    if request.endpoint in PUBLIC:
        return None
    store = sessions()
    session = store.get(request.cookies.get(COOKIE))
    if session is not None:
        who = current_principal(session)
        if who is None:
            store.end(session)
            session = None
        elif who != session.principal:
            session = replace(session, principal=who)
    if session is None:
        if request.method not in ("GET", "HEAD"):
            abort(403, "sign in first")
        if not ctx().settings.reads_open:
            return redirect(url_for("ui.login", next=request.full_path.rstrip("?")), code=303)
        session = ANONYMOUS
    g.ui_session = session
    if request.method == "POST" and not session.csrf_ok(request.form.get("csrf_token")):
        abort(403, "the form's CSRF token is missing or wrong; reload the page and try again")
    return None


@bp.after_request
def _headers(resp: Response) -> Response:
    resp.headers.setdefault("Cache-Control", "no-store")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                               "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'")
    return resp


def _page_error(status: int, message: str) -> Response:
    from flask import render_template

    session: Session | None = g.get("ui_session")
    body = render_template("error.html", status=status, message=message, session=session, flash=None)
    return Response(body, status=status, mimetype="text/html")


@bp.errorhandler(ModelcdError)
def _domain_error(e: ModelcdError) -> Response:
    return _page_error(int(e.http_status), e.message)


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException) -> Response:
    return _page_error(e.code or 500, e.description or e.name)


def when(value: Any) -> Markup:
    """A stored ISO UTC time as ``<time>`` (the script shows it in the reader's zone)."""
    if not value:
        return Markup("—")
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return Markup(escape(value))
    text = dt.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup(f'<time datetime="{escape(dt.isoformat())}" title="{escape(text)}">{escape(text)}</time>')


def duration(start: Any, end: Any) -> str:
    if not start:
        return ""
    try:
        a = datetime.fromisoformat(str(start))
        b = datetime.fromisoformat(str(end)) if end else None
    except ValueError:
        return ""
    if b is None:
        return ""
    seconds = (b - a).total_seconds()
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def page_url(number: int) -> str:
    args = {k: v for k, v in request.args.items() if k != "page"}
    if number > 1:
        args["page"] = str(number)
    query = "&".join(f"{quote(k)}={quote(v)}" for k, v in args.items())
    return request.path + (f"?{query}" if query else "")


def page_number() -> int:
    raw = request.args.get("page", "1")
    return int(raw) if raw.isdigit() and 0 < int(raw) < 1_000_000 else 1


def register(app: Flask) -> None:
    """Mount the console on ``app`` (its templates: autoescape, StrictUndefined)."""
    from modelcd.app.ui import actions, pages, stream  # noqa: F401 - they add their routes to bp

    app.jinja_env.undefined = StrictUndefined
    app.jinja_env.autoescape = True
    app.jinja_env.filters["when"] = when
    app.jinja_env.globals.update(duration=duration, page_url=page_url)
    app.register_blueprint(bp)
