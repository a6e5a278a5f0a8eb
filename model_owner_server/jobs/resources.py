"""What a job needs from its machine: the dtype M is computed in, whether M fits the device, and how much memory
each stage of the job took.

Compute dtype. The model owner registers a model with a compute dtype (`float32`, `bfloat16`, `float16`) or
`auto`: the checkpoint's own (config.json `torch_dtype` / `dtype`, bf16 for most modern checkpoints) on a GPU,
float32 on CPU. On CPU, bf16 matmuls have no fast kernels without AVX512-BF16/AMX: SmolLM2-135M forward +
backward (batch 2 x 64 tokens) took 3.8x the CPU time of float32 (54-56 s vs 12-16 s a step; wall 4.6x) on the
2-core AMD EPYC (AVX2 only) development machine, steps interleaved. An explicit dtype is always honoured.

Memory. `MemoryMeter` records, per named stage of a job, the peak memory the job held and the stage's time:
on CUDA `torch.cuda.max_memory_allocated` (exact, per device); on CPU the resident set size (/proc/self/statm)
sampled by a thread every few milliseconds, which is process-wide (another job or the API in the same process
counts too; a dedicated worker process with one thread measures one job). `peak_bytes` is above what the
process held when the job started, plus M's bytes if M was already in the worker's model cache then, so it is
the job's own footprint with M included either way. On CPU a checkpoint loaded in its own dtype is memory-
mapped: its pages count from the stage whose first forward reads them, not from "load".

Models that do not fit one GPU: refused before loading, with the memory the stage needs (`check_fits`), not
spread over GPUs with device_map="auto": the emulator build copies M's modules (sharing M's tensors where the plan
keeps them) and stage 1 swaps decoder layers in place, neither of which has been made to work on a model split
across devices.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, get_args

import torch

from shared.schemas import ComputeDType

COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDType)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Peak memory of a job kind as a multiple of M's bytes in its compute dtype (GPU fit check). What each holds:
# importance: M + harmonizers (+ AdamW) + one batch's activations and the teacher's logits; emulator: M + what
# the emulator does not share with M (stand-ins, SRC factors, kept layers when calibration trains them) +
# calibration's stand-in gradients and activations; evaluation and serving:
# M + the adapter layers of one plugged copy; benchmark_eval: M + a standalone plugged copy; privacy_audit: M +
# the emulator + the attack's training. Upper estimates for short sequences (<= 512 tokens, batch <= 8), set
# above the peaks benchmarks/scaling.py measured (CPU resident memory / M's bytes, docs/benchmarks.md "Scaling"):
# stage 1 up to 2.43x (SmolLM2 bf16), emulator build with calibration up to 3.48x, evaluation 1.43x, serving 1.09x.
# Since the build shares M's tensors (a4a542f) its peak is lower (benchmarks/results/scaling_emulator_build.md:
# SmolLM2 fp32 1.93x, bf16 2.63x, Gemma-3-270M fp32 2.08x, bf16 2.81x: calibration's activations do not halve
# with M); the emulator factor is left at 3.5 (3.0 would still be above every measured peak).
STAGE_FACTORS: dict[str, float] = {
    "importance": 2.5,
    "emulator": 3.5,
    "evaluation": 1.5,
    "benchmark_eval": 2.2,
    "privacy_audit": 3.5,
    "serving": 1.3,
}


# Calibration's activations grow with a step's tokens, not with M's bytes (so the emulator factor above cannot
# cover them on a small model with a large vocabulary): per token, about k float32 values per (layer x hidden +
# vocabulary entry). k measured on SmolLM2 from batch 1 vs 4 x 128 tokens (benchmarks/results/
# scaling_calibration_gradterm_*.md): 19 (float32) / 15 (bfloat16) with the gradient term, whose double backward
# keeps the whole graph; about 6.5 without it (float32, 128 vs 1024 tokens). Set above both.
CALIBRATION_VALUES_PER_TOKEN: dict[bool, float] = {True: 24.0, False: 8.0}


def calibration_activation_bytes(config: Any, tokens: int, gradient_term: bool) -> int:
    """Upper estimate of one calibration step's activations for a model `config` (a transformers config)."""
    width = int(config.num_hidden_layers) * int(config.hidden_size) + int(config.vocab_size)
    return int(tokens * width * 4 * CALIBRATION_VALUES_PER_TOKEN[gradient_term])


class DoesNotFit(ValueError):
    """M would not fit the device for this stage; the message names the memory needed and what to do."""


class OneJobPerGPU(ValueError):
    """More than one job thread was asked for on a GPU; the message names the setting and what to do."""


def check_one_job_per_gpu(device: str | torch.device, threads: int, *, threads_setting: str, instead: str) -> None:
    """A GPU runs one job at a time (the `worker` command and `serve`'s embedded worker both ask here): every
    job holds M on the device, and `check_fits` admits a job against the GPU's free memory as if it ran alone,
    so `threads` > 1 job threads on one GPU could each pass the check and then run out of memory together.
    `threads_setting` is how the user set the thread count (`--threads 2`, `SCALEOT_WORKER_THREADS=2`), `instead`
    what to do instead. Raises OneJobPerGPU; CPU devices take any number of threads."""
    if torch.device(device).type == "cuda" and threads > 1:
        raise OneJobPerGPU(
            f"{threads_setting} would run {threads} jobs on one GPU ({device}) at once (each holds M); {instead}"
        )


def checkpoint_dtype(model_path: str | Path) -> str | None:
    """The dtype the checkpoint declares in its config.json (`torch_dtype`, or `dtype` since transformers 5)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def resolve_compute_dtype(requested: str | None, model_path: str | Path, device: str | torch.device) -> torch.dtype:
    """The torch dtype a job loads M in: the registered one, or for `auto` (and rows registered before the
    field existed) the checkpoint's own on a GPU and float32 on CPU (bf16 is slow there, see the module doc)."""
    name = (requested or "auto").strip().lower()
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"compute dtype {requested!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        return _DTYPES[name]
    if torch.device(device).type != "cuda":
        return torch.float32
    declared = _DTYPES.get(checkpoint_dtype(model_path) or "", torch.float32)
    if declared == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float32  # an older GPU: fp16 could overflow where a bf16-trained model does not
    return declared


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_bytes(n_params: int, dtype: torch.dtype) -> int:
    return int(n_params) * torch.empty((), dtype=dtype).element_size()


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def check_fits(
    n_params: int | None,
    dtype: torch.dtype,
    kind: str,
    device: str | torch.device,
    resident_bytes: int = 0,
    activation_bytes: int = 0,
) -> None:
    """On a GPU, refuse (DoesNotFit) before loading when M x the stage's factor (+ `activation_bytes` the job
    estimated for itself, e.g. calibration_activation_bytes) exceeds the device's free memory.
    `resident_bytes`: M's bytes already on the device (a cached copy the job reuses). CPU: no check."""
    dev = torch.device(device)
    if dev.type != "cuda" or not n_params:
        return
    need = int(model_bytes(n_params, dtype) * STAGE_FACTORS.get(kind, 2.5)) + activation_bytes - resident_bytes
    free, total = torch.cuda.mem_get_info(dev)
    if need > free:
        gib = 1024**3
        raise DoesNotFit(
            f"the {kind} job needs about {need / gib:.1f} GiB on {dev} ({n_params / 1e9:.2f}B parameters in "
            f"{dtype_name(dtype)} x {STAGE_FACTORS.get(kind, 2.5)}"
            + (f" + {activation_bytes / gib:.1f} GiB of activations" if activation_bytes else "")
            + f"), but only {free / gib:.1f} of "
            f"{total / gib:.1f} GiB are free. Run it on a GPU with more memory (SCALEOT_DEVICE=cuda:N), "
            "register the model in a smaller compute dtype (bfloat16), or free the GPU; models larger than "
            "one GPU are not split across GPUs"
        )


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS, so a stage's RSS growth is not hidden by memory a previous stage
    freed but the allocator kept (glibc only; a no-op elsewhere)."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryMeter:
    """Per-stage peak memory and time of one job (see the module doc for what is measured where)."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.interval = interval
        self.stages: dict[str, dict[str, Any]] = {}
        self.model_bytes: int | None = None
        self.compute_dtype: str | None = None
        self._resident = 0  # M's bytes already held when the job started (a cached M)
        _release_freed_memory()
        self._base = self._now() or 0

    def _now(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return _rss_bytes()

    @property
    def method(self) -> str:
        if self.cuda:
            return f"torch.cuda.max_memory_allocated on {self.device}"
        return "resident set size (/proc/self/statm) sampled every 2 ms; process-wide"

    def model_loaded(self, n_bytes: int, dtype: torch.dtype, was_cached: bool) -> None:
        """M (of `n_bytes` in `dtype`) is in memory; `was_cached`: it was there before the job started."""
        self.model_bytes, self.compute_dtype = n_bytes, dtype_name(dtype)
        if was_cached and not self._resident:
            self._resident = n_bytes
            for stage in self.stages.values():  # measured before we knew (the "load" that found M cached)
                stage["peak_bytes"] += n_bytes

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the block as stage `name` (a repeated name keeps the larger peak and adds the time)."""
        peak = [0]
        stop = threading.Event()
        sampler: threading.Thread | None = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_freed_memory()

            def sample() -> None:
                while True:
                    peak[0] = max(peak[0], _rss_bytes() or 0)
                    if stop.wait(self.interval):
                        return

            sampler = threading.Thread(target=sample, daemon=True, name=f"memory-{name}")
            sampler.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                top = int(torch.cuda.max_memory_allocated(self.device))
            else:
                stop.set()
                assert sampler is not None
                sampler.join()
                top = max(peak[0], _rss_bytes() or 0)
            held = max(0, top - self._base) + self._resident
            old = self.stages.get(name, {"peak_bytes": 0, "seconds": 0.0})
            self.stages[name] = {
                "peak_bytes": max(old["peak_bytes"], held),
                "seconds": round(old["seconds"] + time.perf_counter() - t0, 3),
            }

    def record(self) -> dict[str, Any]:
        """What the job stores (result["memory"]): per-stage peaks, the largest, and M's bytes for scale."""
        peak = max((s["peak_bytes"] for s in self.stages.values()), default=0)
        out: dict[str, Any] = {
            "device": str(self.device),
            "method": self.method,
            "compute_dtype": self.compute_dtype,
            "model_bytes": self.model_bytes,
            "peak_bytes": peak,
            "stages": {k: dict(v) for k, v in self.stages.items()},
        }
        if self.model_bytes:
            out["peak_over_model"] = round(peak / self.model_bytes, 2)
            for s in out["stages"].values():
                s["over_model"] = round(s["peak_bytes"] / self.model_bytes, 2)
        return out
