"""The instruction-tuning writer (scaleot_samples/instructions.py) on the real corpus it ships with:
chatterbot-corpus must be installed (scripts/bootstrap.sh installs it), so a missing package fails here."""

import json

import pytest

from scaleot_samples import instructions
from scaleot_samples.corpora import CorpusNotInstalledError
from shared.data import load_dataset


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_files_are_prompt_completion_records_split_by_question(tmp_path):
    files = instructions.write_instruction_files(tmp_path)
    assert set(files) == {"instruction_train", "instruction_eval", "instruction_eval_short"}
    train, evalr, short = (load_dataset(files[k]) for k in files)
    assert train.kind == evalr.kind == short.kind == "prompt_completion"
    assert len(train) > 500 and len(evalr) > 100 and len(short) > 20
    for rec in _lines(files["instruction_train"]) + _lines(files["instruction_eval"]):
        assert rec.keys() == {"prompt", "completion"}
        assert rec["prompt"].startswith("User: ") and rec["prompt"].endswith("\nAssistant:")
        assert rec["completion"].startswith(" ") and rec["completion"].strip()

    # No held-out question (the last user turn) is asked in training, whatever the answer or the category.
    def question(prompt: str) -> str:
        return " ".join(prompt.rsplit("User: ", 1)[1].removesuffix("\nAssistant:").lower().split())

    train_q = {question(p) for p, _ in train.records}
    assert not train_q & {question(p) for p, _ in evalr.records}
    assert len(set(train.records)) == len(train)  # de-duplicated
    # The exact-match set is the held-out trivia: a subset of eval, short answers.
    assert set(short.records) <= set(evalr.records)
    assert max(len(c.split()) for _, c in short.records) <= 25


def test_split_is_deterministic_and_seeded(tmp_path):
    a = instructions.write_instruction_files(tmp_path / "a", seed=0)
    b = instructions.write_instruction_files(tmp_path / "b", seed=0)
    c = instructions.write_instruction_files(tmp_path / "c", seed=1)
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes()
    assert a["instruction_eval"].read_bytes() != c["instruction_eval"].read_bytes()
    # Every category is represented in eval (a fixed share per category file).
    train, evalp = instructions.instruction_split()
    assert {p.category for p in evalp} == {p.category for p in instructions.instruction_pairs()}
    assert len(train) + len(evalp) <= len(instructions.instruction_pairs())


def test_multi_turn_conversations_keep_earlier_turns_in_the_prompt():
    multi = [p for p in instructions.instruction_pairs() if p.prompt.count("User: ") > 1]
    assert multi
    p = multi[0]
    assert "\nAssistant: " in p.prompt  # an earlier assistant turn is context, not a target
    assert instructions.format_prompt(["hi", "hello", "how are you?"]) == (
        "User: hi\nAssistant: hello\nUser: how are you?\nAssistant:"
    )


def test_normalize_answer_is_squad_style():
    assert instructions.normalize_answer("The Andromeda Galaxy.") == "andromeda galaxy"
    assert instructions.normalize_answer("  A gyroscope!") == "gyroscope"
    assert instructions.normalize_answer("1963") == "1963"


def test_missing_package_names_the_install_command(monkeypatch):
    import scaleot_samples.corpora as corpora

    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    instructions._pairs_cached.cache_clear()
    try:
        with pytest.raises(CorpusNotInstalledError, match=r"pip install --no-deps chatterbot-corpus==1\.3\.3"):
            instructions.instruction_pairs()
    finally:
        instructions._pairs_cached.cache_clear()
    with pytest.raises(ValueError, match="eval_fraction"):
        instructions.instruction_split(eval_fraction=1.5)
