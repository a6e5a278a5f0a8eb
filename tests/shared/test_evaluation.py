"""shared.evaluation: the one scoring code (perplexity, completion loss, MC log-likelihood accuracy)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from scaleot_samples.tiny import byte_tokenizer, tiny_model
from shared.data import IGNORE_INDEX, Dataset, MultipleChoice, collate, encode_pair
from shared.evaluation import evaluate, lm_loss

TOK = byte_tokenizer()
V = len(TOK)  # 257


class Prefers(nn.Module):
    """Context-free fake LM: the same logits at every position, favouring the given tokens.

    Its forward has no ``use_cache`` argument, like a plain user module.
    """

    def __init__(self, favoured: str = "", boost: float = 5.0):
        super().__init__()
        bias = torch.zeros(V)
        for t in set(TOK(favoured, add_special_tokens=False)["input_ids"]):
            bias[t] = boost
        self.register_buffer("bias", bias)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, V).clone())


def _mc(*questions: MultipleChoice) -> Dataset:
    return Dataset(Path("mc.jsonl"), "multiple_choice", list(questions))


def test_mc_picks_the_choice_the_model_prefers():
    fav = Prefers("dog")
    right = _mc(MultipleChoice("Which animal barks?", ["cat", "dog", "cow"], 1))
    wrong = _mc(MultipleChoice("Which animal purrs?", ["cat", "dog", "cow"], 0))
    assert evaluate(fav, TOK, right) == {"accuracy": 1.0, "accuracy_norm": 1.0, "n": 1}
    assert evaluate(fav, TOK, wrong) == {"accuracy": 0.0, "accuracy_norm": 0.0, "n": 1}
    mixed = _mc(*right.records, *wrong.records, MultipleChoice("Loyal pet?", ["dog", "eel"], 0))
    assert evaluate(fav, TOK, mixed, batch_size=2)["accuracy"] == pytest.approx(2 / 3)


def test_acc_sums_logprobs_and_acc_norm_divides_by_characters():
    # Uniform logits: every token costs log V, so the shorter continuation wins acc; per character
    # the costs are equal, so acc_norm ties and the tie goes to the first choice.
    uniform = Prefers("")
    ds = _mc(MultipleChoice("q", ["bbbbbb", "b"], 1))
    assert evaluate(uniform, TOK, ds) == {"accuracy": 1.0, "accuracy_norm": 0.0, "n": 1}


def test_completion_loss_counts_completion_tokens_only():
    uniform = Prefers("")
    ds = Dataset(Path("pc.jsonl"), "prompt_completion", [("a long prompt " * 5, " yes"), ("p", " no!")])
    out = evaluate(uniform, TOK, ds)
    assert out["tokens"] == (4 + 1) + (4 + 1)  # completion bytes + EOS each; prompt tokens not counted
    assert out["completion_loss"] == pytest.approx(math.log(V))
    assert out["perplexity"] == pytest.approx(math.exp(out["completion_loss"]))


def test_text_loss_matches_hf_loss_and_perplexity_is_exp_loss():
    model = tiny_model("llama")
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ds = Dataset(Path("a.txt"), "text", [text])
    out = evaluate(model, TOK, ds, seq_len=64, batch_size=2)
    n_blocks = len(text) // 64
    assert out["tokens"] == n_blocks * 63
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    ids = torch.tensor(TOK(text, add_special_tokens=False)["input_ids"][: n_blocks * 64]).view(n_blocks, 64)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss  # equal-length blocks: token mean == mean of means
    assert out["loss"] == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_right_padding_does_not_change_scores(family):
    model = tiny_model(family, n_layers=2)
    ds = Dataset(
        Path("pc.jsonl"),
        "prompt_completion",
        [("short", " a"), ("a much longer prompt here", " and a longer completion"), ("mid prompt", " b")],
    )
    one = evaluate(model, TOK, ds, batch_size=1)
    many = evaluate(model, TOK, ds, batch_size=3)
    assert one["tokens"] == many["tokens"]
    assert many["completion_loss"] == pytest.approx(one["completion_loss"], abs=1e-5)
    mc = _mc(MultipleChoice("pick", ["x", "yy yy yy", "zzz"], 2), MultipleChoice("again", ["long answer", "s"], 0))
    assert evaluate(model, TOK, mc, batch_size=1) == evaluate(model, TOK, mc, batch_size=5)


def test_max_examples_progress_and_mode_restored():
    model = tiny_model("gpt2", n_layers=1).train()
    ds = _mc(*[MultipleChoice(f"q{i}", ["a", "b", "c"], i % 3) for i in range(5)])
    calls: list[tuple[int, int]] = []
    out = evaluate(model, TOK, ds, max_examples=2, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert out["n"] == 2
    assert calls == [(4, 6), (6, 6)]  # 2 questions x 3 choices, in batches of 4
    assert model.training  # evaluate() must not leave a training model in eval mode
    text = Dataset(Path("a.txt"), "text", ["abcdefgh" * 20])
    assert evaluate(model, TOK, text, seq_len=16, max_examples=3)["tokens"] == 3 * 15


def test_lm_loss_shifts_labels_and_ignores_masked():
    uniform = Prefers("")
    ex = encode_pair(TOK, "prompt", " done", seq_len=32)
    batch = collate([ex], pad_id=TOK.pad_token_id)
    assert float(lm_loss(uniform, batch)) == pytest.approx(math.log(V))
    # A model that puts all mass on the true next token has ~zero loss: proves the one-token shift.
    ids = batch["input_ids"][0]

    class Oracle(nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.full((*input_ids.shape, V), -50.0)
            logits[0, torch.arange(len(ids) - 1), ids[1:]] = 50.0
            return SimpleNamespace(logits=logits)

    assert float(lm_loss(Oracle(), batch)) < 1e-6


def test_lm_loss_backpropagates_and_handles_no_label_tokens():
    model = tiny_model("llama", n_layers=1)
    batch = collate([encode_pair(TOK, "hello", " world", seq_len=32)], pad_id=TOK.pad_token_id)
    loss = lm_loss(model, batch)
    loss.backward()
    assert loss.requires_grad and model.model.embed_tokens.weight.grad is not None
    batch["labels"][:] = IGNORE_INDEX
    empty = lm_loss(model, batch)
    assert float(empty.detach()) == 0.0 and empty.requires_grad
