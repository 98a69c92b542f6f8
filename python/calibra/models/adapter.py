"""Architecture adapters: everything the calibration engine must know about a model family.

The runner (``calibra.calib.runner``) is architecture-blind; it asks an adapter for the decoder layers,
the modules it must move to the device to compute the first layer's inputs, the Linear modules of a
layer by role, the attention module (for K/V observers) and the MoE blocks (router, experts, top-k).

All supported families (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE) share the
Hugging Face layout ``model.model.layers[i].{self_attn,mlp}``, so one adapter class serves them; the
registry (``registry.py``) maps ``config.model_type`` to it and holds the supported list.

Two expert layouts are handled:

* **fused** (transformers 5): ``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj``
  ``[E, H, I]`` 3-D parameters, routed by a top-k router module returning ``(logits, scores, index)``;
* **unfused** (transformers 4.x): ``experts`` is a ``ModuleList`` of MLPs with ``nn.Linear``
  ``gate_proj/up_proj/down_proj`` (Qwen2-MoE) or ``w1/w3/w2`` (Mixtral), routed by an ``nn.Linear``
  ``gate`` whose logits are soft-maxed and top-k'd here exactly as those versions did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from calibra.compat.transformers import (
    expert_down_input,
    fused_expert_weights,
    is_fused_experts,
    router_probs_and_topk,
)

# role of a Linear by its attribute name (the last component of its module path)
_ROLES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
}
# Linears that are routers/gates, never compressed and never observed
_SKIP_LINEARS = ("shared_expert_gate",)
# (gate, up, down) attribute names of one unfused expert MLP
_UNFUSED_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


@dataclass
class MoEBlock:
    """One sparse-MoE block of a decoder layer.

    ``name`` is the block's path relative to its decoder layer (``"mlp"`` or ``"block_sparse_moe"``).
    Per-expert statistics are keyed ``<layer>.<name>.experts.<e>.gate_up_proj`` (the input shared by the
    gate and up projections: the routed tokens' hidden states) and ``...experts.<e>.down_proj`` (the
    input of the down projection: ``act(gate(x)) * up(x)`` with that expert's weights), whatever the layout.
    """

    name: str
    module: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    fused: bool
    norm_topk_prob: bool
    act_fn: object = field(repr=False, default=None)
    routed_at_experts: bool = False
    """The routing is read from the experts module's own call (the structural adapter: whatever rule the
    family's block uses to choose experts -- grouped top-k, score-correction biases, sparse mixers --
    the runner sees its result) instead of recomputed by :meth:`route`."""

    @property
    def hook_module(self) -> nn.Module:
        """The module whose calls the runner observes: the block (its input, routed by :meth:`route`), or the
        experts when the routing is read from their call (:func:`compat.transformers.experts_call_routing`)."""
        return self.experts if self.routed_at_experts else self.module

    def probs(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The router's softmax probabilities ``[n, E]`` float32 for tokens ``x [n, H]`` routed to ``index
        [n, k]`` (the coverage table's probability mass; a router that scores more columns than there are
        experts -- "zero" experts -- is cut to the real ones). A router that cannot be called on its own
        (AFMoE's takes its block's expert bias as an argument) gives each chosen expert ``1/k`` instead."""
        if not self.routed_at_experts:
            return self.route(x)[0]
        try:
            out = self.router(x)
            logits = (out[0] if isinstance(out, tuple) else out).float().reshape(x.shape[0], -1)
            return torch.softmax(logits, dim=-1)[:, : self.num_experts]
        except (TypeError, RuntimeError):
            share = torch.zeros(x.shape[0], self.num_experts + 1, device=x.device)
            k = index.shape[-1]
            share.scatter_add_(
                1, index.long().clamp(0, self.num_experts), torch.full(index.shape, 1.0 / k, device=x.device)
            )
            return share[:, : self.num_experts]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs [n, E] float32, top_k index [n, k] int64)`` for tokens ``x [n, H]`` under the
        model's normal routing (the router module itself, no noise: eval mode)."""
        return router_probs_and_topk(self.router(x), self.top_k)

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W_gate [I, H], W_up [I, H], W_down [H, I])`` of expert ``e`` (views, no copies)."""
        if self.fused:
            return fused_expert_weights(self.experts, e)
        mlp = self.experts[e]
        for g, u, d in _UNFUSED_EXPERT_NAMES:
            if hasattr(mlp, g):
                return getattr(mlp, g).weight, getattr(mlp, u).weight, getattr(mlp, d).weight
        raise TypeError(f"[models] expert {e} of {self.name} has none of the known projection names")

    def down_input(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """The input of expert ``e``'s down projection for its routed tokens ``x [n, H]``."""
        if self.fused:  # as the experts module computes it (GPT-OSS: its biased, clamped gate)
            return expert_down_input(self.experts, e, x)
        w_gate, w_up, _ = self.expert_weights(e)
        return self.act_fn(F.linear(x, w_gate)) * F.linear(x, w_up)


def attention_kind(config) -> str:
    """How a model caches keys and values, from its config alone (no weights needed).

    * ``"mla"`` -- multi-head latent attention (DeepSeek-V2/V3 style): the cache holds one shared
      compressed latent per token (``kv_lora_rank``), not per-head keys and values;
    * ``"gqa"`` -- standard attention with fewer key/value heads than query heads (Llama 3, Qwen, Mistral);
    * ``"mha"`` -- standard attention, one key/value head per query head.
    """
    if getattr(config, "kv_lora_rank", None):
        return "mla"
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    return "gqa" if heads and kv and kv < heads else "mha"


class ModelAdapter:
    """Generic adapter for Hugging Face decoder-only models laid out as ``model.model.layers``."""

    explicit = True
    """Roles by name, K/V sources and MoE blocks are known (the structural adapter sets False)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers"):
            raise TypeError(
                f"[models] {type(model).__name__} has no .model.layers; expected a *ForCausalLM "
                "decoder model (Llama/Mistral/Qwen/Mixtral layout)"
            )
        self.base = base

    # -- structure -------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    @property
    def layers_prefix(self) -> str:
        """Module path of the layer list, e.g. ``model.layers`` (layer i is ``model.layers.i``)."""
        for name, mod in self.model.named_modules():
            if mod is self.base.layers:
                return name
        return "model.layers"

    def layer_name(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    def pre_layer_modules(self) -> list[nn.Module]:
        """Modules the model runs before its first decoder layer (moved to the device for capture)."""
        mods = [self.base.embed_tokens]
        if getattr(self.base, "rotary_emb", None) is not None:
            mods.append(self.base.rotary_emb)
        return mods

    def final_norm(self) -> nn.Module:
        """The norm the model applies after its last decoder layer, before the output head (a layer-by-layer
        evaluation applies it to the last layer's outputs itself)."""
        return self.base.norm

    @property
    def num_kv_heads(self) -> int:
        c = self.config
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def attention_kind(self) -> str:
        """``"mha"``, ``"gqa"`` or ``"mla"`` (see :func:`attention_kind`)."""
        return attention_kind(self.config)

    # -- inside a layer ----------------------------------------------------------------------------
    def moe_blocks(self, layer: nn.Module) -> list[MoEBlock]:
        blocks = []
        for name, mod in layer.named_modules():
            experts = getattr(mod, "experts", None)
            router = getattr(mod, "gate", None)
            if experts is None or router is None or name.endswith("experts"):
                continue
            fused = is_fused_experts(experts)
            if fused:
                num_experts = experts.gate_up_proj.shape[0]
                act = experts.act_fn
            elif isinstance(experts, nn.ModuleList):
                num_experts = len(experts)
                act = getattr(experts[0], "act_fn", None)
            else:
                continue
            top_k = getattr(router, "top_k", None) or getattr(mod, "top_k", None) or self.config.num_experts_per_tok
            blocks.append(
                MoEBlock(
                    name=name,
                    module=mod,
                    router=router,
                    experts=experts,
                    num_experts=int(num_experts),
                    top_k=int(top_k),
                    fused=fused,
                    norm_topk_prob=bool(getattr(self.config, "norm_topk_prob", True)),
                    act_fn=act,
                )
            )
        return blocks

    def linear_modules(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The observed/compressible ``nn.Linear`` modules of a layer, by path relative to the layer.

        Expert Linears of unfused MoE blocks and the routers are excluded: experts are observed per
        expert by the MoE observer (on their routed, unpadded tokens), routers are never compressed.
        """
        skip = []
        for b in self.moe_blocks(layer):
            skip.append(f"{b.name}.experts.")
            skip.append(f"{b.name}.gate")
        out = {}
        for name, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            if any(name == s.rstrip(".") or name.startswith(s) for s in skip):
                continue
            if name.rsplit(".", 1)[-1] in _SKIP_LINEARS:
                continue
            out[name] = mod
        return out

    @staticmethod
    def role(name: str) -> str:
        """``q/k/v/o/gate/up/down`` (or ``other``) for a Linear's path."""
        return _ROLES.get(name.rsplit(".", 1)[-1], "other")

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def key_value_sources(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Modules whose outputs are the layer's keys and values before RoPE and before the cache.

        Keys are observed pre-RoPE: RoPE rotates each position differently, so the post-RoPE covariance
        mixes positions; KV-PCA projects the pre-RoPE keys (and re-applies RoPE after the projection).
        For Qwen3 that is the output of ``k_norm`` (per-head RMSNorm after ``k_proj``).
        """
        attn = self.attention(layer)
        k_norm = getattr(attn, "k_norm", None)
        return (attn.k_proj if k_norm is None else k_norm), attn.v_proj
