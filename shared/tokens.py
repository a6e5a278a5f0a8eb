"""How every token sequence the project builds starts: with the tokenizer's BOS where the model expects one.

Families such as Gemma, Llama 2/3, Mistral and OPT are trained with a BOS token (``<bos>``,
``<s>``, ``<|begin_of_text|>``, OPT's ``</s>``) at position 0 of every sequence and behave badly without it
(Gemma-3-270M: perplexity in the thousands instead of tens). Others (GPT-2, SmolLM2, Qwen) never saw one.

The rule: a tokenizer *expects BOS* when its own default encoding (``add_special_tokens=True``) of a short
text starts with its ``bos_token_id``. That is the tokenizer's post-processor, the same thing that adds BOS
in ``tokenizer(prompt)`` at serving time and in every Hugging Face pipeline, so training, evaluation and
serving agree. The tokenizer's ``add_bos_token`` attribute is not used: a tokenizer converted from GGUF can
report ``False`` while its post-processor adds ``<bos>``. Tokenizers whose default encoding adds nothing
(GPT-2, SmolLM2) get no BOS, exactly the blocks they got before this rule existed.

lm-evaluation-harness prefixes rolling windows with BOS (or EOS) for every model; here the prefix follows the
tokenizer instead, so models that never saw a BOS are scored on the inputs they were trained on.
"""

from __future__ import annotations

_PROBE = "Hello world"  # any short plain text: only the first token of its default encoding matters


def expects_bos(tokenizer) -> bool:
    """True when the tokenizer's default encoding starts a text with its BOS token (see module docstring)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer(_PROBE, add_special_tokens=True, verbose=False)["input_ids"]
    return len(ids) > 0 and int(ids[0]) == int(bos)


def sequence_start(tokenizer) -> list[int]:
    """The token ids every packed block and prompt/completion example starts with: ``[bos]`` or ``[]``.

    Position 0 is never a prediction target, so a block of ``seq_len`` tokens always scores ``seq_len - 1``
    predictions; with a BOS all of them are text tokens."""
    return [int(tokenizer.bos_token_id)] if expects_bos(tokenizer) else []
