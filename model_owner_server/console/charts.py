"""Small server-rendered SVG charts: readable without JavaScript, nothing to fetch, one role="img" with a
text label each (screen readers get the numbers from the tables next to them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from markupsafe import Markup, escape

W, H, PAD_L, PAD_B, PAD_T = 640, 220, 48, 28, 14


def finite(v: Any) -> float | None:
    """`v` as a float when it is a finite real number; None for anything else. Chart values may come from a
    client (an upload's metrics): strings, dicts, booleans, NaN and infinities are not drawn."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:  # an int too large for a float
        return None
    return f if math.isfinite(f) else None


def _frame(title: str, body: str, height: int = H) -> Markup:
    return Markup(
        f'<svg class="chart" viewBox="0 0 {W} {height}" role="img" aria-label="{escape(title)}" '
        f'preserveAspectRatio="xMidYMid meet"><title>{escape(title)}</title>{body}</svg>'
    )


def _scale(lo: float, hi: float, top: float, bottom: float):
    # Halved so that hi - lo cannot overflow to infinity for values near the float limits.
    span = (hi / 2 - lo / 2) or 1.0
    return lambda v: bottom - (v / 2 - lo / 2) / span * (bottom - top)


def bar_chart(
    labels: Sequence[str],
    values: Sequence[Any],
    title: str,
    classes: Sequence[str] | None = None,
    digits: int = 3,
) -> Markup:
    """Vertical bars from a zero line (importance scores are centred on 0, so bars may point down).
    Only finite numbers get a bar: other values (and their labels) are left out."""
    kept = [
        (label, f, classes[i] if classes else "")
        for i, (label, v) in enumerate(zip(labels, values, strict=True))
        if (f := finite(v)) is not None
    ]
    if not kept:
        return Markup("")
    labels, vals, kept_classes = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
    lo, hi = min(0.0, *vals), max(0.0, *vals)
    y = _scale(lo, hi, PAD_T + 12, H - PAD_B)
    step = (W - PAD_L - 8) / len(vals)
    width = max(2.0, step * 0.7)
    parts = [f'<line class="axis" x1="{PAD_L}" x2="{W - 4}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>']
    for i, (label, v) in enumerate(zip(labels, vals, strict=True)):
        x = PAD_L + i * step + (step - width) / 2
        top, bottom = sorted((y(v), y(0)))
        cls = f"bar {kept_classes[i]}" if classes else "bar"
        parts.append(
            f'<rect class="{escape(cls)}" x="{x:.1f}" y="{top:.1f}" width="{width:.1f}" '
            f'height="{max(bottom - top, 0.5):.1f}"><title>{escape(label)}: {v:.{digits}g}</title></rect>'
        )
        if len(vals) <= 32:
            parts.append(
                f'<text class="tick" x="{x + width / 2:.1f}" y="{H - 10}" text-anchor="middle">{escape(label)}</text>'
            )
            ty = top - 3 if v >= 0 else bottom + 11
            parts.append(
                f'<text class="value" x="{x + width / 2:.1f}" y="{ty:.1f}" text-anchor="middle">{v:.{digits}g}</text>'
            )
    parts.append(
        f'<text class="tick" x="4" y="{y(hi) + 4:.1f}">{hi:.3g}</text>'
        f'<text class="tick" x="4" y="{y(lo) + 4:.1f}">{lo:.3g}</text>'
    )
    return _frame(title, "".join(parts))


def line_chart(points: Sequence[tuple[Any, Any]], title: str, y_label: str) -> Markup:
    """One series against the step number (a loss or reward history)."""
    pts = [(fx, fv) for x, v in points if (fx := finite(x)) is not None and (fv := finite(v)) is not None]
    if len(pts) < 2:
        return Markup("")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    y = _scale(min(ys), max(ys), PAD_T, H - PAD_B)
    x0, x1 = min(xs), max(xs)
    xscale = (W - PAD_L - 10) / ((x1 - x0) or 1.0)
    path = " ".join(f"{PAD_L + (x - x0) * xscale:.1f},{y(v):.1f}" for x, v in pts)
    body = (
        f'<line class="axis" x1="{PAD_L}" x2="{W - 4}" y1="{H - PAD_B}" y2="{H - PAD_B}"/>'
        f'<polyline class="line" points="{path}"/>'
        f'<text class="tick" x="4" y="{y(max(ys)) + 4:.1f}">{max(ys):.3g}</text>'
        f'<text class="tick" x="4" y="{y(min(ys)) + 4:.1f}">{min(ys):.3g}</text>'
        f'<text class="tick" x="{PAD_L}" y="{H - 8}">step {x0:.0f}</text>'
        f'<text class="tick" x="{W - 4}" y="{H - 8}" text-anchor="end">step {x1:.0f}</text>'
        f'<text class="tick" x="{PAD_L + 4}" y="{PAD_T}">{escape(y_label)}</text>'
    )
    return _frame(title, body)


def plan_cells(plan: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The layer plan as one cell per layer: adapter / harmonizer / frozen / SRC-compressed / dropped."""
    if not plan:
        return []
    ranks = plan.get("ranks") or {}
    cells = []
    for i, role in enumerate(plan.get("roles") or []):
        kind = "src" if role == "frozen" and ranks.get(str(i)) else role
        label = {"src": "SRC-compressed", "frozen": "frozen"}.get(kind, role)
        cells.append({"index": i, "kind": kind, "label": label})
    return cells
