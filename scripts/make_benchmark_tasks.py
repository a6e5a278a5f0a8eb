"""Write the data of the server's own lm-evaluation-harness tasks (model_owner_server/benchmark_tasks/) from the
public-domain texts of scaleot_samples/corpora.py. Run once; the files are committed, so the server never needs
this script, scaleot_samples or a network at run time. Deterministic:

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/make_benchmark_tasks.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from scaleot_samples.corpora import _task_works, analogy_questions, shakespeare_works, wikipedia_articles

OUT = Path(__file__).resolve().parents[1] / "model_owner_server" / "benchmark_tasks"
N_DOCS, DOC_CHARS, N_ANALOGY = 24, 1200, 200


def _passage(text: str, rng: random.Random) -> str:
    """A window of about DOC_CHARS characters starting and ending at line boundaries."""
    start = rng.randrange(0, max(1, len(text) - 2 * DOC_CHARS))
    start = text.find("\n", start) + 1
    end = text.rfind("\n", start, start + DOC_CHARS)
    return text[start : end if end > start else start + DOC_CHARS].strip()


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(OUT.parents[1])}: {len(rows)} rows, {path.stat().st_size} bytes")


def main() -> None:
    rng = random.Random(0)
    # Shakespeare: works the demo's data owner never trains or evaluates on (its task picks works with seed 0).
    used = {name for name, _ in _task_works(4, 1, 0)}
    works = sorted((n, t) for n, t in shakespeare_works().items() if n not in used)
    docs = [{"work": n, "text": _passage(t, rng)} for n, t in rng.sample(works, N_DOCS)]
    _write(OUT / "shakespeare.jsonl", docs)
    # Wikipedia: the first articles of gensim's excerpt, one passage each.
    wiki = []
    for title, body in wikipedia_articles():
        wiki.append({"title": title, "text": body[:DOC_CHARS].rsplit(" ", 1)[0]})
        if len(wiki) == N_DOCS:
            break
    _write(OUT / "wikipedia.jsonl", wiki)
    # Google analogy questions: every 50th question of the file (all sections), 4 choices.
    qs = analogy_questions(seed=0)[:: max(1, len(analogy_questions(seed=0)) // N_ANALOGY)][:N_ANALOGY]
    _write(
        OUT / "analogy.jsonl",
        [{"question": q.question, "choices": q.choices, "answer": q.answer} for q in qs],
    )


if __name__ == "__main__":
    main()
