"""The router process starts fast and alone: it imports the standard library, httptools
(uvloop when installed) and modelcd's routing modules, nothing of the control plane."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
import modelcd.routing.proxy
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in ("modelcd", "pydantic", "flask"))))
"""


def test_router_process_imports_only_the_routing_modules() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True, timeout=60)
    loaded = json.loads(out.stdout)
    assert [m for m in loaded if m not in ("modelcd", "modelcd.errors") and not m.startswith("modelcd.routing")] == []
    assert "modelcd.routing.proxy" in loaded and "modelcd.routing.base" not in loaded
