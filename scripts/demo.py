"""Interim demo: the model owner's compression pipeline end to end on the real SmolLM2-135M.

(The two-party demo replaces this once the server and client land.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from model_owner_server.scaleot.emulator import make_emulator
from model_owner_server.scaleot.importance import ImportanceConfig, corpus_blocks, estimate_importance, save_importance
from model_owner_server.scaleot.model_io import load_causal_lm, prepare_smollm2
from shared.corpora import write_wiki_files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("demo-run"))
    ap.add_argument("--steps", type=int, default=10, help="stage-1 DL steps (more = better importance)")
    args = ap.parse_args()
    t0 = time.time()
    model_dir = prepare_smollm2(args.workdir / "models" / "smollm2-135m")
    corpus = write_wiki_files(args.workdir / "corpus")
    model, tok = load_causal_lm(model_dir)
    train, val = corpus_blocks(tok, corpus["wiki_train"], 256, val_corpus=corpus["wiki_val"])
    cfg = ImportanceConfig(steps=args.steps, rl_interval=5)
    result = estimate_importance(model, train, val, cfg,
                                 lambda p: print(f"  stage 1 {p.phase} step {p.step}/{p.total_steps} loss {p.loss:.3f}", flush=True))
    save_importance(result, args.workdir / "importance")
    print(f"importance ranking: {result.ranking()}")
    for n_a, alpha, beta in [(4, 0.5, 0.0), (4, 0.5, 0.5), (4, 0.75, 0.8)]:
        info = make_emulator(model, tok, result, n_a, alpha, beta, args.workdir / f"emulator_{n_a}_{alpha}_{beta}.safetensors")
        print(f"emulator N_a={n_a} alpha={alpha} beta={beta}: {info.plan.summary()}  "
              f"{info.n_params / 1e6:.1f}M params ({info.n_params / info.extra['full_model_params']:.0%}), "
              f"{info.size_bytes / 1e6:.0f} MB vs {info.extra['full_model_bytes'] / 1e6:.0f} MB")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
