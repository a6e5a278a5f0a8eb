#!/usr/bin/env python
"""Serving benchmark: the OpenAI-compatible API against in-process generation on the same plugged-in model.

One process: the server app (create_app, jobs inline) behind uvicorn on 127.0.0.1, SmolLM2-135M-Instruct
registered, a short stage 1, an emulator, and an adapter upload of the emulator's adapter layers taken from
the full model (so M' = M: this measures serving, not tuning). Then, rounds interleaved, greedy, same prompt:

  in-process generate   `plugged.generate(...)` (Hugging Face, greedy, min_new_tokens = max_tokens) on the very
                        object the server's plugged-model cache holds                       -> the baseline
  in-process engine     the server's own token loop (serving.Generation), no HTTP           -> loop overhead
  API completion        `openai` client, POST /openai/v1/completions, non-streaming  -> tokens/s, target >= 0.9x
  API stream            the same with stream=true: time to first streamed token, tokens/s
  API chat stream       POST /openai/v1/chat/completions, stream=true (chat template): time to first token

tokens/s = completion tokens / wall time of the call (the API's count is `usage.completion_tokens`).

Usage:
  .venv/bin/python benchmarks/serving.py           # SmolLM2: benchmarks/results/serving.json + serving.md
  .venv/bin/python benchmarks/serving.py --tiny    # tiny random LLaMA, seconds (the smoke test)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one intra-op thread: less noise from neighbours; same for all paths
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import io
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from benchmarks.harness import REPO, log
from benchmarks.measure import cpu_name
from benchmarks.results import markdown_table, publish
from tooling.procs import uvicorn_in_thread

MESSAGES = [
    {
        "role": "user",
        "content": "Write a short story about a lighthouse keeper who finds a message in a "
        "bottle. Describe the sea, the weather and the keeper's thoughts.",
    }
]
TARGET = 0.9  # API tokens/s over in-process generate tokens/s
CORPUS = (
    "the quick brown fox jumps over a lazy dog while seven merry kings sing of ancient ships and silver "
    "rivers under the pale moon. "
) * 200


def summary(xs: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "min": min(xs),
        "max": max(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
    }


# ---------------------------------------------------------------- the served world


def model_folder(tiny: bool, work: Path) -> tuple[Path, str]:
    if tiny:
        from scaleot_samples.tiny import byte_tokenizer, save_tiny_model_dir

        path = save_tiny_model_dir(work / "tiny-llama", "llama", n_layers=4, hidden=32)
        tok = byte_tokenizer()
        tok.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"  # the tiny tokenizer has none
        tok.save_pretrained(path)
        return path, "tiny-llama (random init)"
    from model_owner_server.scaleot.model_io import prepare_smollm2

    return prepare_smollm2(REPO / ".cache" / "benchmarks" / "smollm2"), "SmolLM2-135M-Instruct"


@contextmanager
def served_world(model_dir: Path, root: Path) -> Iterator[dict[str, Any]]:
    """The app on loopback with an evaluated adapter; yields base_url, key, adapter id, app."""
    from fastapi.testclient import TestClient

    from model_owner_server import crud
    from model_owner_server.core.config import Settings
    from model_owner_server.main import create_app
    from model_owner_server.models import RegisteredModel
    from model_owner_server.scaleot.model_io import load_causal_lm
    from shared.adapter import extract_adapter

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(CORPUS)
    settings = Settings(
        _env_file=None,
        data_dir=root / "data",
        queue_url="immediate",
        embedded_worker=False,
        device="cpu",
        importance_seq_len=32,
        importance_batch_size=2,
        importance_max_blocks=32,
        emulator_calibration_steps=0,
        emulator_fidelity_blocks=0,
        eval_seq_len=32,
        eval_batch_size=2,
        eval_max_examples=2,
        default_eval=root / "corpus.txt",
        max_new_tokens=512,
    )
    app = create_app(settings)
    with TestClient(app) as c:
        with app.state.sessions() as s:
            _, admin = crud.create_org(s, "model-owner", "admin")
            _, owner = crud.create_org(s, "acme", "data-owner")
            s.commit()
        a, o = {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {owner}"}
        model_id = _ok(c.post("/v1/models", headers=a, json={"name": "served", "path": str(model_dir)}))["id"]
        _ok(c.post(f"/v1/models/{model_id}/grants", headers=a, json={"org": "acme"}))
        _ok(
            c.post(
                f"/v1/models/{model_id}/importance",
                headers=a,
                json={"steps": 2, "corpus": str(root / "corpus.txt"), "rl_interval": 2},
            )
        )
        emu = _ok(
            c.post("/v1/emulators", headers=o, json={"model_id": model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.0})
        )["emulator"]
        from safetensors.torch import save

        full, _ = load_causal_lm(model_dir)
        tensors = extract_adapter(full, emu["adapter_layers"])
        del full
        files = {"adapter": ("adapter.safetensors", io.BytesIO(save(tensors)))}
        adapter = _ok(c.post(f"/v1/emulators/{emu['id']}/adapters", headers=o, files=files))["adapter"]
        with uvicorn_in_thread(app) as port:
            with app.state.sessions() as s:  # the path as registered: the key of the server's model cache
                model_path = s.get(RegisteredModel, model_id).path
            yield {
                "base_url": f"http://127.0.0.1:{port}/openai/v1",
                "key": owner,
                "adapter": adapter["id"],
                "settings": settings,
                "model_path": model_path,
            }


def _ok(r: Any) -> dict[str, Any]:
    if r.status_code >= 400:
        raise SystemExit(f"setup failed: {r.request.method} {r.request.url.path} -> {r.status_code} {r.text[:500]}")
    return r.json()


# ---------------------------------------------------------------- the measured calls


def paths(world: dict[str, Any], max_tokens: int) -> dict[str, Callable[[], dict[str, float]]]:
    """name -> one measured call returning {tokens, seconds[, ttft]}."""
    import openai
    import torch

    from model_owner_server.model_cache import load_full_model, plugged_pool
    from model_owner_server.serving import Generation, Sampling

    client = openai.OpenAI(base_url=world["base_url"], api_key=world["key"], max_retries=0, timeout=600)
    adapter = world["adapter"]
    client.completions.create(model=adapter, prompt="warm up", max_tokens=2)  # loads and plugs M'
    settings = world["settings"]
    _, tok = load_full_model(world["model_path"], settings.resolved_device(), settings.model_cache_size)
    plugged = plugged_pool().resident(adapter) or _not_cached()  # the object the server generates with
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids

    def hf_generate() -> dict[str, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = plugged.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
        return {"tokens": out.shape[1] - ids.shape[1], "seconds": time.perf_counter() - t0}

    def engine_loop() -> dict[str, float]:
        g = Generation(plugged, tok, ids[0].tolist(), Sampling(max_tokens=max_tokens, temperature=0))
        t0 = time.perf_counter()
        "".join(g.deltas())
        return {"tokens": g.completion_tokens, "seconds": time.perf_counter() - t0}

    def api() -> dict[str, float]:
        t0 = time.perf_counter()
        r = client.completions.create(model=adapter, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return {"tokens": r.usage.completion_tokens, "seconds": time.perf_counter() - t0}

    def streamed(chat: bool) -> dict[str, float]:
        t0, first, usage = time.perf_counter(), None, None
        kw = {
            "model": adapter,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        chunks = (
            client.chat.completions.create(messages=MESSAGES, **kw)
            if chat
            else client.completions.create(prompt=prompt, **kw)
        )
        for ch in chunks:
            text = (ch.choices[0].delta.content if chat else ch.choices[0].text) if ch.choices else None
            if first is None and text:
                first = time.perf_counter() - t0
            usage = ch.usage or usage
        return {"tokens": usage.completion_tokens, "seconds": time.perf_counter() - t0, "ttft": first}

    return {
        "in-process generate": hf_generate,
        "in-process engine": engine_loop,
        "API completion": api,
        "API stream": lambda: streamed(False),
        "API chat stream": lambda: streamed(True),
    }


def _not_cached() -> Any:
    raise RuntimeError("the plugged-in model is not in the server's cache after the warm-up call")


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": cpu_name(platform.machine()),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


def run(world: dict[str, Any], max_tokens: int, repeats: int) -> dict[str, dict[str, Any]]:
    calls = paths(world, max_tokens)
    for call in calls.values():  # warm-up round, not recorded
        call()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
    for i in range(repeats):  # interleaved: slow phases of a shared machine hit every path alike
        order = list(calls)[i % len(calls) :] + list(calls)[: i % len(calls)]  # each path in each position
        for name in order:
            samples[name].append(calls[name]())
        log(
            f"round {i + 1}/{repeats}: "
            + ", ".join(f"{n} {s[-1]['tokens'] / s[-1]['seconds']:.1f} tok/s" for n, s in samples.items())
        )
    out = {}
    for name, rows in samples.items():
        out[name] = {
            "tokens_per_s": summary([r["tokens"] / r["seconds"] for r in rows]),
            "tokens": [r["tokens"] for r in rows],
            "seconds": [round(r["seconds"], 4) for r in rows],
        }
        if rows[0].get("ttft") is not None:
            out[name]["ttft_s"] = summary([r["ttft"] for r in rows])
    return out


# ---------------------------------------------------------------- report


def table(doc: dict[str, Any]) -> list[str]:
    base = doc["paths"]["in-process generate"]["tokens_per_s"]["median"]
    rows = []
    for name, p in doc["paths"].items():
        t, ttft = p["tokens_per_s"], p.get("ttft_s")
        rows.append(
            [
                name,
                f"{t['median']:.1f} ({t['min']:.1f}–{t['max']:.1f}, sd {t['stdev']:.1f})",
                f"{t['median'] / base:.2f}×",
                f"{ttft['median'] * 1000:.0f} ms ({ttft['min'] * 1000:.0f}–{ttft['max'] * 1000:.0f})" if ttft else "–",
            ]
        )
    return markdown_table(
        ["path", "tokens/s median (min–max, sd)", "vs in-process generate", "time to first token median (min–max)"],
        rows,
    )


def markdown(doc: dict[str, Any]) -> str:
    """The results file, and the same block in docs/benchmarks.md."""
    m, s = doc["machine"], doc["setup"]
    verdict = "met" if doc["met"] else "missed"
    return (
        "\n".join(
            [
                f"## Serving: the OpenAI-compatible API against in-process generation ({doc['model']})",
                "",
                (
                    "`benchmarks/serving.py`: the `openai` client against `/openai/v1` on loopback (uvicorn, one process) vs "
                    "Hugging Face `generate` called directly on the same plugged-in model object the server caches; greedy, "
                    f"{s['max_tokens']} new tokens, a {s['prompt_tokens']}-token prompt (the chat template applied to one user "
                    f"message), {s['repeats']} measured rounds after a warm-up round, the paths interleaved with the order "
                    f"rotated each round; tokens/s = completion tokens / wall time of the call."
                ),
                "",
                *table(doc),
                "",
                (
                    f"API completion / in-process generate: **{doc['ratio']:.2f}×** (target ≥ {TARGET}: {verdict}). "
                    f"Machine: {m['cpu']}, {m['cores']} logical cores shared with other work (load average "
                    f"{m['load_avg_start']} at the start: the spread is mostly the neighbours), torch {m['torch']} with "
                    f"{m['torch_threads']} thread(s); {doc['date']}, {doc['seconds']:.0f} s in all. "
                    f"Reproduce: `{doc['command']}`."
                ),
            ]
        )
        + "\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random LLaMA (smoke test)")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per call (default 32; tiny: 16)")
    p.add_argument("--repeats", type=int, default=None, help="measured rounds (default 10; tiny: 2)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--no-docs", action="store_true", help="do not update the serving block of docs/benchmarks.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    max_tokens = args.max_tokens or (16 if args.tiny else 32)
    repeats = args.repeats or (2 if args.tiny else 10)
    torch.manual_seed(0)
    t0, info = time.perf_counter(), machine()
    with tempfile.TemporaryDirectory(prefix="scaleot-serving-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, model_name = model_folder(args.tiny, work)
        log(f"model {model_name}; setting up the served world")
        with served_world(model_dir, work / "world") as world:
            log(f"adapter {world['adapter']} at {world['base_url']}; measuring")
            measured = run(world, max_tokens, repeats)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
            prompt_tokens = len(
                tok(
                    tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False,
                ).input_ids
            )
    ratio = (
        measured["API completion"]["tokens_per_s"]["median"] / measured["in-process generate"]["tokens_per_s"]["median"]
    )
    doc = {
        "benchmark": "serving",
        "model": model_name,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": ".venv/bin/python benchmarks/serving.py" + (" --tiny" if args.tiny else ""),
        "setup": {
            "max_tokens": max_tokens,
            "repeats": repeats,
            "prompt_tokens": prompt_tokens,
            "sampling": "greedy (temperature 0)",
            "torch_seed": 0,
            "device": "cpu",
            "generation_concurrency": world["settings"].generation_concurrency,
        },
        "machine": info,
        "paths": measured,
        "ratio": ratio,
        "target": TARGET,
        "met": ratio >= TARGET,
        "seconds": time.perf_counter() - t0,
    }
    publish(
        Path(args.results_dir),
        "serving",
        "tiny" if args.tiny else "full",
        doc,
        markdown(doc),
        None if args.tiny or args.no_docs else "serving",
    )
    print("\n".join(table(doc)))
    print(f"\nAPI / in-process: {ratio:.2f}x (target >= {TARGET})")
    return doc


if __name__ == "__main__":
    main()
