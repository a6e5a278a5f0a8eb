"""The benchmark job's lm-eval runs give a model exactly one BOS where its tokenizer adds one (issue 22).

lm-eval 0.4.13 encoded a perplexity task's document with the tokenizer's default encoding (which starts with
BOS for Gemma / Llama / OPT) and then put its BOS prefix in front again. These tests run the server's own tasks
through `run_tasks` on a tiny random LLaMA and record every token sequence that reaches the model.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model_owner_server.jobs.tasks import benchmark_eval
from tests.shared.test_block_start import family_tokenizer

ROLLING, CHOICE = "scaleot_shakespeare", "scaleot_analogy"
LIMIT = 2


def _docs(task: str) -> list[dict]:
    with open(benchmark_eval.SERVER_TASKS_DIR / f"{task.removeprefix('scaleot_')}.jsonl") as f:
        return [json.loads(line) for line in f][:LIMIT]


def _seen(tok, task: str, monkeypatch, *, plain_hflm: bool = False) -> list[list[int]]:
    """Every input row the model is called with while lm-eval runs `task` (padding stripped)."""
    if plain_hflm:  # lm-eval's own HFLM, as the job used it before the fix
        from lm_eval.models.huggingface import HFLM

        monkeypatch.setattr(benchmark_eval, "one_bos_hflm", lambda: HFLM)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,  # lm-eval's window: the longer documents take two
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    rows: list[list[int]] = []

    def record(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        rows.extend(ids.tolist())

    model.register_forward_pre_hook(record, with_kwargs=True)
    benchmark_eval._offline()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(benchmark_eval.SERVER_TASKS_DIR)], include_defaults=False)
    benchmark_eval.run_tasks(model, tok, manager, [task], limit=LIMIT, num_fewshot=None, batch_size=4)
    return rows  # lm-eval right-pads a batch (token 0, a byte of this tokenizer): compare prefixes only


def _first_windows(tok, rows: list[list[int]]) -> list[list[int]]:
    """The windows that start a document: the ones lm-eval prefixes (its prefix token is the BOS)."""
    return [r for r in rows if r[0] == tok.bos_token_id]


def test_rolling_windows_start_with_exactly_one_bos_for_a_bos_adding_tokenizer(monkeypatch):
    tok = family_tokenizer("<bos>", "<eos>", True)  # Gemma's: the default encoding starts with <bos>
    bos = tok.bos_token_id
    rows = _seen(tok, ROLLING, monkeypatch)
    firsts = _first_windows(tok, rows)
    assert len(firsts) == LIMIT  # one per document (each takes several 128-token windows)
    for doc in _docs(ROLLING):
        text = tok(doc["text"], add_special_tokens=False)["input_ids"]
        want = [bos, *text][: min(128, len(text))]  # the prefix BOS, then the document's own tokens
        assert any(r[: len(want)] == want for r in firsts), doc["text"][:60]
    assert all(r[1] != bos for r in firsts)
    # every window, not only the first: exactly what lm-eval's own HFLM builds for the same tokenizer without its
    # BOS post-processor (same ids; lm-eval's prefix is the BOS either way)
    with monkeypatch.context() as m:
        assert _seen(family_tokenizer("<bos>", "<eos>", False), ROLLING, m, plain_hflm=True) == rows


def test_the_double_bos_this_fixes_is_what_lm_eval_sends_on_its_own(monkeypatch):
    """The check above fails without the subclass: lm-eval's HFLM sends [<bos>, <bos>, text...]."""
    tok = family_tokenizer("<bos>", "<eos>", True)
    firsts = _first_windows(tok, _seen(tok, ROLLING, monkeypatch, plain_hflm=True))
    assert firsts and all(r[:2] == [tok.bos_token_id] * 2 for r in firsts)


def test_multiple_choice_contexts_keep_their_one_bos(monkeypatch):
    tok = family_tokenizer("<bos>", "<eos>", True)
    rows = _seen(tok, CHOICE, monkeypatch)
    assert rows and all(r[0] == tok.bos_token_id and r[1] != tok.bos_token_id for r in rows)
    with monkeypatch.context() as m:  # the same sequences as lm-eval's own HFLM sends: untouched
        assert _seen(tok, CHOICE, m, plain_hflm=True) == rows


@pytest.mark.parametrize("task", [ROLLING, CHOICE])
def test_a_gpt2_style_tokenizer_gets_exactly_what_lm_eval_sent_before(monkeypatch, task):
    tok = family_tokenizer("<|endoftext|>", "<|endoftext|>", False)  # adds no BOS: lm-eval's EOT prefix stays
    rows = _seen(tok, task, monkeypatch)
    with monkeypatch.context() as m:
        assert _seen(tok, task, m, plain_hflm=True) == rows
    if task == ROLLING:
        firsts = _first_windows(tok, rows)
        assert len(firsts) == LIMIT and all(r[1] != tok.bos_token_id for r in firsts)
