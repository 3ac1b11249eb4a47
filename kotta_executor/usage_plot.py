"""A job's resource samples as a small SVG: CPU% and memory over time, written by hand (no
plotting dependency).  Two polylines share the time axis; CPU% reads on the left axis,
memory (MiB, RSS summed over the task's process tree) on the right."""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

W, H = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 60, 70, 30, 40
CPU_COLOUR, MEM_COLOUR = "#d62728", "#1f77b4"


def _nice_max(value: float) -> float:
    """A round upper bound for an axis."""
    if value <= 0:
        return 1.0
    step = 10 ** len(str(int(value))) / 10
    for mult in (1, 2, 2.5, 5, 10):
        if value <= step * mult:
            return step * mult
    return value


def svg(samples: list[dict[str, Any]], title: str = "") -> str:
    """An SVG document of ``samples`` (dicts with ``t``, ``cpu_pct``, ``rss_kb``)."""
    pts = sorted((s for s in samples if "t" in s), key=lambda s: s["t"])
    t0 = pts[0]["t"] if pts else 0.0
    span = max((pts[-1]["t"] - t0) if pts else 0.0, 1e-9)
    cpu_max = _nice_max(max((s.get("cpu_pct", 0) for s in pts), default=0))
    mem_max = _nice_max(max((s.get("rss_kb", 0) / 1024 for s in pts), default=0))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (t - t0) / span * pw if len(pts) > 1 else LEFT + pw / 2

    def y(v: float, top: float) -> float:
        return TOP + ph - v / top * ph

    cpu = " ".join(f"{x(s['t']):.1f},{y(s.get('cpu_pct', 0), cpu_max):.1f}" for s in pts)
    mem = " ".join(f"{x(s['t']):.1f},{y(s.get('rss_kb', 0) / 1024, mem_max):.1f}" for s in pts)
    bottom, right = TOP + ph, LEFT + pw
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
        # axes: time (bottom), CPU% (left), memory (right)
        f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="{CPU_COLOUR}"/>',
        f'<line x1="{right}" y1="{TOP}" x2="{right}" y2="{bottom}" stroke="{MEM_COLOUR}"/>',
        f'<text x="{LEFT}" y="{bottom + 15}" text-anchor="middle">0</text>',
        f'<text x="{right}" y="{bottom + 15}" text-anchor="middle">{span if pts else 0:.0f}</text>',
        f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">time since first sample (s)</text>',
        f'<text x="{LEFT - 5}" y="{bottom}" text-anchor="end">0</text>',
        f'<text x="{LEFT - 5}" y="{TOP + 4}" text-anchor="end">{cpu_max:g}</text>',
        f'<text x="{right + 5}" y="{bottom}">0</text>',
        f'<text x="{right + 5}" y="{TOP + 4}">{mem_max:g}</text>',
        f'<text transform="translate(15,{TOP + ph / 2}) rotate(-90)" text-anchor="middle" '
        f'fill="{CPU_COLOUR}">CPU %</text>',
        f'<text transform="translate({W - 12},{TOP + ph / 2}) rotate(90)" text-anchor="middle" '
        f'fill="{MEM_COLOUR}">memory (MiB RSS)</text>',
        f'<polyline id="cpu" fill="none" stroke="{CPU_COLOUR}" stroke-width="1.5" points="{cpu}"/>',
        f'<polyline id="memory" fill="none" stroke="{MEM_COLOUR}" stroke-width="1.5" '
        f'points="{mem}"/>',
        "</svg>",
    ]
    if len(pts) == 1:  # a polyline of one point draws nothing: a dot for each instead
        [s] = pts
        out[-3:-1] = [
            f'<circle id="cpu" cx="{x(s["t"]):.1f}" cy="{y(s.get("cpu_pct", 0), cpu_max):.1f}" '
            f'r="3" fill="{CPU_COLOUR}"/>',
            f'<circle id="memory" cx="{x(s["t"]):.1f}" '
            f'cy="{y(s.get("rss_kb", 0) / 1024, mem_max):.1f}" r="3" fill="{MEM_COLOUR}"/>',
        ]
    return "\n".join(out) + "\n"
