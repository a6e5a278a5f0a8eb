"""The server's one settings object (pydantic-settings, env prefix `SCALEOT_`).

Every knob lives here so `serve`, `worker`, the CLI commands and the tests configure the server the
same way: environment variables (`SCALEOT_DATA_DIR=...`), an optional `.env` file, or keyword
arguments (`Settings(data_dir=tmp)`) in tests.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.device import DEVICE_CHOICES, DEVICE_PATTERN
from shared.importance_config import CalibrationConfig, ImportanceConfig
from shared.schemas import EmulatorPolicy

# The environment variable of `device` (env prefix SCALEOT_): error messages name it.
DEVICE_SETTING = "SCALEOT_DEVICE"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SCALEOT_", env_file=".env", extra="ignore", protected_namespaces=(), env_nested_delimiter="__"
    )

    data_dir: Path = Field(default=Path("./data"), description="artifacts, default SQLite DB, queue, keys")
    database_url: str | None = Field(
        default=None,
        description="default: sqlite:///<data_dir>/scaleot.db; PostgreSQL: postgresql+psycopg://user@host/db",
    )
    signing_key: Path | None = Field(default=None, description="Ed25519 PEM; default <data_dir>/keys/signing_key.pem")
    queue_url: str | None = Field(
        default=None,
        description="redis://... for RedisHuey, 'immediate' to run jobs "
        "inline (tests), default: SqliteHuey file under the data dir",
    )
    queue_name: str = Field(default="scaleot", description="huey queue name (share it between serve and worker)")
    default_corpus: Path | None = Field(default=None, description="text file used by importance runs without corpus")
    default_eval: Path | None = Field(default=None, description=".txt/.jsonl used when an upload has no eval_data")
    max_eval_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="cap for an uploaded eval file")
    max_json_part_bytes: int = Field(default=256 * 1024, ge=1024, description="cap for metrics/adapter_config parts")
    # Bounds on client JSON the server stores (an upload's metrics/adapter_config; api/json_bounds.py). The
    # ceilings (le=) keep every stored value readable: the JSON encoder gives up past ~250 levels.
    max_json_depth: int = Field(default=32, ge=2, le=100, description="deepest nesting of a stored client JSON")
    max_json_items: int = Field(
        default=10_000, ge=10, le=1_000_000, description="keys + array elements (all levels) of a stored client JSON"
    )
    max_json_string_chars: int = Field(
        default=16_384, ge=64, le=1_000_000, description="longest string or key in a stored client JSON"
    )
    max_request_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="cap for any request body other than "
        "an adapter upload (JSON bodies); larger ones get 413 before the body is read",
    )
    device: str = Field(
        default="auto",
        description=f"where models run: {DEVICE_CHOICES} (auto: the GPU when CUDA is available, else the CPU); "
        "a GPU that is not there is an error, never a silent fallback to the CPU",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = Field(
        default=None, description="base URL put into file_url/signature_url; default: taken from the request"
    )
    embedded_worker: bool = Field(default=True, description="serve also runs a huey consumer in-process")
    worker_threads: int = Field(default=1, ge=1, description="huey worker threads (jobs are CPU/GPU heavy)")
    model_cache_size: int = Field(default=1, ge=1, le=4, description="full models kept loaded per process")
    heartbeat_seconds: float = Field(default=10.0, gt=0, description="running jobs refresh heartbeat_at this often")
    stale_after_heartbeats: int = Field(
        default=3, ge=2, description="a running job whose heartbeat is this many intervals old is considered dead"
    )
    # Stage 1 / evaluation knobs (small defaults: CPU-friendly).
    # The CLI's estimate-importance/make-emulator defaults are these (tests/core/test_defaults.py).
    importance_seq_len: int = Field(default=128, ge=8, description="token block length of the stage-1 corpus")
    importance_batch_size: int = Field(
        default=ImportanceConfig.batch_size, ge=1, description="stage-1 DL batch (default: ImportanceConfig's)"
    )
    importance_max_blocks: int = Field(default=512, ge=1, description="stage-1 training blocks kept from the corpus")
    # Stage 2: where adapters sit, and calibration of each emulator for its own plan (docs/architecture.md).
    emulator_placement: Literal["sandwich", "importance", "spread"] = Field(
        default="sandwich", description="adapter positions: OT's first/last layers, the most important, or spread"
    )
    emulator_calibration_steps: int = Field(
        default=CalibrationConfig.steps,
        ge=0,
        le=100_000,
        description="steps fitting each emulator's stand-ins to the full model (0: none)",
    )
    emulator_calibration_kept_lr: float = Field(
        default=CalibrationConfig.kept_lr,
        ge=0.0,
        le=1.0,
        description="> 0: calibration also adjusts the kept layers (OT-style compensation)",
    )
    emulator_calibration_grad_weight: float = Field(
        default=CalibrationConfig.grad_weight,
        ge=0.0,
        le=1000.0,
        description="> 0: calibration also aligns the adapter layers' gradients with M's (about 2.4x the "
        "calibration time; raises transfer to the full model, docs/benchmarks.md)",
    )
    emulator_calibration_grad_match: Literal["adapters", "junction"] = Field(
        default=CalibrationConfig.grad_match,  # type: ignore[arg-type]
        description="what the gradient term matches: the adapters' parameter gradients, or the gradient where "
        "the bottom adapters hand over to the rest of the network",
    )
    emulator_mix_heads: int = Field(
        default=0,
        ge=0,
        le=16,
        description="> 0: each stand-in also gets a causal attention of this many heads of the model's head width "
        "(token mixing, trained by calibration; docs/benchmarks.md); 0: MLP-only stand-ins",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="stage 1 and calibration recompute layer activations in the backward pass instead of keeping "
        "them: less memory for about one more forward per step, the same result",
    )
    emulator_fidelity_blocks: int = Field(
        default=8, ge=0, le=1024, description="validation blocks for the fidelity figure (0: not measured)"
    )
    # The model owner's bounds on the emulators data owners may get, for models without a policy of their own
    # (PUT /v1/models/{id}/emulator-policy, `set-policy`). JSON in SCALEOT_EMULATOR_POLICY, or one field at a
    # time: SCALEOT_EMULATOR_POLICY__MIN_ALPHA=0.6. model_owner_server/policy.py says how each bound is checked.
    emulator_policy: EmulatorPolicy = Field(
        default_factory=EmulatorPolicy,
        description="server-wide default emulator policy (min alpha/beta, max N_a and kept share, dtypes, "
        "who may build, privacy audit required and its minimum residual gap)",
    )
    # Privacy audit (POST /v1/emulators/{id}/privacy-audit, `audit-emulator`): a cheap recovery attack.
    audit_attack: Literal["heal-lora", "heal-all", "densify"] = Field(
        default="heal-lora", description="the attack an audit runs unless the request names one"
    )
    audit_steps: int = Field(default=32, ge=1, le=100_000, description="training steps of the audit's attack")
    audit_max_steps: int = Field(
        default=2000,
        ge=1,
        le=100_000,
        description="the most steps an API request may ask an audit for (it runs on the server's job worker)",
    )
    audit_val_blocks: int = Field(default=16, ge=1, le=1024, description="held-out public blocks it is scored on")
    audit_corpus: Path | None = Field(
        default=None,
        description="the attacker's public text (.txt/.jsonl); "
        "default: Python's pydoc topics, disjoint from stage-1 and task text",
    )
    eval_seq_len: int = 256
    eval_batch_size: int = 4
    eval_max_examples: int = 64
    # One measurement (shared/eval_settings.py): an upload's own evaluation settings are honoured up to these caps.
    eval_max_seq_len: int = Field(
        default=2048,
        ge=2,
        description="the longest seq_len an upload may ask its evaluation to score with (longer is clamped, "
        "and the adapter's table says so); the examples are capped by SCALEOT_EVAL_MAX_EXAMPLES",
    )
    # Benchmark evaluation (jobs/tasks/benchmark_eval.py): lm-evaluation-harness tasks on M and a plug-in.
    benchmark_tasks_dir: Path | None = Field(
        default=None,
        description="a folder of extra lm-evaluation-harness task YAMLs (with their local data) the benchmark "
        "job may run, besides the server's own (model_owner_server/benchmark_tasks) and lm-eval's "
        "tasks whose data is already on this machine",
    )
    benchmark_max_limit: int = Field(
        default=1000,
        ge=1,
        description="the most examples per task an API benchmark request may ask for (`limit`); the CLI "
        "`eval-adapter` is not bound by it",
    )
    # Web console (/console): a sign-in lasts this long on the server, whatever the browser keeps.
    console_session_minutes: int = Field(default=480, ge=1, le=30 * 24 * 60, description="console sign-in lifetime")
    # Key lifecycle and the audit log's bound on failed sign-ins (core/security.py, audit_log.py).
    console_idle_minutes: int = Field(
        default=30, ge=1, le=30 * 24 * 60, description="a console session unused this long is signed out"
    )
    api_key_ttl_days: int | None = Field(
        default=None,
        ge=1,
        le=3650,
        description="new API keys expire after this many days (and may not be asked to live longer); none: never",
    )
    audit_auth_failures_per_minute: int = Field(
        default=30,
        ge=1,
        le=10_000,
        description="most audit rows for refused keys / sign-ins per minute and process (one per key prefix); "
        "the rest are counted in the next row",
    )
    max_new_tokens: int = Field(
        default=128,
        ge=1,
        le=2048,
        description="upper bound for /generate and for max_tokens of the OpenAI-compatible API",
    )
    # OpenAI-compatible serving (model_owner_server/serving.py): bounded, so overload is a clear 429.
    generation_concurrency: int = Field(
        default=1, ge=1, le=64, description="generations run at once (each holds the CPU/GPU)"
    )
    generation_queue: int = Field(
        default=8,
        ge=0,
        le=10_000,
        description="requests that may wait for a generation slot; beyond that they get 429 at once",
    )
    # Resident plugged models (model_cache.PluggedPool): each shares M's tensors and owns only the adapter
    # layers, which are swapped for the adapter a generation asks for; memory stays bounded whatever the
    # number of adapters.
    plugged_copies: int = Field(
        default=1,
        ge=1,
        le=64,
        description="resident plugged copies of a full model for generation (each costs the adapter layers' "
        "memory, not M's); generations of other adapters wait for a copy and swap their layers in",
    )
    adapter_cache_mb: int = Field(
        default=512,
        ge=0,
        le=1_000_000,
        description="memory (MB) for loaded adapter tensors kept for quick swaps (LRU); 0 reads the file each swap",
    )
    # Quotas, rate limits and fair share (model_owner_server/api/quotas.py): over a limit a request gets 429
    # with Retry-After. 0 turns a limit off. Admin keys are exempt unless rate_limit_admins is on (request rate).
    rate_limit_per_key: int = Field(
        default=1200,
        ge=0,
        description="requests per minute per API key (token bucket in each server process: "
        "N `serve` processes admit up to N times this); 0: off",
    )
    rate_limit_per_org: int = Field(
        default=2400, ge=0, description="requests per minute per organization over all its keys (per process); 0: off"
    )
    rate_limit_burst_seconds: float = Field(
        default=10.0, gt=0, le=3600, description="a request bucket holds this many seconds' worth of its rate"
    )
    rate_limit_admins: bool = Field(default=False, description="also rate-limit admin keys (exempt by default)")
    quota_emulator_builds_per_hour: int = Field(
        default=20, ge=0, description="emulator builds an organization may start per hour (from the jobs table); 0: off"
    )
    quota_adapter_uploads_per_hour: int = Field(
        default=60, ge=0, description="adapter uploads an organization may make per hour; 0: off"
    )
    quota_evaluations_per_hour: int = Field(
        default=60, ge=0, description="evaluation jobs an organization may start per hour; 0: off"
    )
    quota_generated_tokens_per_hour: int = Field(
        default=200_000,
        ge=0,
        description="tokens an organization may generate per hour (/generate and /openai/v1, charged after "
        "each generation; the next request is refused once over); 0: off",
    )
    max_active_jobs_per_org: int = Field(
        default=8, ge=0, description="queued + running jobs one data-owner organization may have at once; 0: off"
    )
    fair_job_scheduling: bool = Field(
        default=True,
        description="the job worker runs the oldest queued job of the organization served least recently "
        "(round-robin across organizations), not strictly the oldest queue message",
    )

    @field_validator("device", mode="before")
    @classmethod
    def _device_form(cls, v: object) -> object:
        """The form only (no torch here): whether the GPU exists is checked when a device is resolved."""
        if isinstance(v, str):
            v = v.strip().lower()
            if not DEVICE_PATTERN.match(v):
                raise ValueError(f"{DEVICE_SETTING}={v!r} is not a device; use {DEVICE_CHOICES}")
        return v

    @field_validator("queue_url", "database_url", mode="before")
    @classmethod
    def _blank_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    # ---- derived paths (not settings themselves)
    @cached_property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'scaleot.db'}"

    @property
    def signing_key_path(self) -> Path:
        return (self.signing_key or self.resolved_data_dir / "keys" / "signing_key.pem").expanduser()

    @property
    def queue_file(self) -> Path:
        return self.resolved_data_dir / "queue" / "huey.db"

    @property
    def tmp_dir(self) -> Path:
        return self.resolved_data_dir / "tmp"

    def resolved_device(self) -> str:
        """The torch device for SCALEOT_DEVICE ("cpu", "cuda", "cuda:1"), through the one switch (shared.device):
        `auto` picks the GPU when there is one; a GPU that is not there raises DeviceError naming the setting."""
        from shared.device import resolve_device  # local import: torch stays out of CLI --help

        return str(resolve_device(self.device, setting=DEVICE_SETTING).device)


def get_settings() -> Settings:
    return Settings()
