"""Checks for the strings a registry user supplies: model names, tags, environment names and
descriptions. Each is checked once, at the edge, against one pattern, so that afterwards it
is safe as a path segment, a Docker tag, a Kubernetes label and a workflow value. A
rejection lists every problem in one message and, where it can, suggests a fixed value."""

from __future__ import annotations

import re
from collections.abc import Mapping

from modelcd.errors import InvalidInput

MODEL_NAME_MAX = 64
TAG_KEY_MAX = 63
TAG_VALUE_MAX = 256
ENVIRONMENT_NAME_MAX = 32
DESCRIPTION_MAX = 4096
MAX_TAGS = 64

MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TAG_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
ENVIRONMENT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")

_NAME_CHARS = "letters, digits, '.', '_' and '-'"


def _bad_chars(value: str, allowed: re.Pattern[str]) -> list[str]:
    """Distinct characters of ``value`` that ``allowed`` (a one-character class) rejects."""
    seen: list[str] = []
    for ch in value:
        if not allowed.fullmatch(ch) and ch not in seen:
            seen.append(ch)
    return seen


def _show(chars: list[str]) -> str:
    return ", ".join(repr(c) for c in chars)


def _suggest(value: str, bad: re.Pattern[str], first: re.Pattern[str], max_len: int, fallback: str) -> str:
    """A value close to ``value`` that passes: bad runs become '-', a bad start is dropped."""
    fixed = re.sub(r"-{2,}", "-", bad.sub("-", value))
    while fixed and not first.match(fixed):
        fixed = fixed[1:]
    fixed = fixed[:max_len].rstrip("-._")
    return fixed or fallback


def _name_problems(value: str, *, max_len: int, first: str, chars: re.Pattern[str], chars_text: str) -> list[str]:
    """Every reason ``value`` is not a valid name under the given rules."""
    if not value:
        return ["it is empty"]
    problems: list[str] = []
    if len(value) > max_len:
        problems.append(f"it is {len(value)} characters long (at most {max_len})")
    if not re.match(first, value[0]):
        problems.append(f"it starts with {value[0]!r} (must start with a letter or digit)")
    bad = _bad_chars(value, chars)
    if bad:
        problems.append(f"it contains {_show(bad)} (allowed: {chars_text})")
    return problems


def validate_model_name(name: object, field: str = "name") -> str:
    """Return ``name`` if it matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``; otherwise raise
    InvalidInput listing every problem and suggesting a fixed name."""
    if not isinstance(name, str):
        raise InvalidInput(f"{field}: must be a string, got {type(name).__name__}; "
                           f"use letters, digits, '.', '_' and '-', e.g. 'my-model'", field=field)
    if MODEL_NAME_RE.fullmatch(name):
        return name
    problems = _name_problems(name, max_len=MODEL_NAME_MAX, first="[A-Za-z0-9]",
                              chars=re.compile(r"[A-Za-z0-9._-]"), chars_text=_NAME_CHARS)
    suggestion = _suggest(name, re.compile(r"[^A-Za-z0-9._-]+"), re.compile(r"[A-Za-z0-9]"),
                          MODEL_NAME_MAX, "model")
    raise InvalidInput(f"{field}: {name!r} is not a valid model name: {'; '.join(problems)}. "
                       f"Names are 1-{MODEL_NAME_MAX} characters of {_NAME_CHARS}, starting with a "
                       f"letter or digit; try {suggestion!r}", field=field)


def validate_environment_name(name: object, field: str = "environment") -> str:
    """Return ``name`` if it matches ``[a-z0-9][a-z0-9-]{0,31}`` (DNS-label-like); otherwise
    raise InvalidInput listing every problem and suggesting a fixed name."""
    if not isinstance(name, str):
        raise InvalidInput(f"{field}: must be a string, got {type(name).__name__}; "
                           "use lowercase letters, digits and '-', e.g. 'staging'", field=field)
    if ENVIRONMENT_NAME_RE.fullmatch(name):
        return name
    problems = _name_problems(name, max_len=ENVIRONMENT_NAME_MAX, first="[a-z0-9]",
                              chars=re.compile(r"[a-z0-9-]"), chars_text="lowercase letters, digits and '-'")
    suggestion = _suggest(name.lower(), re.compile(r"[^a-z0-9-]+"), re.compile(r"[a-z0-9]"),
                          ENVIRONMENT_NAME_MAX, "production")
    raise InvalidInput(f"{field}: {name!r} is not a valid environment name: {'; '.join(problems)}. "
                       f"Environment names are 1-{ENVIRONMENT_NAME_MAX} lowercase letters, digits and '-', "
                       f"starting with a letter or digit; try {suggestion!r}", field=field)


def _tag_key_problems(key: object) -> list[str]:
    if not isinstance(key, str):
        return [f"key {key!r} is a {type(key).__name__}, not a string"]
    if TAG_KEY_RE.fullmatch(key):
        return []
    problems = _name_problems(key, max_len=TAG_KEY_MAX, first="[A-Za-z0-9]",
                              chars=re.compile(r"[A-Za-z0-9._-]"), chars_text=_NAME_CHARS)
    suggestion = _suggest(key, re.compile(r"[^A-Za-z0-9._-]+"), re.compile(r"[A-Za-z0-9]"), TAG_KEY_MAX, "tag")
    return [f"key {key!r}: {', '.join(problems)}; try {suggestion!r}"]


def _tag_value_problems(key: object, value: object) -> list[str]:
    if not isinstance(value, str):
        return [f"value of {key!r} is a {type(value).__name__}; tag values are strings, quote it "
                f"(e.g. {str(value)!r})"]
    problems: list[str] = []
    if len(value) > TAG_VALUE_MAX:
        problems.append(f"value of {key!r} is {len(value)} characters long (at most {TAG_VALUE_MAX}); shorten it")
    bad = [c for c in dict.fromkeys(value) if not c.isprintable()]
    if bad:
        problems.append(f"value of {key!r} contains non-printable characters {_show(bad)} "
                        "(newlines, tabs and control characters are not allowed); remove them")
    return problems


def validate_tags(tags: object, field: str = "tags") -> dict[str, str]:
    """Return a copy of ``tags`` if every key matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,62}`` and every
    value is a printable string of at most 256 characters; otherwise raise InvalidInput
    listing every problem."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise InvalidInput(f"{field}: must be a mapping of key: value strings, got {type(tags).__name__}; "
                           'e.g. {"team": "fraud"}', field=field)
    problems: list[str] = []
    if len(tags) > MAX_TAGS:
        problems.append(f"there are {len(tags)} tags (at most {MAX_TAGS}); drop some")
    for key, value in tags.items():
        problems += _tag_key_problems(key)
        problems += _tag_value_problems(key, value)
    if problems:
        raise InvalidInput(f"{field}: invalid tags: {'; '.join(problems)}. Tag keys are 1-{TAG_KEY_MAX} "
                           f"characters of {_NAME_CHARS} starting with a letter or digit", field=field)
    return {str(k): str(v) for k, v in tags.items()}


def validate_description(text: object, field: str = "description") -> str:
    """Return ``text`` (None becomes "") if it is at most 4096 characters with no control
    characters other than newline and tab; otherwise raise InvalidInput listing the problems."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise InvalidInput(f"{field}: must be a string, got {type(text).__name__}; pass plain text",
                           field=field)
    problems: list[str] = []
    if len(text) > DESCRIPTION_MAX:
        problems.append(f"it is {len(text)} characters long (at most {DESCRIPTION_MAX}); shorten it")
    bad = [c for c in dict.fromkeys(text) if c not in "\n\t" and not c.isprintable()]
    if bad:
        problems.append(f"it contains control characters {_show(bad)}; remove them "
                        "(newlines and tabs are allowed)")
    if problems:
        raise InvalidInput(f"{field}: invalid description: {'; '.join(problems)}", field=field)
    return text
