"""What a compressed cache applies: the PCA bases of the targeted tensors and a rank per layer.

A :class:`KVPlan` is the runtime half of a preset (``calibra.kv.preset.KVPreset`` adds the metadata):
``bases["v"][i]`` is layer ``i``'s value basis and ``ranks["v"][i]`` how many of its directions the
cache keeps; ``"k"`` is present only when keys are compressed too (``targets="kv"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from calibra.kv.basis import TARGETS, HeadBases


class KVArchitectureError(NotImplementedError):
    """The model's attention cannot be compressed by calibra.kv (MLA latents, partial RoPE, ...)."""


class PresetMismatchError(ValueError):
    """A preset (or plan) made for a different model: layer count, KV heads or head_dim differ."""


def which_of(targets: str) -> tuple[str, ...]:
    if targets not in TARGETS:
        raise ValueError(
            f"[kv] targets must be one of {', '.join(repr(t) for t in TARGETS)} ('v': values only, "
            f"'kv': keys and values), got {targets!r}"
        )
    return ("k", "v") if targets == "kv" else ("v",)


@dataclass
class KVPlan:
    bases: dict[str, list[HeadBases]]
    ranks: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        if "v" not in self.bases or set(self.bases) - {"k", "v"}:
            raise ValueError(
                f"[kv] a plan needs value bases ('v') and optionally key bases ('k'), got {sorted(self.bases)}"
            )
        n = len(self.bases["v"])
        for which, bl in self.bases.items():
            if len(bl) != n:
                raise ValueError(f"[kv] {which} bases cover {len(bl)} layers, v bases {n}")
            ranks = self.ranks.get(which)
            if ranks is None:
                self.ranks[which] = [b.head_dim for b in bl]
                continue
            if len(ranks) != n:
                raise ValueError(f"[kv] {which} ranks name {len(ranks)} layers, the model has {n}: {ranks}")
            for i, (r, b) in enumerate(zip(ranks, bl)):
                if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= b.head_dim:
                    raise ValueError(
                        f"[kv] {which} rank of layer {i} must be an integer in 1..{b.head_dim} (head_dim), got {r!r}"
                    )
        if set(self.ranks) - set(self.bases):
            raise ValueError(f"[kv] ranks given for {sorted(set(self.ranks) - set(self.bases))} without bases")

    @property
    def targets(self) -> str:
        return "kv" if "k" in self.bases else "v"

    @property
    def num_layers(self) -> int:
        return len(self.bases["v"])

    @property
    def head_dim(self) -> int:
        return self.bases["v"][0].head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.bases["v"][0].num_heads

    def with_ranks(self, ranks: dict[str, list[int]]) -> KVPlan:
        """The same bases with other ranks (the auto-tuner's candidates)."""
        return KVPlan(bases=self.bases, ranks={w: list(r) for w, r in ranks.items()})

    def uniform(self, rank: int) -> KVPlan:
        """Every targeted tensor of every layer at ``rank``."""
        return self.with_ranks({w: [rank] * self.num_layers for w in self.bases})

    def check_model(self, adapter) -> None:
        """Raise :class:`PresetMismatchError` (or :class:`KVArchitectureError`) before any work when this
        plan does not fit the model behind ``adapter``."""
        check_architecture(adapter)
        want = (len(adapter.layers), adapter.num_kv_heads, adapter.head_dim)
        have = (self.num_layers, self.num_kv_heads, self.head_dim)
        if want != have:
            raise PresetMismatchError(
                f"[kv] the preset was made for a model with {have[0]} layers, {have[1]} KV heads of head_dim "
                f"{have[2]}; this model has {want[0]} layers, {want[1]} KV heads of head_dim {want[2]}. "
                f"Calibrate a preset for this model (calibra kv calibrate --input MODEL ...)"
            )


def check_architecture(adapter) -> str:
    """The attention kind when calibra.kv supports it, else :class:`KVArchitectureError`.

    Standard attention (MHA/GQA: Llama, Qwen, Mistral) compresses per-head values and, optionally, keys.
    MLA (DeepSeek-V2/V3) caches one shared latent per token; the right target there is that latent, which
    none of calibra's model adapters expose (no MLA architecture is registered), so it is refused by name.
    """
    kind = adapter.attention_kind
    if kind == "mla":
        raise KVArchitectureError(
            "[kv] this model uses multi-head latent attention (MLA, kv_lora_rank set: DeepSeek-V2/V3 style). Its "
            "cache target is the shared latent, which calibra's model adapters cannot express yet; supported: "
            "standard multi-head and grouped-query attention (Llama, Mistral, Qwen2, Qwen3 and their MoE variants)"
        )
    return kind
