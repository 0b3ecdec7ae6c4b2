"""How YAML problems in a version's files are described to the person who sent them."""

from __future__ import annotations


def yaml_problem(e: Exception) -> str:
    """A one-line description of a YAML (or decoding) error, with its line number."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or type(e).__name__
    return f"{problem} at line {mark.line + 1}" if mark is not None else str(problem)
