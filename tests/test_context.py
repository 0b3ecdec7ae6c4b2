"""The context wires settings into the adapters it builds."""

from __future__ import annotations

from pathlib import Path

from modelcd.config import load_settings
from modelcd.context import build_context
from modelcd.routing.builtin import BuiltinRouter


def test_the_router_gets_the_allow_open_endpoints_setting(tmp_path: Path) -> None:
    for value, expected in (("true", True), ("false", False)):
        settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / value),
                                          "MODELCD_ROUTER_ALLOW_OPEN_ENDPOINTS": value})
        ctx = build_context(settings)
        try:
            assert isinstance(ctx.router, BuiltinRouter) and ctx.router.allow_open_endpoints is expected
        finally:
            ctx.db.dispose()
