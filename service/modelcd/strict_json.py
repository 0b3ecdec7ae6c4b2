"""JSON as modelcd accepts it from outside: NaN and Infinity are refused (they are not JSON,
and served back they break every client), and so is nesting too deep for the parser, both
as ValueError. No web framework here: the API and the registry both use it."""

from __future__ import annotations

import json
import math
from typing import Any


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is not a finite number")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number or null")


def strict_json_loads(raw: str | bytes) -> Any:
    """``json.loads`` refusing NaN/Infinity and nesting too deep, as ValueError."""
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None
