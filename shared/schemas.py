"""Pydantic models of the v1 wire format (server responses and request bodies).

Both parties import these: the server to shape its JSON (and its OpenAPI schema), the client to
parse it. Response models ignore unknown fields (`extra="ignore"`) so a newer server can add fields
without breaking an older client; request models forbid them so typos are reported, not ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.importance_config import ImportanceConfig

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["importance", "emulator", "evaluation", "benchmark_eval"]
EmulatorStatus = Literal["building", "ready", "failed"]
AdapterStatus = Literal["evaluating", "evaluated", "failed"]
# The dtype the server computes a registered model in; auto: the checkpoint's own on a GPU, float32 on CPU.
ComputeDType = Literal["auto", "float32", "bfloat16", "float16"]
KeyStatus = Literal["active", "retired", "revoked"]
Role = Literal["admin", "data-owner"]


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------- errors


class ErrorDetail(_Response):
    code: str = Field(description="machine-readable, e.g. not_found, forbidden, validation_error")
    message: str = Field(description="what went wrong and what to do next")


class ErrorBody(_Response):
    error: ErrorDetail


# ---------------------------------------------------------------- jobs


class Job(_Response):
    id: str
    kind: str
    status: JobStatus
    progress: float = Field(ge=0.0, le=1.0)
    message: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict, description="live metrics while running")
    result: dict[str, Any] = Field(default_factory=dict, description="ids of what the job produced")
    error: str | None = None
    cancel_requested: bool = Field(
        default=False,
        description="POST /v1/jobs/{id}/cancel was called while it ran; it ends `cancelled` at its next step",
    )
    created_at: datetime
    updated_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


class JobList(_Response):
    jobs: list[Job]
    next_cursor: str | None = Field(
        default=None, description="pass as `cursor` for the next page (newest first); null: this was the last page"
    )
    limit: int | None = Field(default=None, description="the page size this answer used")


# ---------------------------------------------------------------- models


class Model(_Response):
    id: str
    name: str
    family: str | None = None
    n_layers: int | None = None
    n_params: int | None = None
    compute_dtype: ComputeDType = "auto"
    importance_ready: bool = False
    importance_job_id: str | None = None
    created_at: datetime


class ModelList(_Response):
    models: list[Model]


class ModelCreate(_Request):
    name: str = Field(min_length=1, max_length=200)
    path: str = Field(min_length=1, description="server-side local Hugging Face folder with safetensors")
    compute_dtype: ComputeDType = Field(
        default="auto",
        description="dtype the server's jobs and serving compute the model in; auto: the checkpoint's own "
        "(config.json torch_dtype) on a GPU, float32 on CPU, where bf16 matmuls are slow",
    )


class GrantCreate(_Request):
    org: str = Field(min_length=1, description="organization name or id")


class Grant(_Response):
    model_id: str
    org_id: str
    org_name: str
    created_at: datetime


# Stage 1's defaults come from the library's ImportanceConfig (shared/importance_config.py), as the CLI's do.
_STAGE1 = ImportanceConfig()


class ImportanceRequest(_Request):
    steps: int = Field(default=_STAGE1.steps, ge=1, le=1_000_000)
    corpus: str | None = Field(default=None, description="server-side text file; default: SCALEOT_DEFAULT_CORPUS")
    warmup_steps: int = Field(
        default=_STAGE1.warmup_steps,
        ge=0,
        le=100_000,
        description="local-regression warm start of the "
        "harmonizers before Dynamic LayerReplace (cheap; helps short runs)",
    )
    rl_interval: int = Field(
        default=_STAGE1.rl_interval, ge=1, le=10_000, description="an RL score update every this many DL steps"
    )
    distill_weight: float = Field(
        default=_STAGE1.distill_weight, ge=0.0, le=100.0, description="KL to the full model's logits"
    )
    hidden_weight: float = Field(
        default=_STAGE1.hidden_weight,
        ge=0.0,
        le=100.0,
        description="normalised MSE of the last hidden state against the full model's",
    )
    seed: int = Field(default=_STAGE1.seed, ge=0, le=2**31 - 1)


class PrivacyAuditRequest(_Request):
    attack: Literal["heal-lora", "heal-all", "densify"] | None = Field(
        default=None, description="heal-lora (cheapest), heal-all, densify; default: SCALEOT_AUDIT_ATTACK"
    )
    steps: int | None = Field(default=None, ge=1, le=100_000, description="default: SCALEOT_AUDIT_STEPS")
    corpus: str | None = Field(
        default=None,
        description="server-side public text file for the attacker; default: "
        "SCALEOT_AUDIT_CORPUS, else Python's pydoc topics",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


# ---------------------------------------------------------------- signing


class SigningKey(_Response):
    key_id: str
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")
    status: KeyStatus
    created_at: datetime


class SigningKeyList(_Response):
    keys: list[SigningKey]


class Manifest(_Response):
    model_config = ConfigDict(extra="allow", protected_namespaces=())
    format: str
    emulator_id: str
    model_id: str
    sha256: str
    size_bytes: int
    layer_plan: dict[str, Any]
    key_id: str
    issued_at: str


class SignedManifest(_Response):
    # Verify the raw JSON dict with shared.signing.verify_signed_manifest, not a re-serialised model:
    # the signature covers the exact manifest fields.
    manifest: Manifest
    signature: str
    key_id: str


# ---------------------------------------------------------------- emulators


EmulatorDType = Literal["float32", "bfloat16", "float16"]
Builders = Literal["granted", "admins"]
EMULATOR_DTYPES: tuple[EmulatorDType, ...] = ("float32", "bfloat16", "float16")


class EmulatorPolicy(_Request):
    """The model owner's bounds on what emulators of one model a data owner may get (model_owner_server/policy.py).

    Checked when a data owner asks for a build (nothing is built on a refusal) and again whenever a data
    owner downloads a file or its signature (so tightening a policy also stops emulators built earlier).
    Admins may build anything; what they build is issued to data owners only within the policy."""

    min_alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="smallest share of layers replaced")
    min_beta: float = Field(default=0.0, ge=0.0, lt=1.0, description="smallest SRC ratio (attention rank removed)")
    max_n_adapter: int = Field(default=8, ge=1, le=1024, description="most adapter layers (sent uncompressed)")
    max_kept_share: float = Field(
        default=0.7,
        gt=0.0,
        le=1.0,
        description="most share of M's decoder layers the emulator may carry as original layers "
        "(adapter + frozen), computed from the plan itself, so no alpha can round its way past it",
    )
    allowed_dtypes: list[EmulatorDType] = Field(
        default_factory=lambda: list(EMULATOR_DTYPES), min_length=1, description="storage dtypes"
    )
    builders: Builders = Field(
        default="granted", description="who may ask for a build: 'granted' data owners too, or 'admins' only"
    )
    require_audit: bool = Field(
        default=True,
        description="data owners get only emulators with a privacy audit (the build job runs one when this is on)",
    )
    min_residual_gap_nats: float | None = Field(
        default=0.5,
        ge=-100.0,
        le=100.0,
        description="the audit's attacker must stay at least this far above M's loss; null: any measured gap",
    )


class EmulatorPolicyUpdate(_Request):
    """PUT /v1/models/{id}/emulator-policy: the fields to change; the others keep their current values."""

    min_alpha: float | None = Field(default=None, ge=0.0, le=1.0)
    min_beta: float | None = Field(default=None, ge=0.0, lt=1.0)
    max_n_adapter: int | None = Field(default=None, ge=1, le=1024)
    max_kept_share: float | None = Field(default=None, gt=0.0, le=1.0)
    allowed_dtypes: list[EmulatorDType] | None = Field(default=None, min_length=1)
    builders: Builders | None = None
    require_audit: bool | None = None
    min_residual_gap_nats: float | None = Field(default=None, ge=-100.0, le=100.0)
    no_min_residual_gap: bool = Field(default=False, description="true: set min_residual_gap_nats to null")


class EmulatorPolicyOut(_Response):
    model_id: str
    source: Literal["model", "server default"] = Field(
        description="'model': set for this model; 'server default': SCALEOT_EMULATOR_POLICY"
    )
    policy: EmulatorPolicy


class PolicyCheck(_Response):
    issuable: bool = Field(description="a data owner may download this emulator under the current policy")
    reasons: list[str] = Field(default_factory=list, description="why not, each with what would change it")
    kept_share: float | None = Field(default=None, description="share of M's decoder layers kept as originals")


class TensorSpecOut(_Response):
    shape: list[int]
    dtype: str


class Emulator(_Response):
    id: str
    model_id: str
    n_adapter: int
    alpha: float
    beta: float
    status: EmulatorStatus
    job_id: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    n_params: int | None = None
    full_model_params: int | None = None
    full_model_bytes: int | None = None
    plan: dict[str, Any] | None = None
    adapter_layers: list[int] = Field(default_factory=list)
    adapter_spec: dict[str, TensorSpecOut] = Field(default_factory=dict)
    max_adapter_bytes: int | None = None
    fidelity: dict[str, Any] | None = Field(
        default=None,
        description="measured at build time on the stage-1 "
        "validation blocks: ppl_ratio (emulator / full model perplexity) and "
        "grad_cosine (adapter gradients under the emulator vs the full model)",
    )
    build_info: dict[str, Any] | None = Field(default=None, description="adapter placement and calibration run")
    privacy: dict[str, Any] | None = Field(
        default=None,
        description="the latest privacy audit: an attacker heals "
        "the emulator on public text; residual_gap_nats = its held-out loss "
        "minus the full model's (> 0: still worse than M); None: not audited",
    )
    policy_check: PolicyCheck | None = Field(
        default=None, description="the model owner's emulator policy applied to this emulator, as of now"
    )
    file_url: str
    signature_url: str
    error: str | None = None
    created_at: datetime


class EmulatorList(_Response):
    emulators: list[Emulator]
    next_cursor: str | None = Field(
        default=None, description="pass as `cursor` for the next page (newest first); null: this was the last page"
    )
    limit: int | None = Field(default=None, description="the page size this answer used")


class EmulatorCreate(_Request):
    model_id: str
    n_adapter: int = Field(ge=1, description="number of adapter layers (the most important ones)")
    alpha: float = Field(ge=0.0, le=1.0, description="fraction of the other layers replaced by harmonizers")
    beta: float = Field(ge=0.0, lt=1.0, description="SRC ratio: share of attention rank removed")
    dtype: EmulatorDType = Field(
        default="float32",
        description="storage dtype of the emulator file (bf16/fp16: half the size); adapters "
        "come back in it. Stored in build_info and the signed manifest",
    )


class EmulatorCreated(_Response):
    emulator: Emulator
    job: Job | None = None


# ---------------------------------------------------------------- adapters


class AdapterEvaluation(_Response):
    zero_shot: dict[str, Any] | None = Field(default=None, description="full model M without the adapter")
    plug_in: dict[str, Any] | None = Field(default=None, description="M' = [A', E]")
    eval_source: str | None = Field(default=None, description="'upload' or the server's default eval file")
    settings: dict[str, Any] | None = Field(
        default=None,
        description="what both columns were scored with: seq_len, max_examples, source ('client': the upload's "
        "own eval_settings, so the client's emulator columns are the same measurement; 'server default') and "
        "notes on what the server's caps changed",
    )
    benchmarks: dict[str, Any] | None = Field(
        default=None,
        description="lm-evaluation-harness tasks on M zero-shot and on the plug-in (POST "
        "/v1/adapters/{id}/benchmarks, `modelowner-server eval-adapter`): tasks, settings, per-task metrics",
    )


class Adapter(_Response):
    id: str
    emulator_id: str
    model_id: str
    status: AdapterStatus
    sha256: str
    size_bytes: int
    method: str | None = None
    adapter_config: dict[str, Any] | None = None
    client_metrics: dict[str, Any] | None = Field(default=None, description="the client's emulator-side metrics")
    evaluation: AdapterEvaluation = Field(default_factory=AdapterEvaluation)
    job_id: str | None = None
    error: str | None = None
    created_at: datetime


class AdapterList(_Response):
    adapters: list[Adapter]
    next_cursor: str | None = Field(
        default=None, description="pass as `cursor` for the next page (newest first); null: this was the last page"
    )
    limit: int | None = Field(default=None, description="the page size this answer used")


class AdapterCreated(_Response):
    adapter: Adapter
    job: Job


class GenerateRequest(_Request):
    prompt: str = Field(min_length=1, max_length=20_000)
    max_new_tokens: int = Field(default=32, ge=1, le=256)


class GenerateResponse(_Response):
    adapter_id: str
    prompt: str
    completion: str
    max_new_tokens: int


# ---------------------------------------------------------------- misc


class Health(_Response):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unreachable"]
    version: str
