"""What the rows of the systems and serving benchmarks share: a measured row against its baseline and target,
rounding, and the CPU's name for the machine record."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any


def record(
    name: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    ratio: float | None = None,
    target: str | None = None,
    met: bool | None = None,
    **details: Any,
) -> dict[str, Any]:
    """One measured row: value against an optional baseline measured in the same run, and its target."""
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "met": met,
        "details": details,
    }


def rounded(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def cpu_name(default: str = "") -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor(), else `default`."""
    cpu = platform.processor() or default
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu
