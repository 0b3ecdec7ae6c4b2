"""Release plans and policy plans as people read them (``modelcd releases plan``, ``modelcd
policies apply --plan``): pure functions of the API's JSON, so the CLI imports nothing heavy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _split(versions: Mapping[str, Any]) -> str:
    return ", ".join(f"v{v} {w}%" for v, w in versions.items()) or "nothing"


def _built(built: Any, cache_hit: Any, note: str | None) -> str:
    if built is True:
        return "already built (cache hit)"
    if cache_hit is True:
        return f"not built yet, but {note}" if note else "built earlier in this chain (cache hit)"
    if built is False:
        return "not built yet"
    return note or "unknown"


def _artifact(a: Mapping[str, Any]) -> str:
    if a.get("error"):
        return f"the build would fail: {a['error']}"
    note = a.get("note")
    if a.get("kind") == "bundle":
        key = str(a.get("env_key") or "")[:12] or "(decided at build)"
        text = (f"environment {key} {_built(a.get('env_built'), a.get('cache_hit'), note)}; bundle "
                f"{a.get('bundle')} {'already built' if a.get('bundle_built') else 'not built yet'}")
        if note and a.get("cache_hit") is not True:
            text += f" ({note})"
        return text
    if a.get("kind") == "image":
        text = f"image {a.get('image')} {_built(a.get('image_built'), a.get('cache_hit'), note)}"
        return text + (f", pushed to {a['push_to']}" if a.get("push_to") else "")
    return str(note or "nothing to build")


def _analysis(a: Mapping[str, Any] | None) -> str:
    gates = {k: v for k, v in (a or {}).items() if v is not None}
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in gates.items())


def _strategy(s: Mapping[str, Any]) -> str:
    if s.get("name") == "shadow":
        text = (f"shadow on {s.get('sample_rate', 1.0):.0%} of live requests for at most {s.get('shadow_s'):g} s, "
                f"judged by {_analysis(s.get('analysis')) or 'the defaults'}")
        return text if s.get("shadowed", True) else text + "; nothing serves yet, so all traffic moves at once"
    if s.get("name") != "canary":
        return str(s.get("name"))
    limits = f"max_error_rate {s.get('max_error_rate')}"
    if s.get("max_p95_ms"):
        limits += f", max_p95_ms {s['max_p95_ms']:g}"
    steps = "/".join(str(p) for p in s.get("steps") or [])
    text = f"canary {steps}% holding {s.get('step_hold_s'):g} s per step ({limits})"
    if s.get("mirror"):
        text += f", answers compared on copies ({_analysis(s.get('analysis')) or 'default gates'})"
    if s.get("effective_steps") == [100] and s.get("steps") != [100]:
        text += "; nothing serves yet, so all traffic moves at once"
    return text


STAGE_ORDER = ("build", "evaluate", "deploy", "smoke", "promote", "rollback")


def _stages(stages: Mapping[str, str]) -> str:
    by_place: dict[str, list[str]] = {}
    for stage in sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER)):
        by_place.setdefault(stages[stage], []).append(stage)
    return "; ".join(f"{', '.join(names)} {'on the service' if place == 'service' else f'in the {place}'}"
                     for place, names in by_place.items())


def release_plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """The text form of a ``ReleasePlan.to_dict()``."""
    pol = plan["policy"]
    stored = f"revision {pol['stored_revision']}, " if pol.get("stored_revision") else ""
    lines = [
        f"plan for {plan['model']} v{plan['version']} ({plan['flavor']}, digest {plan['digest'][:12]}, source "
        f"{plan['source']}); nothing was changed",
        f"policy:   {pol['name']} ({stored}content {pol['revision']})",
        f"why:      {pol['why']}",
        f"runner:   {plan['runner']}; auto: {'true' if plan['auto'] else 'false'}; chain: "
        f"{' → '.join(plan['chain'])}",
        f"what:     {plan['summary']}",
    ]
    total = len(plan["chain"])
    for env in plan["environments"]:
        d = env["deployment"]
        lines += ["", f"[{env['position']}/{total}] {env['name']}: {env['target']} target, "
                      f"{_strategy(env['strategy'])}"]
        lines.append(f"  stages:    {_stages(env['stages'])}")
        lines.append(f"  artifact:  {_artifact(env['artifact'])}")
        smoke = env["smoke"]
        lines.append(f"  smoke:     {smoke['requests']} requests within p95 {smoke['p95_ms']:g} ms, tolerance "
                     f"{smoke['tolerance']:g}, timeout {smoke['timeout_s']:g} s"
                     + ("" if smoke.get("sample") else " (no sample: /healthz only)"))
        evaluation = env.get("evaluation") or {}
        if evaluation.get("required"):
            latest = evaluation.get("latest")
            lines.append(f"  evaluate:  {evaluation['thresholds']} on {evaluation['data']} (label "
                         f"{evaluation['label']}; a stored result younger than {evaluation['max_age_s']:g} s is reused)"
                         + (f"; latest {evaluation['metric']} {latest['value']:.4g} on {latest['rows']} rows"
                            if latest and latest.get("value") is not None else ""))
        approval = env["approval"]
        lines.append("  approval:  " + (f"a person approves after smoke (timeout {approval['timeout_s']:g} s)"
                                        if approval.get("required") else "none"))
        deploy = f"{d['workers']} workers, auth {d['auth']}"
        if d.get("network"):
            deploy += f", network {d['network']}"
        if d.get("cpu") or d.get("memory"):
            deploy += f", cpu {d.get('cpu') or '-'}, memory {d.get('memory') or '-'}"
        if d.get("env_names"):
            deploy += f"; env {', '.join(d['env_names'])}"
            if d.get("secret_names"):
                deploy += f" (secrets: {', '.join(d['secret_names'])})"
        lines.append(f"  deploy:    {deploy}")
        ep = env["endpoint"]
        lines.append(f"  serving:   {_split(ep['traffic'])} at {ep['uri']}"
                     + (f" (reuses live deployment {ep['reuses_deployment']})" if ep.get("reuses_deployment") else ""))
        retire = env["retire"]
        gone = ", ".join(f"{r['id']} (v{r['version']})" for r in retire["deployments"]) or "nothing"
        lines.append(f"  retires:   {gone} after promotion (keep_deployments {retire['keep']})")
        lines.append(f"  rollback:  {env['rollback']['note']}")
        lines += [f"  note:      {n}" for n in env.get("notes") or ()]
    lines += [f"warning: {w}" for w in plan.get("warnings") or ()]
    return lines


def policy_plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """The text form of a ``PolicyChangePlan.to_dict()``."""
    stored = (f"stored revision {plan['stored_revision']}" if plan.get("stored_revision") is not None
              else "not stored yet")
    versions = plan["versions"]
    lines = [f"policy {plan['name']} (content {plan['revision']}; {stored}): {plan['changed']} of {len(versions)} "
             "current versions would change"
             + (" (the stored policy already has this content)" if plan.get("unchanged_text") else "")]
    for c in versions:
        head = f"  {c['model']} v{c['version']} ({c['why']}): "
        if not c["changed"]:
            lines.append(head + f"no change (policy {c['after']['name']})")
            continue
        same = c["before"]["name"] == c["after"]["name"]
        lines.append(head + (f"policy {c['after']['name']}, new settings" if same
                             else f"policy {c['before']['name']} → {c['after']['name']}"))
        lines += [f"    {d}" for d in c["differences"] if not d.startswith("policy: ")]
    lines.append("nothing was stored; apply it without --plan to store it")
    return lines
