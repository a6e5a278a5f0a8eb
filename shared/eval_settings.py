"""One measurement for the four columns of a tune table: the settings an evaluation scores with, and the check that
two columns counted the same tokens.

The client scores the emulator (zero-shot, fine-tuned) and the server scores M (zero-shot) and the plug-in M' on the
same file. Their figures compare only when both sides used the same ``seq_len`` and ``max_examples`` (blocks,
records, conversations or questions) and so scored the same tokens. The client sends its settings with the upload
(``metrics["eval_settings"]``); the server scores with them, within its own caps, and records what it used
(``settings`` on each evaluation). An upload without them (an older client) is scored with the server's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EVAL_SETTINGS_KEY = "eval_settings"  # the key of the client's settings in an upload's `metrics` part


@dataclass(frozen=True)
class EvalSettings:
    seq_len: int
    max_examples: int | None  # None: the whole file

    def to_json(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "max_examples": self.max_examples}

    def describe(self) -> str:
        cap = "all examples" if self.max_examples is None else f"max_examples {self.max_examples}"
        return f"seq_len {self.seq_len}, {cap}"


def parse_eval_settings(value: Any) -> EvalSettings:
    """The client's settings from an upload (``{"seq_len": int >= 2, "max_examples": int >= 1 | null}``);
    ValueError saying what is wrong otherwise."""
    if not isinstance(value, dict):
        raise ValueError(f"{EVAL_SETTINGS_KEY} must be an object {{seq_len, max_examples}}")
    seq_len, max_examples = value.get("seq_len"), value.get("max_examples")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"{EVAL_SETTINGS_KEY}.seq_len must be an integer of at least 2 (got {seq_len!r:.40})")
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ValueError(
            f"{EVAL_SETTINGS_KEY}.max_examples must be a positive integer or null (got {max_examples!r:.40})"
        )
    return EvalSettings(seq_len, max_examples)


def resolve_eval_settings(
    requested: EvalSettings | None, *, default: EvalSettings, max_seq_len: int, max_examples: int
) -> tuple[EvalSettings, str, list[str]]:
    """The settings the server scores with, where they came from ("client" or "server default") and notes on
    what its caps changed. The caps clamp (never refuse: the adapter was trained already); a clamped setting
    makes the client's columns a different measurement, and the client's table then says so."""
    if requested is None:
        return default, "server default", []
    notes: list[str] = []
    seq_len, cap = requested.seq_len, requested.max_examples
    if seq_len > max_seq_len:
        notes.append(f"seq_len {seq_len} clamped to the server's cap {max_seq_len} (SCALEOT_EVAL_MAX_SEQ_LEN)")
        seq_len = max_seq_len
    if cap is None or cap > max_examples:
        asked = "all examples" if cap is None else f"max_examples {cap}"
        notes.append(f"{asked} clamped to the server's cap {max_examples} (SCALEOT_EVAL_MAX_EXAMPLES)")
        cap = max_examples
    return EvalSettings(seq_len, cap), "client", notes


def counted(metrics: Mapping[str, Any] | None) -> int | None:
    """What one evaluation counted: its tokens (perplexity kinds) or its questions (multiple choice)."""
    if not metrics:
        return None
    for key in ("tokens", "n"):
        value = metrics.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def measurements(columns: Mapping[str, Mapping[str, Any] | None]) -> list[list[str]]:
    """The present columns grouped by what they counted, in column order: one group is one measurement."""
    groups: dict[int | None, list[str]] = {}
    for name, metrics in columns.items():
        if metrics:
            groups.setdefault(counted(metrics), []).append(name)
    return list(groups.values())
