"""Charts as inline SVG, drawn on the server: a traffic split as one bar, and the figures of a
release's canary and shadow steps (traffic share, error rate, p95, agreement) as bar charts.
Every text that reaches the markup is escaped; sizes are relative (viewBox), so a chart scales
with the page and its zoom."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

BAR_W, BAR_H = 200, 12  # the traffic bar's units: it keeps this shape at any width
COLOURS = ("#2f6db5", "#e08a1e", "#3a9a5b", "#b5452f", "#7b5bb5", "#5b8a9a")


def traffic_bar(segments: Sequence[tuple[str, float]], label: str) -> Markup:
    """One horizontal bar split by weight (``[(name, weight)]``), each part named with its share
    (inside it when it is wide enough, in its tooltip always)."""
    total = sum(w for _, w in segments if w > 0)
    parts: list[str] = []
    x = 0.0
    if total <= 0:
        parts.append(f'<rect x="0" y="0" width="{BAR_W}" height="{BAR_H}" fill="#ddd"/>'
                     f'<text x="{BAR_W / 2}" y="{BAR_H * 0.68:.1f}" font-size="6" text-anchor="middle">'
                     'no traffic</text>')
    for i, (name, weight) in enumerate(s for s in segments if s[1] > 0):
        width = BAR_W * weight / total
        share = f"{100.0 * weight / total:.0f}%"
        colour = COLOURS[i % len(COLOURS)]
        parts.append(f'<rect x="{x:.2f}" y="0" width="{width:.2f}" height="{BAR_H}" fill="{colour}">'
                     f'<title>{escape(name)}: {share}</title></rect>')
        if width >= 24:
            parts.append(f'<text x="{x + width / 2:.2f}" y="{BAR_H * 0.68:.1f}" font-size="6" fill="#fff" '
                         f'text-anchor="middle">{escape(name)} {share}</text>')
        x += width
    return Markup(f'<svg class="bar" viewBox="0 0 {BAR_W} {BAR_H}" role="img" aria-label="{escape(label)}">'
                  f'{"".join(parts)}</svg>')


@dataclass(frozen=True)
class Step:
    """One canary or shadow step with what was measured in it (None: not measured)."""

    name: str
    share: float | None = None  # % of live traffic the candidate served
    error_rate: float | None = None  # failed / answered, 0..1
    p95_ms: float | None = None
    agreement: float | None = None  # 0..1 (shadow and mirrored steps)
    requests: int | None = None
    outcome: str = ""


_STEP_EVENT = re.compile(r"(\d+)% of traffic to v\d+")
_HELD = re.compile(r"step held [0-9.]+s: (\d+) scoring requests, (\d+) failed(?:, p95 ([0-9.]+) ms)?")


def release_steps(events: Sequence[dict[str, Any]], promote_log: Sequence[str],
                  analysis: Sequence[dict[str, Any]] | None) -> list[Step]:
    """The steps of a release's promote stage: canary steps from their ``canary.step`` events and
    the "step held" lines of the promote job's log, shadow and mirrored steps from the release's
    analysis record."""
    shares = [int(m.group(1)) for e in events if e.get("kind") == "canary.step"
              and (m := _STEP_EVENT.search(str(e.get("message", ""))))]
    held = [m for line in promote_log if (m := _HELD.search(line))]
    steps: list[Step] = []
    for i, share in enumerate(shares):
        m = held[i] if i < len(held) else None
        total, failed = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        steps.append(Step(name=f"canary {share}%", share=float(share), requests=total,
                          error_rate=(failed / total) if total else None,
                          p95_ms=float(m.group(3)) if m and m.group(3) else None,
                          outcome="held" if m else "running"))
    for doc in analysis or ():
        f = doc.get("figures") or {}
        requests = f.get("requests") or 0
        steps.append(Step(name=str(doc.get("step", "analysis")), share=0.0 if doc.get("step") == "shadow" else None,
                          error_rate=(f.get("candidate_failures", 0) / requests) if requests else None,
                          p95_ms=f.get("candidate_p95_ms"), agreement=f.get("agreement"),
                          requests=f.get("rows"), outcome=str(doc.get("outcome", ""))))
    return steps


def step_chart(title: str, steps: Sequence[Step], attr: str, unit: str, scale: float = 1.0,
               maximum: float | None = None) -> Markup:
    """Bars of one figure per step (``getattr(step, attr) * scale``), labelled with the value."""
    values = [getattr(s, attr) for s in steps]
    shown = [v * scale for v in values if v is not None]
    top = maximum if maximum is not None else (max(shown) if shown else 1.0) or 1.0
    n = max(len(steps), 1)
    slot = 100.0 / n
    bars: list[str] = []
    for i, (step, value) in enumerate(zip(steps, values, strict=True)):
        x = i * slot + slot * 0.15
        w = slot * 0.7
        label = escape(step.name)
        if value is None:
            bars.append(f'<text x="{x + w / 2:.2f}" y="38" font-size="3.2" text-anchor="middle">—</text>')
        else:
            v = value * scale
            h = 30.0 * min(v / top, 1.0) if top else 0.0
            bars.append(f'<rect x="{x:.2f}" y="{40 - h:.2f}" width="{w:.2f}" height="{max(h, 0.3):.2f}" '
                        f'fill="{COLOURS[0]}"><title>{label}: {v:.3g}{escape(unit)}</title></rect>'
                        f'<text x="{x + w / 2:.2f}" y="{38 - h:.2f}" font-size="3.2" text-anchor="middle">'
                        f'{v:.3g}{escape(unit)}</text>')
        bars.append(f'<text x="{x + w / 2:.2f}" y="45" font-size="3" text-anchor="middle">{label}</text>')
    return Markup(f'<figure class="chart"><figcaption>{escape(title)}</figcaption>'
                  f'<svg viewBox="0 0 100 47" role="img" aria-label="{escape(title)} per step">'
                  f'<line x1="0" y1="40" x2="100" y2="40" stroke="#999" stroke-width="0.2"/>{"".join(bars)}</svg>'
                  f'</figure>')
