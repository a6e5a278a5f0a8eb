"""Loaders and scoring helpers of the server's own lm-evaluation-harness tasks (the YAML files beside this one).

The data are JSONL files in this folder, read from here whatever the working directory: no download, no
dataset cache. Written by scripts/make_benchmark_tasks.py from public-domain texts (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _jsonl(name: str) -> Any:
    import datasets  # lm-eval's own dependency; imported only when a task is loaded

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def shakespeare(**_: Any) -> Any:
    return _jsonl("shakespeare.jsonl")


def wikipedia(**_: Any) -> Any:
    return _jsonl("wikipedia.jsonl")


def analogy(**_: Any) -> Any:
    return _jsonl("analogy.jsonl")


def rolling_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """wikitext's perplexities: log-likelihood of the whole text per word, per byte, and bits per byte."""
    (loglikelihood,) = results
    words, nbytes = len(re.split(r"\s+", doc["text"].strip())), len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
