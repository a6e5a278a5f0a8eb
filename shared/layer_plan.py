"""The layer plan: what each decoder position of the emulator is, and the SRC ranks of frozen layers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


def importance_order(scores: Any) -> list[int]:
    """Layer indices, most important (highest stage-1 score S_i) first; ties broken by position.

    The one ranking rule: the stage-1 result, the "importance" adapter placement and which layers become
    harmonizers all read it. `scores` is any sequence of numbers (a list or a 1-D tensor)."""
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))


class Role(StrEnum):
    ADAPTER = "adapter"  # original layer, sent uncompressed, trained by the data owner
    HARMONIZER = "harmonizer"  # replaced by its lightweight stand-in
    FROZEN = "frozen"  # original layer, frozen; attention projections rank-reduced by beta (SRC)
    DROPPED = "dropped"  # removed (OT uniform LayerDrop baseline): the position is the identity


@dataclass
class LayerPlan:
    roles: list[Role]
    # ranks[i][projection path] = ranks kept per block (one block unless the projection is fused).
    # Only frozen layers with beta > 0 appear; absent = uncompressed.
    ranks: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    method: str = "scaleot"  # "scaleot" | "uniform_layerdrop" | "full"
    n_adapter: int = 0
    alpha: float = 0.0
    beta: float = 0.0
    bottleneck: int = 0  # harmonizer width (0 when there are no harmonizers)
    # The stand-ins' token mixing (shared/modules.py CausalMix): heads and head width; 0 = MLP-only stand-ins.
    mix_heads: int = 0
    mix_head_dim: int = 0

    @property
    def n_layers(self) -> int:
        return len(self.roles)

    def layers_with(self, role: Role) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == role]

    @property
    def adapter_layers(self) -> list[int]:
        return self.layers_with(Role.ADAPTER)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roles"] = [r.value for r in self.roles]
        d["ranks"] = {str(i): v for i, v in self.ranks.items()}  # JSON keys are strings
        if not self.mix_heads:  # plans without mixing serialise as before it existed (same files, same digests)
            del d["mix_heads"], d["mix_head_dim"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerPlan:
        try:
            return cls(
                roles=[Role(r) for r in d["roles"]],
                ranks={
                    int(i): {str(p): [int(x) for x in v] for p, v in m.items()} for i, m in d.get("ranks", {}).items()
                },
                method=str(d.get("method", "scaleot")),
                n_adapter=int(d.get("n_adapter", 0)),
                alpha=float(d.get("alpha", 0.0)),
                beta=float(d.get("beta", 0.0)),
                bottleneck=int(d.get("bottleneck", 0)),
                mix_heads=int(d.get("mix_heads", 0)),
                mix_head_dim=int(d.get("mix_head_dim", 0)),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed layer plan: {exc}") from exc

    def __post_init__(self) -> None:
        if self.mix_heads < 0 or (self.mix_heads and (self.mix_head_dim < 2 or self.mix_head_dim % 2)):
            raise ValueError(
                f"token mixing needs mix_heads >= 0 and an even mix_head_dim >= 2 "
                f"(got {self.mix_heads} x {self.mix_head_dim})"
            )

    def summary(self) -> str:
        """Compact one-character-per-layer picture: A adapter, H harmonizer, F frozen, f frozen+SRC, . dropped."""
        chars = []
        for i, r in enumerate(self.roles):
            if r == Role.FROZEN:
                chars.append("f" if i in self.ranks else "F")
            else:
                chars.append({Role.ADAPTER: "A", Role.HARMONIZER: "H", Role.DROPPED: "."}[r])
        return "".join(chars)
