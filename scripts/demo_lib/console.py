"""What the demo prints: lines on stdout, numbered steps with a clock, seconds and bytes for people."""

from __future__ import annotations

import time

_t0 = time.monotonic()


def restart_clock() -> None:
    """Step times count from now (the demo's start)."""
    global _t0
    _t0 = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - _t0


def say(message: str = "") -> None:
    print(message, flush=True)


def step(title: str) -> None:
    say(f"\n[{clock()}] == {title}")


def clock() -> str:
    s = int(elapsed())
    return f"{s // 60:02d}:{s % 60:02d}"


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
