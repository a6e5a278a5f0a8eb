"""The one scoring code for both parties.

The client scores the emulator and the server scores the zero-shot model and the plug-in M' with
these functions, so the numbers are comparable. Definitions:

- text: token-weighted mean next-token NLL over packed ``seq_len`` blocks; ``perplexity = exp(loss)``.
  Position 0 of a block is never predicted, so ``tokens`` is ``seq_len - 1`` per full block either way.
  Where the tokenizer expects a BOS (:mod:`shared.tokens`: Gemma, Llama, OPT) position 0 is that BOS and
  every text token is predicted; otherwise (GPT-2, SmolLM2) it is the block's first text token.
- prompt_completion: the same over completion tokens only (including the closing EOS, which is
  also the training target), after the BOS where the tokenizer expects one.
- chat: the same over the assistant turns' tokens only (their end-of-turn tokens included), the conversation
  rendered with the tokenizer's chat template (``assistant_loss``); conversations whose assistant turns
  start beyond ``seq_len`` are skipped and counted (``skipped``, present when not zero).
- multiple_choice: lm-evaluation-harness ``acc`` (argmax over choices of the summed log-prob of the
  continuation " choice" given the prompt, itself after the BOS where the tokenizer expects one) and ``acc_norm`` (that sum divided by the continuation's
  length in characters). Ties go to the first choice.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import (
    IGNORE_INDEX,
    Dataset,
    Example,
    chat_examples,
    collate,
    encode_pair,
    format_mc_choice,
    format_mc_prompt,
    pack_text_blocks,
    pad_id_for,
    training_examples,
)

Progress = Callable[[int, int], None]


def _accepts_use_cache(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # use_cache=False: no KV cache is needed for scoring/training and it only costs memory. Plain
    # modules without that argument are supported too.
    kwargs = {"use_cache": False} if _accepts_use_cache(model) else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def _token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of the shifted labels, [B, T-1] (0 where ignored), and the matching bool mask."""
    logits = _logits(model, batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    # float32 for the softmax: bf16/fp16 logits lose too much precision in log-probs.
    logits = logits[:, :-1].float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    return nll, labels != IGNORE_INDEX


def _to(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return None if p is None else p.device


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean causal-LM loss over label tokens (labels shifted by one, IGNORE_INDEX skipped).

    ``batch`` is :func:`shared.data.collate` output; it is moved to the model's device. With no
    label tokens the result is a zero that still backpropagates (so a training step never crashes).
    """
    dev = _model_device(model)
    if dev is not None:
        batch = _to(batch, dev)
    nll, mask = _token_nll(model, batch)
    return nll.sum() / mask.sum().clamp(min=1)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")  # exp overflows a float beyond ~709


def _nll_over(
    model: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int,
    device: torch.device | str,
    progress: Progress | None,
) -> tuple[float, int]:
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        nll, mask = _token_nll(model, _to(collate(chunk, pad_id), device))
        total += float(nll.sum(dtype=torch.float64))
        count += int(mask.sum())
        if progress:
            progress(start + len(chunk), len(examples))
    return total, count


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer,
    dataset: Dataset,
    *,
    seq_len: int = 256,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    max_examples: int | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Score ``model`` on ``dataset``; see the module docstring for the metrics.

    The model must already be on ``device`` (inputs are moved there). It is put in eval mode for the
    call and its previous train/eval mode is restored afterwards. ``max_examples`` caps blocks (text),
    records (prompt/completion), conversations (chat) or questions (MC). ``progress(done, total)`` counts
    sequences scored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        pad_id = pad_id_for(tokenizer)
        if dataset.kind == "text":
            blocks = pack_text_blocks(tokenizer, dataset.records, seq_len)[:max_examples]
            examples = [Example(b, b) for b in blocks]
            total, n = _nll_over(model, examples, pad_id, batch_size, device, progress)
            loss = total / max(n, 1)
            return {"loss": loss, "perplexity": _perplexity(loss), "tokens": n}
        if dataset.kind == "prompt_completion":
            records = Dataset(dataset.path, dataset.kind, dataset.records[:max_examples])
            examples = training_examples(records, tokenizer, seq_len)
            total, n = _nll_over(model, examples, pad_id, batch_size, device, progress)
            loss = total / max(n, 1)
            return {"completion_loss": loss, "perplexity": _perplexity(loss), "tokens": n}
        if dataset.kind == "chat":
            records = Dataset(dataset.path, dataset.kind, dataset.records[:max_examples])
            examples, skipped = chat_examples(records, tokenizer, seq_len)
            total, n = _nll_over(model, examples, pad_id, batch_size, device, progress)
            loss = total / max(n, 1)
            out = {"assistant_loss": loss, "perplexity": _perplexity(loss), "tokens": n}
            return {**out, "skipped": skipped} if skipped else out
        if dataset.kind == "multiple_choice":
            return _multiple_choice(
                model, tokenizer, dataset.records[:max_examples], seq_len, batch_size, device, pad_id, progress
            )
        raise ValueError(f"unknown dataset kind {dataset.kind!r}")
    finally:
        model.train(was_training)


def _multiple_choice(
    model, tokenizer, questions, seq_len, batch_size, device, pad_id, progress: Progress | None
) -> dict[str, float]:
    # One row per (question, choice); the label mask selects exactly the continuation's tokens.
    rows: list[Example] = []
    for q in questions:
        prompt = format_mc_prompt(q)
        for choice in q.choices:
            rows.append(encode_pair(tokenizer, prompt, format_mc_choice(choice), seq_len, add_eos=False))
    loglik = torch.empty(len(rows), dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        nll, _ = _token_nll(model, _to(collate(chunk, pad_id), device))
        loglik[start : start + len(chunk)] = -nll.sum(dim=1, dtype=torch.float64).cpu()
        if progress:
            progress(start + len(chunk), len(rows))

    correct = correct_norm = 0
    i = 0
    for q in questions:
        ll = loglik[i : i + len(q.choices)]
        chars = torch.tensor([len(format_mc_choice(c)) for c in q.choices], dtype=torch.float64)
        correct += int(_first_argmax(ll) == q.answer)
        correct_norm += int(_first_argmax(ll / chars) == q.answer)
        i += len(q.choices)
    n = len(questions)
    return {"accuracy": correct / max(n, 1), "accuracy_norm": correct_norm / max(n, 1), "n": n}


def _first_argmax(x: torch.Tensor) -> int:
    x = torch.nan_to_num(x, nan=-math.inf)  # a NaN score never wins
    return int((x == x.max()).nonzero()[0])
