"""Schedule specs of batch deployments, pure: parsing (errors naming ``schedule`` or ``zone``
and the fix) and occurrences as unix times.

A spec is a cron expression of 5 fields (minute hour day-of-month month day-of-week) or 6
(croniter's order: the sixth field is seconds, e.g. ``* * * * * */10`` every ten seconds),
one of ``@hourly @daily @weekly @monthly @yearly``, ``@once`` (one run right after creation)
or ``manual`` (runs only when asked). Cron times are read in ``zone`` (an IANA name, UTC by
default), so ``0 6 * * *`` in Europe/Paris is 06:00 there, summer and winter."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from modelcd.errors import InvalidInput

ONCE = "@once"
MANUAL = "manual"
KEYWORDS = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly")
SPEC_HELP = ("a cron expression of 5 fields (minute hour day month weekday, e.g. '0 * * * *') or 6 (the sixth "
             "is seconds, e.g. '* * * * * */10'), @hourly, @daily, @weekly, @monthly, @yearly, @once or manual")


@dataclass(frozen=True)
class Schedule:
    spec: str
    zone: str = "UTC"

    @property
    def kind(self) -> str:
        """``cron`` (the keywords too), ``once`` or ``manual``."""
        return "once" if self.spec == ONCE else "manual" if self.spec == MANUAL else "cron"

    def _tz(self) -> ZoneInfo:
        return ZoneInfo(self.zone)

    def next_after(self, t: float) -> float:
        """The first occurrence strictly after unix time ``t`` (cron kinds only)."""
        start = datetime.fromtimestamp(math.floor(t), UTC).astimezone(self._tz())
        return croniter(self.spec, start).get_next(datetime).timestamp()

    def latest_at_or_before(self, t: float) -> float:
        """The last occurrence at or before unix time ``t`` (cron kinds only; occurrences fall
        on whole seconds)."""
        start = datetime.fromtimestamp(math.floor(t) + 1, UTC).astimezone(self._tz())
        return croniter(self.spec, start).get_prev(datetime).timestamp()


def parse_schedule(spec: str | None, zone: str | None = None) -> Schedule:
    """A valid ``Schedule`` from what a person typed; InvalidInput naming the field otherwise.
    No spec means ``manual``."""
    text = " ".join((spec or MANUAL).split())
    zone_name = (zone or "UTC").strip()
    try:
        if not zone_name or len(zone_name) > 64:
            raise ValueError
        ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"zone {zone_name[:64]!r} is not an IANA time zone; use a name such as UTC, "
                           "Europe/Paris or America/New_York", field="zone") from None
    lowered = text.lower()
    if lowered in (ONCE, MANUAL, *KEYWORDS):
        return Schedule(lowered, zone_name)
    if lowered.startswith("@"):
        raise InvalidInput(f"schedule {text[:80]!r} is not a known keyword; use {SPEC_HELP}", field="schedule")
    fields = text.split(" ")
    if len(fields) not in (5, 6) or len(text) > 128 or not croniter.is_valid(text):
        raise InvalidInput(f"schedule {text[:80]!r} is not a valid cron expression ({len(fields)} fields); use "
                           f"{SPEC_HELP}", field="schedule")
    try:
        Schedule(text, zone_name).next_after(datetime.now(UTC).timestamp())
    except Exception as e:  # e.g. '0 0 31 2 *': valid fields, no date ever matches
        raise InvalidInput(f"schedule {text[:80]!r} never fires ({e}); use {SPEC_HELP}", field="schedule") from None
    return Schedule(text, zone_name)


def iso(t: float) -> str:
    """A unix time as the ISO UTC text stored and shown (milliseconds)."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
