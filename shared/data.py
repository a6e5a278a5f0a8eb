"""The data owner's training / evaluation files: reading, validation, packing and loss masking.

Accepted files:
- ``.txt``: the whole file is one text (kind ``text``).
- ``.jsonl`` / ``.json``: one JSON object per line (a ``.json`` file holding a single JSON array of
  objects is accepted too). The first record fixes the kind for the whole file:
  ``{"text": ...}`` -> ``text``; ``{"prompt": ..., "completion": ...}`` -> ``prompt_completion``;
  ``{"question": ..., "choices": [...], "answer": <index or exact choice>}`` -> ``multiple_choice``;
  ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`` -> ``chat``.
  Extra keys are ignored.

Chat records are rendered with the tokenizer's own chat template (the one the model was trained with) and
carry the loss on the assistant turns only, end-of-turn tokens included (TRL's ``assistant_only_loss``).

Every problem raises :class:`DataError` naming the file, the 1-based line and what to fix, because
the data owner runs this on their own machine and must be able to repair the file alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .tokens import sequence_start

IGNORE_INDEX = -100  # label value ignored by the loss (torch / HF convention)

Kind = Literal["text", "prompt_completion", "multiple_choice", "chat"]

_EXPECTED = (
    'expected a JSON object with "text", or "prompt"+"completion", or "question"+"choices"+"answer", or "messages"'
)
_KIND_KEYS: dict[str, str] = {
    "text": '"text"',
    "prompt_completion": '"prompt"+"completion"',
    "multiple_choice": '"question"+"choices"+"answer"',
    "chat": '"messages"',
}
CHAT_ROLES = ("system", "user", "assistant")
NO_CHAT_TEMPLATE = (
    "this model's tokenizer has no chat template: use prompt/completion records, or a model with a chat template"
)


class DataError(ValueError):
    """A data file the user must fix. ``str(err)`` is the full message (file, line, what to do)."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else Path(path)
        self.line = line
        where = "" if path is None else (f"{path} line {line}: " if line is not None else f"{path}: ")
        super().__init__(where + message)


@dataclass
class MultipleChoice:
    question: str
    choices: list[str]
    answer: int  # index into choices


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # validated {"role", "content"} pairs, at least one assistant turn
    line: int  # 1-based line of the record (record number in a JSON array): rendering errors name it


@dataclass
class Dataset:
    path: Path
    kind: Kind
    records: list  # str | tuple[str, str] | MultipleChoice | Conversation, by kind

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class Example:
    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, IGNORE_INDEX where no loss


# ---------------------------------------------------------------- reading


def load_dataset(path: str | Path) -> Dataset:
    """Read and validate a ``.txt`` / ``.jsonl`` / ``.json`` file; raise DataError on any problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise DataError(
            f"unsupported file type {path.suffix!r}; use .txt (plain text) or .jsonl (one JSON object per line)", path
        )
    text = _read_utf8(path)
    if suffix == ".txt":
        if not text.strip():
            raise DataError("the file is empty; put the training text in it", path)
        return Dataset(path, "text", [text])

    items = _json_items(path, text)
    if not items:
        raise DataError("the file has no records; write one JSON object per line", path)
    kind: Kind | None = None
    records: list = []
    for line, obj in items:
        if not isinstance(obj, dict):
            raise DataError(f"{_EXPECTED}; got {type(obj).__name__} {_short(obj)}", path, line)
        k = _detect_kind(obj)
        if k is None:
            raise DataError(f"{_EXPECTED}; got keys {sorted(obj)}", path, line)
        if kind is None:
            kind = k
        elif k != kind:
            raise DataError(
                f"every record must have the same form as the first ({_KIND_KEYS[kind]}); "
                f"this one has {_KIND_KEYS[k]} (keys {sorted(obj)})",
                path,
                line,
            )
        records.append(_parse_record(kind, obj, path, line))
    assert kind is not None
    return Dataset(path, kind, records)


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found; check the path", path) from None
    except IsADirectoryError:
        raise DataError("is a directory; give the path of a .txt or .jsonl file", path) from None
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror})", path) from None
    try:
        return raw.decode("utf-8-sig")  # tolerate a BOM written by some Windows editors
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {raw[e.start]:#04x}); save the file as UTF-8", path, line) from None


def _json_items(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line. Split on '\\n' only: JSON strings may hold U+2028."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON ({e.msg}); fix the syntax or write one JSON object per line", path, e.lineno
            ) from None
        # A JSON array has no per-record lines; report the record number instead (1-based).
        return list(enumerate(arr, start=1))
    items = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON ({e.msg} at column {e.colno}); each line must be one complete JSON object", path, n
            ) from None
    return items


def _detect_kind(obj: dict) -> Kind | None:
    if "messages" in obj:
        return "chat"
    if {"question", "choices", "answer"} <= obj.keys():
        return "multiple_choice"
    if {"prompt", "completion"} <= obj.keys():
        return "prompt_completion"
    if "text" in obj:
        return "text"
    return None


def _parse_record(
    kind: Kind, obj: dict, path: Path, line: int
) -> str | tuple[str, str] | MultipleChoice | Conversation:
    def string(key: str) -> str:
        v = obj[key]
        if not isinstance(v, str):
            raise DataError(f'"{key}" must be a string; got {type(v).__name__} {_short(v)}', path, line)
        if not v.strip():
            raise DataError(f'"{key}" is empty; give it some text or remove the line', path, line)
        return v

    if kind == "text":
        return string("text")
    if kind == "prompt_completion":
        return (string("prompt"), string("completion"))
    if kind == "chat":
        return _parse_conversation(obj["messages"], path, line)

    question, choices, answer = string("question"), obj["choices"], obj["answer"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f'"choices" must be a list of strings; got {_short(choices)}', path, line)
    if len(choices) < 2:
        raise DataError(f'"choices" needs at least 2 options; got {len(choices)}', path, line)
    if any(not c.strip() for c in choices):
        raise DataError('"choices" contains an empty string; every option needs text', path, line)
    if len(set(choices)) != len(choices):
        raise DataError(f'"choices" has duplicates {_short(choices)}; options must be distinct', path, line)
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise DataError(
            f'"answer" must be a choice index (0-based int) or the exact text of a choice; '
            f"got {type(answer).__name__} {_short(answer)}",
            path,
            line,
        )
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise DataError(
                f'"answer" index {answer} is out of range; use 0..{len(choices) - 1} '
                f"(0-based) for {len(choices)} choices",
                path,
                line,
            )
        idx = answer
    else:
        if answer not in choices:
            raise DataError(
                f'"answer" {answer!r} is not one of the choices {choices}; it must match a '
                "choice exactly or be its 0-based index",
                path,
                line,
            )
        idx = choices.index(answer)
    return MultipleChoice(question, list(choices), idx)


def _parse_conversation(messages: Any, path: Path, line: int) -> Conversation:
    shape = '{"role": "system" | "user" | "assistant", "content": "..."}'
    if not isinstance(messages, list) or not messages:
        raise DataError(f'"messages" must be a non-empty list of {shape} objects; got {_short(messages)}', path, line)
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict):
            raise DataError(f"message {i} must be an object {shape}; got {_short(m)}", path, line)
        if "role" not in m:
            raise DataError(f'message {i} has no "role"; add "role": "system", "user" or "assistant"', path, line)
        role = m["role"]
        if role not in CHAT_ROLES:
            raise DataError(
                f'message {i} has role {_short(role)}; use "system", "user" or "assistant" '
                "(tool and function turns are not supported)",
                path,
                line,
            )
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(
                f'message {i} ({role}) needs "content" as a string; got {_short(content)} '
                "(multi-part content is not supported: join the text parts)",
                path,
                line,
            )
        if role == "assistant" and not content.strip():
            raise DataError(
                f"message {i} is an empty assistant turn; give it the reply's text or remove the message", path, line
            )
        out.append({"role": role, "content": content})
    if out[0]["role"] == "assistant":
        raise DataError(
            "message 1 is an assistant turn; a conversation starts with a system or user message (the reply "
            "answers something): add the user turn before it or remove the message",
            path,
            line,
        )
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            "the conversation has no assistant turn, so there is nothing to train or score; add the reply as "
            '{"role": "assistant", "content": "..."} or remove the line',
            path,
            line,
        )
    return Conversation(out, line)


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------- formatting


def format_mc_prompt(q: MultipleChoice) -> str:
    """The context a multiple-choice question is scored / trained on (lm-evaluation-harness style)."""
    return f"Question: {q.question}\nAnswer:"


def format_mc_choice(choice: str) -> str:
    """A choice as the continuation of :func:`format_mc_prompt` (leading space, as lm-eval does)."""
    return " " + choice


# ---------------------------------------------------------------- tokenising


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: we cut blocks ourselves, so the "longer than the model max length" warning is noise.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; it is needed to separate texts and end completions")
    return int(eos)


def pack_text_blocks(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Tokenise texts, join them with EOS, cut into full ``seq_len`` blocks, each starting as the model expects.

    Where the tokenizer expects a BOS (:func:`shared.tokens.expects_bos`: Gemma, Llama, OPT, ...) every block
    is ``[BOS] + (seq_len - 1)`` text tokens, so every text token is predicted once; otherwise (GPT-2, SmolLM2)
    a block is ``seq_len`` text tokens and no special token is added. The tail remainder is dropped; if there
    is less than one block, the one shorter block is returned so small data still trains. Returns LongTensor
    [n_blocks, seq_len] (or [1, n] when short).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a next-token loss needs two tokens); got {seq_len}")
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    for i, t in enumerate(texts):
        if i:
            ids.append(eos)
        ids.extend(_encode(tokenizer, t))
    if not any(x != eos for x in ids):
        raise DataError("the text has no tokens; give it some text")
    start = sequence_start(tokenizer)
    body = seq_len - len(start)  # text tokens per block
    n = len(ids) // body
    if n == 0:
        return torch.tensor([start + ids], dtype=torch.long)
    blocks = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if start:
        blocks = torch.cat([torch.tensor(start, dtype=torch.long).expand(n, len(start)), blocks], dim=1)
    return blocks


def encode_pair(tokenizer, prompt: str, completion: str, seq_len: int, add_eos: bool = True) -> Example:
    """[BOS] + prompt + completion (+EOS) with labels only on the completion; fits ``seq_len``.

    The BOS is there only where the tokenizer expects one (:func:`shared.tokens.sequence_start`). Prompt and
    completion are tokenised separately so the prompt/completion boundary is exact (and identical in training
    and scoring). Too long: the prompt is cut from the left; if the completion alone does not fit, it is cut
    on the right, keeping one prompt token (where there is room besides the BOS) so its first token is scored
    in context.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2; got {seq_len}")
    start = sequence_start(tokenizer)
    room = seq_len - len(start)  # for prompt + completion
    p = _encode(tokenizer, prompt)
    c = _encode(tokenizer, completion) + ([_eos_id(tokenizer)] if add_eos else [])
    if len(p) + len(c) > room:
        # Without a BOS the completion's first token needs one prompt token before it to be predicted at all;
        # with one, the BOS is enough when nothing else fits (seq_len 2).
        keep_c = min(len(c), max(room - 1, 1 if start else 0) if p else room)
        c = c[:keep_c]
        p = p[len(p) - (room - keep_c) :] if room > keep_c else []
    ids = torch.tensor(start + p + c, dtype=torch.long)
    labels = ids.clone()
    labels[: len(start) + len(p)] = IGNORE_INDEX
    return Example(ids, labels)


def chat_segments(tokenizer, conv: Conversation, path: str | Path | None = None) -> list[tuple[str, bool]]:
    """The conversation rendered by the tokenizer's chat template, as (text, is_assistant) pieces in order.

    Each assistant turn is located by rendering incrementally: the conversation before it with the
    generation prompt (``<|im_start|>assistant\n`` for ChatML), then through it; the difference is the
    turn's text including its end-of-turn marker, which is what the model must learn to produce. The
    template renders its own special tokens (a BOS included, where it has one), so nothing is added.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(NO_CHAT_TEMPLATE, path)

    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja's TemplateError / raise_exception: e.g. "roles must alternate"
            raise DataError(
                f"this model's chat template refuses the conversation ({e}); reorder its turns as the template "
                "asks (usually: an optional system message, then user and assistant alternating)",
                path,
                conv.line,
            ) from None
        return str(text)

    pieces: list[tuple[str, bool]] = []
    done = ""  # the rendered conversation through the previous assistant turn
    for i, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        before = render(conv.messages[:i], True)
        through = render(conv.messages[: i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise DataError(
                f"cannot locate the tokens of assistant message {i + 1}: this model's chat template renders the "
                "turns before it differently once it is added, so its reply cannot be told apart; use "
                "prompt/completion records for this model",
                path,
                conv.line,
            )
        pieces += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    whole = render(conv.messages, False)
    if not whole.startswith(done):
        raise DataError(
            "this model's chat template renders the conversation's assistant turns differently once later turns "
            "are added; end the conversation with its last assistant reply",
            path,
            conv.line,
        )
    pieces.append((whole[len(done) :], False))  # turns after the last reply: context only
    return [(text, trained) for text, trained in pieces if text]


def encode_chat(tokenizer, conv: Conversation, seq_len: int, path: str | Path | None = None) -> Example | None:
    """A conversation as one example with labels on the assistant turns only; None when, cut to ``seq_len``,
    it has no assistant token left to predict.

    Pieces are tokenised separately (as :func:`encode_pair` does) so the assistant boundary is exact and
    identical in training and scoring. Too long: the conversation is cut on the right, keeping its first
    ``seq_len`` tokens (system prompt and early turns), as TRL's SFTTrainer truncates.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2; got {seq_len}")
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in chat_segments(tokenizer, conv, path):
        toks = _encode(tokenizer, text)
        ids += toks
        labels += toks if trained else [IGNORE_INDEX] * len(toks)
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(x == IGNORE_INDEX for x in labels[1:]):  # position 0 is never predicted
        return None
    return Example(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def chat_examples(dataset: Dataset, tokenizer, seq_len: int) -> tuple[list[Example], int]:
    """Every conversation of a chat dataset as an example, and how many were skipped because their
    assistant turns start beyond ``seq_len`` tokens. Raises DataError if that leaves none."""
    examples: list[Example] = []
    for conv in dataset.records:
        ex = encode_chat(tokenizer, conv, seq_len, dataset.path)
        if ex is not None:
            examples.append(ex)
    if dataset.records and not examples:
        raise DataError(
            f"no conversation has an assistant token within its first {seq_len} tokens, so there is nothing to "
            "train or score; raise --seq-len or shorten the system and user turns",
            dataset.path,
        )
    return examples, len(dataset.records) - len(examples)


def training_examples(
    dataset: Dataset, tokenizer, seq_len: int, log: Callable[[str], None] | None = None
) -> list[Example]:
    """Turn a dataset into fixed-length (text) or per-record (prompt/completion, MC, chat) examples.

    ``log`` is told how many conversations were skipped (see :func:`chat_examples`), so no skip is silent.
    """
    if dataset.kind == "chat":
        examples, skipped = chat_examples(dataset, tokenizer, seq_len)
        if skipped and log is not None:
            log(
                f"{dataset.path}: {skipped} of {len(dataset.records)} conversations skipped: no assistant token "
                f"within their first {seq_len} tokens (raise --seq-len to keep them)"
            )
        return examples
    if dataset.kind == "text":
        blocks = pack_text_blocks(tokenizer, dataset.records, seq_len)
        return [Example(b.clone(), b.clone()) for b in blocks]
    if dataset.kind == "prompt_completion":
        return [encode_pair(tokenizer, p, c, seq_len) for p, c in dataset.records]
    if dataset.kind == "multiple_choice":
        return [
            encode_pair(tokenizer, format_mc_prompt(q), format_mc_choice(q.choices[q.answer]), seq_len)
            for q in dataset.records
        ]
    raise ValueError(f"unknown dataset kind {dataset.kind!r}")


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are IGNORE_INDEX on padding."""
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = e.input_ids
        attention_mask[i, :n] = 1
        labels[i, :n] = e.labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_id_for(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS (padding is masked anyway)."""
    pid = tokenizer.pad_token_id
    return int(pid) if pid is not None else _eos_id(tokenizer)
