"""Regenerate the demo's output in the docs from real runs, so README and walkthrough cannot drift.

    python scripts/docs_demo.py              # one `scripts/demo.py` run with the defaults
    python scripts/docs_demo.py --runs 2     # two seeded runs in a row, and whether their figures agree

It runs the demo as a user would (a subprocess, its console output captured), then rewrites:
- README.md: the report block between `<!-- demo-report:start -->` and `<!-- demo-report:end -->`;
- docs/walkthrough.md: the transcript (and, with --runs 2, the reproducibility check) between
  `<!-- demo-run:start -->` and `<!-- demo-run:end -->`.
Everything else in those files is prose written by hand. `make docs-demo` calls this.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scripts" / "demo.py"
README = ROOT / "README.md"
WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
# Report keys that legitimately differ between two runs with the same seed: ids, ports, clocks, paths.
VOLATILE = re.compile(r"(^|_)(id|ids|s|seconds|timings_s|total_s|workdir)$")


def reproducible_view(report: Any) -> Any:
    """The report without the fields that name ids or measure time: what must match run to run."""
    if isinstance(report, dict):
        # File sizes as the report prints them (0.1 MB): the emulator's header records the calibration's
        # wall time and the model folder's path, a few bytes that vary from run to run.
        return {
            k: round(v / 1e5) if k.endswith("_bytes") and isinstance(v, int) else reproducible_view(v)
            for k, v in report.items()
            if not VOLATILE.search(k)
        }
    if isinstance(report, list):
        return [reproducible_view(v) for v in report]
    return report


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Human-readable paths where two reproducible views differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def clean_transcript(text: str) -> str:
    """Keep what a terminal would finally show: the last state of each carriage-returned progress line."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def run_demo(workdir: Path, report_path: Path, demo_args: list[str]) -> tuple[str, dict[str, Any], float]:
    cmd = [sys.executable, str(DEMO), "--workdir", str(workdir), "--report-json", str(report_path), *demo_args]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    chunks: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # show it live, keep it for the docs
        sys.stdout.write(line)
        chunks.append(line)
    if proc.wait() != 0:
        sys.exit(f"the demo failed (exit {proc.returncode}); the docs were left unchanged")
    return clean_transcript("".join(chunks)), json.loads(report_path.read_text()), time.monotonic() - t0


def report_block(transcript: str) -> str:
    start = transcript.index("=" * 78)
    end = transcript.index("(report saved to")
    return transcript[start:end].rstrip()


def replace_between(path: Path, marker: str, body: str) -> None:
    text = path.read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        sys.exit(f"{path.relative_to(ROOT)} lacks the markers {start} ... {end}; put them where the block goes")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body.strip()}\n{end}{tail}")


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"load average {load:.1f} when it finished, Python {platform.python_version()}"
    )


def fmt_s(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1, choices=(1, 2), help="2: run twice and compare the figures")
    ap.add_argument("--workdir", type=Path, default=ROOT / "demo-run", help="where the demo runs (default demo-run/)")
    ap.add_argument("demo_args", nargs=argparse.REMAINDER, help="passed to scripts/demo.py after `--`")
    args = ap.parse_args(argv)
    demo_args = [a for a in args.demo_args if a != "--"]

    runs = []
    for i in range(args.runs):
        workdir = args.workdir if i == 0 else args.workdir.with_name(args.workdir.name + f"-run{i + 1}")
        runs.append(run_demo(workdir, workdir / "report.json", demo_args))
    transcript, _report, wall = runs[0]
    cmd = "python scripts/demo.py" + (" " + " ".join(demo_args) if demo_args else "")
    when = time.strftime("%Y-%m-%d", time.gmtime())
    intro = f"Generated by `make docs-demo` on {when}: `{cmd}`, {fmt_s(wall)} wall time on this machine ({machine()})."
    body = [intro, "", "```", transcript, "```"]
    if len(runs) == 2:
        diffs = differences(reproducible_view(runs[0][1]), reproducible_view(runs[1][1]))
        b = runs[1][1]
        body += [
            "",
            "### The same seed twice",
            "",
            f"A second run right after the first ({fmt_s(runs[1][2])}), same seed and defaults "
            f"(plan: {b['plan']}), its report below. "
            + (
                "Every figure of the report (plan, sizes, fidelity, losses, perplexities) is identical; only "
                "ids and timings differ."
                if not diffs
                else f"{len(diffs)} figures differ:\n\n" + "\n".join(f"- {d}" for d in diffs)
            ),
            "",
            "```",
            report_block(runs[1][0]),
            "```",
        ]
    replace_between(WALKTHROUGH, "demo-run", "\n".join(body))
    replace_between(README, "demo-report", f"```\n{report_block(transcript)}\n```")
    print(f"\nrewrote {README.relative_to(ROOT)} and {WALKTHROUGH.relative_to(ROOT)} from the run(s)")
    if len(runs) == 2 and diffs:
        print(f"the two runs differ in {len(diffs)} figures (see the walkthrough)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
