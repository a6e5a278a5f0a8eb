"""The model owner's emulator policy: which emulators of a model a data owner may get.

An emulator is a lossy copy of M. At alpha = 0 and beta = 0 it *is* M (every layer kept, nothing rank-reduced),
so the service bounds what a data owner can ask for and download, per model:

- min_alpha, min_beta, max_n_adapter, allowed_dtypes: bounds on the request itself;
- max_kept_share: the share of M's decoder layers the emulator carries as original layers (adapter + frozen),
  computed from the plan the request would build (the stage-1 scores, N_a, alpha and the placement), not from
  alpha: any alpha below 0.5 / (layers - N_a) rounds to "nothing replaced", and this bound still catches it;
- builders: "admins" lets only the model owner build emulators of the model;
- require_audit, min_residual_gap_nats: a data owner gets only an emulator whose privacy was measured by a
  recovery attack (model_owner_server/privacy_audit.py) and whose attacker stayed this far above M's loss.

Two checks use it: `check_request` before anything is built for a data owner (POST /v1/emulators, the console's
form), and `check_issue` whenever a data owner downloads an emulator file or its signature, against the
*current* policy, so tightening a policy also withholds emulators built earlier (or built by an admin outside
the bounds). Admins are never refused: the policy bounds what leaves, and admins are the model owner.
The embeddings and the final norm are in every emulator (as in Offsite-Tuning); the policy is about layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.orm import Session

from model_owner_server.core.config import Settings
from model_owner_server.models import EmulatorRow, Organization, RegisteredModel
from shared.layer_plan import LayerPlan, Role
from shared.schemas import EmulatorPolicy, EmulatorPolicyUpdate, PolicyCheck

KEPT_ROLES = (Role.ADAPTER, Role.FROZEN)


@dataclass(frozen=True)
class Refusal:
    """A request or download outside the policy; `reasons` say what would change it."""

    model_id: str
    reasons: list[str]
    policy: EmulatorPolicy

    def message(self, what: str) -> str:
        return (
            f"{what} refused by the model owner's emulator policy for model {self.model_id}: "
            + "; ".join(self.reasons)
            + f". The policy: {describe(self.policy)} (GET /v1/models/{self.model_id}/emulator-policy); "
            "ask the model owner if you need an exception."
        )


PolicySource = Literal["model", "server default"]


def effective_policy(model: RegisteredModel, settings: Settings) -> tuple[EmulatorPolicy, PolicySource]:
    """The model's own policy, else the server default; and which of the two it is."""
    if model.emulator_policy is not None:
        return EmulatorPolicy.model_validate(model.emulator_policy), "model"
    return settings.emulator_policy, "server default"


def updated_policy(current: EmulatorPolicy, update: EmulatorPolicyUpdate) -> EmulatorPolicy:
    """`current` with the fields `update` sets (validated again as a whole)."""
    changes = update.model_dump(exclude_unset=True, exclude_none=True, exclude={"no_min_residual_gap"})
    if update.no_min_residual_gap:
        changes["min_residual_gap_nats"] = None
    return EmulatorPolicy.model_validate({**current.model_dump(), **changes})


def describe(policy: EmulatorPolicy) -> str:
    gap = "any measured gap" if policy.min_residual_gap_nats is None else f">= {policy.min_residual_gap_nats} nats"
    audit = f"privacy audit required ({gap})" if policy.require_audit else "no privacy audit required"
    return (
        f"alpha >= {policy.min_alpha}, beta >= {policy.min_beta}, n_adapter <= {policy.max_n_adapter}, "
        f"at most {policy.max_kept_share:.0%} of M's layers kept, dtypes {', '.join(policy.allowed_dtypes)}, "
        f"built by {'admins only' if policy.builders == 'admins' else 'granted data owners and admins'}, {audit}"
    )


def kept_share(roles: Sequence[Role | str]) -> float:
    """Share of M's decoder layers the emulator carries as original layers (adapter + frozen)."""
    kept = sum(1 for r in roles if Role(r) in KEPT_ROLES)
    return kept / max(1, len(roles))


def _plan_reasons(
    policy: EmulatorPolicy, roles: Sequence[Role | str], n_adapter: int, alpha: float, beta: float, dtype: str
) -> list[str]:
    reasons = []
    if alpha < policy.min_alpha:
        reasons.append(f"alpha {alpha} is below the minimum {policy.min_alpha}")
    if beta < policy.min_beta:
        reasons.append(f"beta {beta} is below the minimum {policy.min_beta}")
    if n_adapter > policy.max_n_adapter:
        reasons.append(f"n_adapter {n_adapter} is above the maximum {policy.max_n_adapter}")
    share = kept_share(roles)
    if share > policy.max_kept_share + 1e-9:
        kept = round(share * len(roles))
        reasons.append(
            f"the plan keeps {kept} of M's {len(roles)} layers as originals ({share:.0%}), above the "
            f"{policy.max_kept_share:.0%} allowed: raise alpha or lower n_adapter"
        )
    if dtype not in policy.allowed_dtypes:
        reasons.append(f"dtype {dtype} is not allowed (allowed: {', '.join(policy.allowed_dtypes)})")
    return reasons


def check_request(
    policy: EmulatorPolicy,
    model_id: str,
    org: Organization,
    roles: Sequence[Role],
    n_adapter: int,
    alpha: float,
    beta: float,
    dtype: str,
) -> Refusal | None:
    """Before a build: may `org` ask for this plan? None = yes. Admins always may."""
    if org.is_admin:
        return None
    reasons = []
    if policy.builders == "admins":
        reasons.append("only the model owner's admins build emulators of this model")
    reasons += _plan_reasons(policy, roles, n_adapter, alpha, beta, dtype)
    return Refusal(model_id, reasons, policy) if reasons else None


def _issue_reasons(policy: EmulatorPolicy, emu: EmulatorRow) -> list[str]:
    roles = LayerPlan.from_dict(emu.plan).roles if emu.plan else []
    dtype = (emu.build_info or {}).get("dtype", "float32")
    reasons = _plan_reasons(policy, roles, emu.n_adapter, emu.alpha, emu.beta, dtype) if roles else []
    if policy.require_audit:
        privacy = emu.privacy or {}
        gap = privacy.get("residual_gap_nats")
        if not isinstance(gap, int | float):
            reasons.append(
                f"emulator {emu.id} has no privacy audit yet, and the policy requires one: the model owner runs "
                f"`modelowner-server audit-emulator {emu.id}` (or POST /v1/emulators/{emu.id}/privacy-audit)"
            )
        elif policy.min_residual_gap_nats is not None and gap < policy.min_residual_gap_nats:
            reasons.append(
                f"its privacy audit left a residual gap of {gap:.3f} nats, below the policy's minimum "
                f"{policy.min_residual_gap_nats}: an attacker could heal it close to M; ask for a larger alpha or beta"
            )
    return reasons


def check_issue(policy: EmulatorPolicy, emu: EmulatorRow, org: Organization) -> Refusal | None:
    """Before a download of the file or its signature: may `org` have emulator `emu` now? Admins always may."""
    if org.is_admin:
        return None
    reasons = _issue_reasons(policy, emu)
    return Refusal(emu.model_id, reasons, policy) if reasons else None


def policy_check(policy: EmulatorPolicy, emu: EmulatorRow) -> PolicyCheck:
    """What GET /v1/emulators/{id} shows: whether a data owner may download it now, and why not."""
    if emu.status != "ready":
        return PolicyCheck(issuable=False, reasons=[f"emulator {emu.id} is {emu.status}"])
    reasons = _issue_reasons(policy, emu)
    share = kept_share(LayerPlan.from_dict(emu.plan).roles) if emu.plan else None
    return PolicyCheck(issuable=not reasons, reasons=reasons, kept_share=round(share, 4) if share is not None else None)


def policy_for_emulator(session: Session, emu: EmulatorRow, settings: Settings) -> EmulatorPolicy:
    model = session.get(RegisteredModel, emu.model_id)
    return effective_policy(model, settings)[0] if model is not None else settings.emulator_policy
