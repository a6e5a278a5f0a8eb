"""Chat-format (``messages``) sample data: word analogies as short multi-turn conversations.

Each conversation is a system prompt and ``turns`` user/assistant exchanges ("Athens is to Greece as Baghdad
is to what?" -> "Iraq"). The questions are the Google analogy set shipped in gensim's test data (see
corpora.py), split by the asked pair as write_analogy_files does, so no eval answer is a training answer.
Without that package a built-in set of capital/country analogies stands in (the tiny demo, tests).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.data import MultipleChoice

from .corpora import CorpusNotInstalledError, analogy_split

SYSTEM = "You complete analogies between words. Answer with the missing word only."

_CAPITALS = (
    ("Athens", "Greece"),
    ("Paris", "France"),
    ("Rome", "Italy"),
    ("Berlin", "Germany"),
    ("Madrid", "Spain"),
    ("Oslo", "Norway"),
    ("Cairo", "Egypt"),
    ("Tokyo", "Japan"),
    ("Lima", "Peru"),
    ("Vienna", "Austria"),
    ("Dublin", "Ireland"),
    ("Lisbon", "Portugal"),
)


def conversation(questions: Sequence[MultipleChoice], system: str | None = SYSTEM) -> dict[str, Any]:
    """One ``{"messages": [...]}`` record: the system prompt, then one user/assistant exchange per question."""
    messages = [{"role": "system", "content": system}] if system else []
    for q in questions:
        messages.append({"role": "user", "content": f"{q.question} what?"})
        messages.append({"role": "assistant", "content": q.choices[q.answer]})
    return {"messages": messages}


def builtin_analogies(seed: int = 0) -> tuple[list[MultipleChoice], list[MultipleChoice]]:
    """Capital/country analogies from a fixed list (train, eval), disjoint by the asked capital."""
    rng = random.Random(seed)
    qs = [
        MultipleChoice(f"{a} is to {b} as {c} is to", [d], 0)
        for i, (a, b) in enumerate(_CAPITALS)
        for j, (c, d) in enumerate(_CAPITALS)
        if i != j
    ]
    rng.shuffle(qs)
    eval_capitals = {c for c, _ in _CAPITALS[-3:]}

    def asked(q: MultipleChoice) -> str:
        return q.question.rsplit(" as ", 1)[1].removesuffix(" is to")

    return [q for q in qs if asked(q) not in eval_capitals], [q for q in qs if asked(q) in eval_capitals]


def write_chat_files(
    out_dir: str | Path,
    n_train: int = 600,
    n_eval: int = 100,
    turns: int = 3,
    seed: int = 0,
    *,
    builtin_fallback: bool = False,
) -> dict[str, Path]:
    """``chat_train.jsonl`` / ``chat_eval.jsonl``: ``n_train`` / ``n_eval`` conversations of ``turns`` analogies.

    With ``builtin_fallback`` the built-in analogies stand in when gensim's data is not installed (fewer
    conversations then, as many as they make); otherwise CorpusNotInstalledError says what to install."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1; got {turns}")
    try:
        train, evalq = analogy_split(seed)
    except CorpusNotInstalledError:
        if not builtin_fallback:
            raise
        train, evalq = builtin_analogies(seed)
        n_train, n_eval = min(n_train, len(train) // turns), min(n_eval, len(evalq) // turns)
    if n_train * turns > len(train) or n_eval * turns > len(evalq):
        raise ValueError(
            f"at most {len(train) // turns} train and {len(evalq) // turns} eval conversations of {turns} turns"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, qs, n in (("chat_train", train, n_train), ("chat_eval", evalq, n_eval)):
        lines = [json.dumps(conversation(qs[i * turns : (i + 1) * turns]), ensure_ascii=False) for i in range(n)]
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files
