"""Where a benchmark's results go: the environment preamble of every result file, result paths, tables,
the PNG backend, the marked block in docs/benchmarks.md, and publish() for all of them."""

from __future__ import annotations

from benchmarks.harness import DOCS, log, write_json  # first: sets the thread and offline environment

# isort: split
import os
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------- results


def environment(profile: str, model_id: str, budget: Any, device: Any) -> dict[str, Any]:
    """The preamble every result file starts with: what ran, where, with which budget."""
    return {
        "profile": profile,
        "model": model_id,
        "budget": asdict(budget),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def result_paths(results_dir: Path, name: str, profile: str) -> tuple[Path, Path, Path]:
    """<name>.json/.md/.png for the full profile, <name>_<profile>.* otherwise (quick runs never overwrite)."""
    stem = name if profile == "full" else f"{name}_{profile}"
    return tuple(results_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))  # type: ignore[return-value]


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None (the PNG is skipped with a note) when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping the PNG (pip install matplotlib, or the project's dev extra)")
        return None
    return plt


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


def update_docs_block(path: Path, marker: str, block: str) -> None:
    """Replace the text between `<!-- marker:start -->` and `<!-- marker:end -->` (appended when absent; the
    block alone when the file is missing or empty); the rest of the file is untouched."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.is_file() else ""
    new = f"{start}\n{block.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + new + rest.split(end, 1)[1]
    elif text.strip():
        text = text.rstrip() + "\n\n" + new + "\n"
    else:
        text = new + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{marker}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def publish(
    results_dir: Path,
    name: str,
    profile: str,
    doc: dict,
    md: str,
    docs_marker: str | None = None,
) -> tuple[Path, Path]:
    """The result JSON and markdown (result_paths), and, given a marker, the same markdown as that block of
    docs/benchmarks.md. Returns the JSON and markdown paths."""
    json_path, md_path, _ = result_paths(results_dir, name, profile)
    write_json(json_path, doc)
    md_path.write_text(md)
    if docs_marker is not None:
        update_docs_block(DOCS, docs_marker, md)
    return json_path, md_path
