"""Policy ``idle`` (scale to zero) and the sleeping backends of the routing table it leads to:
typed values, defaults, refusals naming the field and the fix, and a table that says which
backend sleeps (and reads as before when none does)."""

from __future__ import annotations

import pytest

from modelcd.errors import InvalidInput
from modelcd.releases.policy import IdleStandby, InvalidPolicy, parse_policy
from modelcd.routing.table import Backend, EndpointRoute, RoutingTable

BASE = "name: p\nenvironments:\n  - name: production\n"


def _idle(body: str) -> str:
    return f"{BASE}    idle: {body}\n"


def _problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(InvalidPolicy) as info:
        parse_policy(text)
    return [(p.path, p.message) for p in info.value.problems]


def test_idle_is_off_by_default_and_typed_when_set() -> None:
    assert parse_policy(BASE).environments[0].idle is None
    idle = parse_policy(_idle("{scale_to_zero_after_s: 300}")).environments[0].idle
    assert idle is not None
    assert (idle.scale_to_zero_after_s, idle.wake_timeout_s, idle.standby) == (300, 10.0, IdleStandby.KEEP)
    idle = parse_policy(_idle("{scale_to_zero_after_s: 2, wake_timeout_s: 2.5, standby: sleep}")).environments[0].idle
    assert idle is not None and (idle.wake_timeout_s, idle.standby) == (2.5, IdleStandby.SLEEP)


@pytest.mark.parametrize("value, shown", [("0", "0"), ("-5", "-5"), ("2.5", "2.5"), ('"60"', "'60'"),
                                          ("true", "true"), ("null", "null"), ("[1]", "a list")])
def test_scale_to_zero_after_s_must_be_a_positive_whole_number(value: str, shown: str) -> None:
    assert _problems(_idle(f"{{scale_to_zero_after_s: {value}}}")) == [
        ("environments[0].idle.scale_to_zero_after_s",
         f"must be a positive whole number of seconds, e.g. 300 (got {shown})")]


def test_every_idle_problem_is_named_at_once() -> None:
    got = _problems(_idle("{wake_timeout_s: 0, standby: nap, after: 3}"))
    assert ("environments[0].idle.scale_to_zero_after_s", "required") in got
    assert ("environments[0].idle.wake_timeout_s", "must be greater than 0 (got 0)") in got
    assert ("environments[0].idle.standby", "must be one of keep, sleep (got 'nap')") in got
    assert any(path == "environments[0].idle.after" and "unknown key" in msg for path, msg in got)
    assert _problems(_idle("300")) == [("environments[0].idle", "must be a mapping (got 300)")]


def test_a_policy_with_a_bad_idle_is_refused_when_applied() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_policy(_idle("{scale_to_zero_after_s: 0}"), "sleepy.yaml")
    assert info.value.field == "environments[0].idle.scale_to_zero_after_s"
    assert "sleepy.yaml:4:" in info.value.message


def test_the_table_marks_sleeping_backends_and_reads_as_before_without() -> None:
    awake = Backend("d1", 1, "http://127.0.0.1:9001", 0)
    asleep = Backend("d2", 2, "http://127.0.0.1:9002", 100, sleeping=True, wake_timeout_s=3.0)
    table = RoutingTable(4, {"m/production": EndpointRoute((awake, asleep))})
    doc = table.to_dict()["endpoints"]["m/production"]["backends"]
    assert doc[0] == {"id": "d1", "version": 1, "url": "http://127.0.0.1:9001", "weight": 0}
    assert doc[1]["sleeping"] is True and doc[1]["wake_timeout_s"] == 3.0
    assert RoutingTable.from_json(table.to_json()) == table


@pytest.mark.parametrize("fields, message", [
    ({"sleeping": "yes"}, "backends[0].sleeping: must be true or false (got 'yes')"),
    ({"sleeping": True, "wake_timeout_s": 0}, "backends[0].wake_timeout_s: must be a number of seconds above 0"),
    ({"asleep": True}, "backends[0]: unknown field(s) asleep"),
])
def test_a_table_with_bad_sleep_fields_is_refused(fields: dict[str, object], message: str) -> None:
    backend = {"id": "d1", "version": 1, "url": "http://127.0.0.1:9001", "weight": 100, **fields}
    with pytest.raises(InvalidInput) as info:
        RoutingTable.from_dict({"generation": 1, "endpoints": {"m/production": {"backends": [backend]}}})
    assert message in info.value.message
