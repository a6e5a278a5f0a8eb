"""shared.data: every bad file gets a clear error naming file and line; packing; masking; collate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scaleot_samples.tiny import byte_tokenizer
from shared.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    MultipleChoice,
    collate,
    encode_pair,
    format_mc_choice,
    format_mc_prompt,
    load_dataset,
    pack_text_blocks,
    training_examples,
)

TOK = byte_tokenizer()
EOS = TOK.eos_token_id


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def _jsonl(*objs) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n"


PC = {"prompt": "p", "completion": "c"}
MC = {"question": "q", "choices": ["a", "b"], "answer": 0}

# (file name, content, 1-based line or None, substrings the message must contain)
BAD_FILES = [
    ("empty.txt", "", None, ["empty"]),
    ("blank.txt", "  \n\t\n", None, ["empty"]),
    ("empty.jsonl", "", None, ["no records"]),
    ("blanklines.jsonl", "\n\n  \n", None, ["no records"]),
    ("bad.csv", "a,b\n", None, ["unsupported file type", ".jsonl"]),
    ("syntax.jsonl", _jsonl(PC, PC, '{"prompt": "x", '), 3, ["invalid JSON", "one complete JSON object"]),
    ("list.jsonl", _jsonl(PC, [1, 2]), 2, ["expected a JSON object", "got list"]),
    (
        "keys.jsonl",
        _jsonl(*[PC] * 6, {"foo": 1}),
        7,
        [
            'expected a JSON object with "text", or "prompt"+"completion", or "question"+"choices"+"answer", '
            "or \"messages\"; got keys ['foo']"
        ],
    ),
    ("mixed.jsonl", _jsonl(PC, {"text": "t"}), 2, ["same form as the first", '"prompt"+"completion"']),
    ("textnum.jsonl", _jsonl({"text": "ok"}, {"text": 5}), 2, ['"text" must be a string', "int"]),
    ("emptyprompt.jsonl", _jsonl({"prompt": "", "completion": "c"}), 1, ['"prompt" is empty']),
    ("emptycompl.jsonl", _jsonl(PC, {"prompt": "p", "completion": "   "}), 2, ['"completion" is empty']),
    ("choicesstr.jsonl", _jsonl({**MC, "choices": "a b"}), 1, ['"choices" must be a list of strings']),
    ("onechoice.jsonl", _jsonl(MC, {**MC, "choices": ["a"]}), 2, ["at least 2"]),
    ("emptychoice.jsonl", _jsonl({**MC, "choices": ["a", ""]}), 1, ["empty string"]),
    ("dupchoice.jsonl", _jsonl({**MC, "choices": ["a", "a"]}), 1, ["duplicates"]),
    ("range.jsonl", _jsonl(MC, MC, {**MC, "answer": 2}), 3, ["index 2 is out of range", "0..1"]),
    ("negative.jsonl", _jsonl({**MC, "answer": -1}), 1, ["out of range"]),
    ("answerstr.jsonl", _jsonl({**MC, "answer": "c"}), 1, ["'c' is not one of the choices"]),
    ("answerbool.jsonl", _jsonl({**MC, "answer": True}), 1, ['"answer" must be a choice index']),
    ("answerfloat.jsonl", _jsonl({**MC, "answer": 1.0}), 1, ['"answer" must be a choice index']),
    ("utf8.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, ["not valid UTF-8", "save the file as UTF-8"]),
    ("utf8.txt", b"line one\nline \xff two\n", 2, ["not valid UTF-8"]),
]


@pytest.mark.parametrize("name,content,line,needles", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_get_clear_errors(tmp_path, name, content, line, needles):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as ei:
        load_dataset(path)
    msg = str(ei.value)
    prefix = f"{path} line {line}: " if line is not None else f"{path}: "
    assert msg.startswith(prefix), msg
    assert ei.value.line == line and ei.value.path == path
    for needle in needles:
        assert needle in msg, msg
    assert isinstance(ei.value, ValueError)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_dataset(tmp_path / "nope.jsonl")
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_dataset(d)


def test_txt_is_one_record(tmp_path):
    ds = load_dataset(_write(tmp_path, "a.txt", "hello\n\nworld\n"))
    assert ds.kind == "text" and ds.records == ["hello\n\nworld\n"] and ds.path == tmp_path / "a.txt"


def test_jsonl_kinds_blank_lines_extra_keys_bom(tmp_path):
    ds = load_dataset(_write(tmp_path, "t.jsonl", "\ufeff" + _jsonl({"text": "a", "id": 1}, "", {"text": "b"})))
    assert (ds.kind, ds.records, len(ds)) == ("text", ["a", "b"], 2)
    ds = load_dataset(_write(tmp_path, "pc.jsonl", _jsonl({"prompt": "p1", "completion": "c1"}, "  ", PC)))
    assert ds.kind == "prompt_completion" and ds.records == [("p1", "c1"), ("p", "c")]
    ds = load_dataset(
        _write(
            tmp_path,
            "mc.jsonl",
            _jsonl(
                {"question": "q", "choices": ["x", "y", "z"], "answer": "z"},
                {"question": "r", "choices": ["x", "y"], "answer": 1},
            ),
        )
    )
    assert ds.kind == "multiple_choice"
    assert ds.records == [MultipleChoice("q", ["x", "y", "z"], 2), MultipleChoice("r", ["x", "y"], 1)]


def test_unicode_line_separator_inside_string_is_not_a_line_break(tmp_path):
    ds = load_dataset(_write(tmp_path, "u.jsonl", json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n"))
    assert ds.records == ["a\u2028b"]


def test_json_array_file(tmp_path):
    ds = load_dataset(_write(tmp_path, "a.json", json.dumps([PC, PC], indent=2)))
    assert ds.kind == "prompt_completion" and len(ds) == 2
    with pytest.raises(DataError, match=r"a2\.json line 2: .*got keys \['x'\]"):
        load_dataset(_write(tmp_path, "a2.json", json.dumps([PC, {"x": 1}])))


# ---------------------------------------------------------------- packing


def test_pack_text_blocks_shapes_and_eos_join():
    texts = ["a" * 10, "b" * 5]  # byte tokenizer: 10 + EOS + 5 = 16 tokens
    blocks = pack_text_blocks(TOK, texts, 4)
    assert blocks.shape == (4, 4) and blocks.dtype == torch.long
    flat = blocks.flatten()
    assert flat[10] == EOS and (flat == EOS).sum() == 1  # EOS between texts only, none at the ends
    assert pack_text_blocks(TOK, texts, 7).shape == (2, 7)  # 2 remainder tokens dropped
    assert pack_text_blocks(TOK, texts, 100).shape == (1, 16)  # less than a block: one short block
    assert pack_text_blocks(TOK, texts, 16).shape == (1, 16)


def test_pack_text_blocks_no_special_tokens_added():
    assert pack_text_blocks(TOK, ["hi"], 8).tolist() == [TOK("hi", add_special_tokens=False)["input_ids"]]


def test_pack_text_blocks_errors():
    with pytest.raises(DataError, match="no tokens"):
        pack_text_blocks(TOK, [""], 8)
    with pytest.raises(DataError, match="no tokens"):
        pack_text_blocks(TOK, [], 8)
    with pytest.raises(ValueError, match="seq_len"):
        pack_text_blocks(TOK, ["abc"], 1)


# ---------------------------------------------------------------- examples


def _ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_masks_exactly_the_prompt(tmp_path):
    ds = load_dataset(
        _write(
            tmp_path,
            "pc.jsonl",
            _jsonl({"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Say hi.", "completion": " hi there"}),
        )
    )
    exs = training_examples(ds, TOK, 64)
    for ex, (prompt, completion) in zip(exs, ds.records, strict=True):
        p, c = _ids(prompt), [*_ids(completion), EOS]
        assert ex.input_ids.tolist() == p + c
        assert ex.labels[: len(p)].eq(IGNORE_INDEX).all()
        assert ex.labels[len(p) :].tolist() == c  # loss on every completion token and the EOS
        assert (ex.labels != IGNORE_INDEX).sum() == len(c)


def test_prompt_truncated_from_the_left():
    ex = encode_pair(TOK, "0123456789abcdef", "XYZ", seq_len=8)
    assert len(ex.input_ids) == 8
    assert ex.input_ids.tolist() == _ids("cdef") + _ids("XYZ") + [EOS]
    assert ex.labels.tolist() == [IGNORE_INDEX] * 4 + _ids("XYZ") + [EOS]


def test_overlong_completion_keeps_one_prompt_token():
    ex = encode_pair(TOK, "prompt", "abcdefghijkl", seq_len=5)
    assert ex.input_ids.tolist() == _ids("t") + _ids("abcd")
    assert ex.labels.tolist() == [IGNORE_INDEX, *_ids("abcd")]


def test_text_examples_label_everything(tmp_path):
    ds = load_dataset(_write(tmp_path, "a.txt", "x" * 50))
    exs = training_examples(ds, TOK, 16)
    assert len(exs) == 3 and all(torch.equal(e.input_ids, e.labels) and len(e.input_ids) == 16 for e in exs)


def test_multiple_choice_examples_train_on_correct_choice(tmp_path):
    q = MultipleChoice("Athens is to Greece as Baghdad is to", ["Spain", "Iraq"], 1)
    assert format_mc_prompt(q) == "Question: Athens is to Greece as Baghdad is to\nAnswer:"
    assert format_mc_choice("Iraq") == " Iraq"
    ds = load_dataset(
        _write(tmp_path, "mc.jsonl", _jsonl({"question": q.question, "choices": q.choices, "answer": "Iraq"}))
    )
    (ex,) = training_examples(ds, TOK, 128)
    p = _ids(format_mc_prompt(q))
    assert ex.input_ids.tolist() == p + _ids(" Iraq") + [EOS]
    assert ex.labels.tolist() == [IGNORE_INDEX] * len(p) + _ids(" Iraq") + [EOS]


def test_collate_right_pads_and_masks():
    a = Example(torch.tensor([1, 2, 3]), torch.tensor([IGNORE_INDEX, 2, 3]))
    b = Example(torch.tensor([4]), torch.tensor([4]))
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(v.dtype == torch.long for v in out.values())
