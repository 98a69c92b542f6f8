"""The structural adapter: what calibra needs to know about a decoder model, read off its module tree.

Families without an explicit adapter (``explicit.ADAPTERS``) are handled by discovery, not by a table:

* **the layer stack** -- the ``nn.ModuleList`` of repeated blocks that each hold Linear-like modules,
  outside any vision/audio tower; among several, the one as long as the text config's
  ``num_hidden_layers`` (the largest by parameters on a tie). Lists nested inside a block (per-layer
  sub-modules) never count;
* **the base** -- the innermost ancestor of the stack whose ``forward`` takes ``input_ids`` (``model.model``,
  ``transformer``, ``gpt_neox``, ``model.decoder``, a vision-language model's ``language_model``): the
  runner calls it to capture the first layer's inputs. Vision and audio towers sit outside it and stay
  dense;
* **the pre-layer modules** -- everything under the base that is neither the stack nor one of its
  ancestors (embeddings, positional and rotary embeddings, the final norm);
* **the Linear-like modules of a block** -- ``nn.Linear`` and GPT-2's transposed ``Conv1D``
  (``models.linear``), except what must stay dense: MoE experts (quantized per expert through the MoE
  blocks below, or kept dense), routers (a ``gate``/``router`` beside an ``experts`` module, or any module
  with one output), and everything that is not Linear-like (norms, state-space parameters, convolutions);
* **the MoE blocks** -- a module with an ``experts`` child that is transformers 5's standard fused experts
  module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, ``act_fn``, called as ``experts(hidden,
  top_k_index, top_k_weights)``) and a router beside it. The routing is not re-implemented: the runner reads
  the tokens and the experts the family's own block chose from the experts' call (DeepSeek's grouped top-k
  with correction biases, PhiMoE's sparse mixer, Jamba's router all arrive as ``top_k_index``), so the
  per-expert statistics, coverage and shrinkage are those of the explicit adapters. Shared experts are
  ordinary Linears of the block. GPT-OSS's experts (transposed, interleaved gate/up, expert biases, a clamped
  activation) and DBRX's (2-D ``w1``/``v1``/``w2`` ``[E*I, H]``) are quantized per expert too, through
  ``compat.transformers.expert_slice``, and so are JetMoE's (the block's own ``input_linear`` /
  ``output_linear``, routed at the block's input by its router's Linear), Aria's (transposed gate/up),
  Nemotron-H's and Ergo's (no gate) and MiniMax-M3's (its own clamped gate). Other expert layouts (Llama 4:
  transposed and called without the routing; ModuleLists; JetMoE's attention experts) stay dense, and
  :meth:`StructuralAdapter.dense_linears` names them with the reason (``tools/moe_coverage.py`` lists them);
* **the final norm** -- the norm-like module of the base named as families name it (``norm``, ``ln_f``,
  ``final_layer_norm``, ...), when nothing else with weights runs between the stack and the head;
  otherwise :meth:`StructuralAdapter.final_norm` raises (a layer-by-layer evaluation refuses then).

Which Linears read the same input (q/k/v, gate/up) is not guessed from names: the runner compares the
input tensors its hooks see (``LayerRunner.input_groups``) and the quantizer solves the groups in that
execution order. The structural adapter names no roles (every Linear is ``"other"``), freezes no
attention block and observes no K/V -- those need a family's semantics, which is what the explicit
adapters are for.
"""

from __future__ import annotations

import inspect

from torch import nn

from calibra.models.adapter import ModelAdapter, MoEBlock
from calibra.models.linear import in_out, is_linear_like

# module-path words of towers that are not the language model (kept dense, never the layer stack)
_TOWER_WORDS = ("vision", "visual", "audio", "image", "speech", "vqmodel", "vq_model", "patch", "img_", "mm_")
# leaf names of routers when they sit beside an ``experts`` module
_ROUTER_NAMES = ("gate", "router", "gating", "wg", "moe_gate", "shared_expert_gate")
# leaf names of the norm after the last decoder layer, across families
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "ln_out")


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(mod).__name__.lower()


# logit transforms calibra.eval.streamed.StreamedLM applies after the head, as the families do
_HANDLED_LOGIT_SETTINGS = ("logit_scale", "final_logit_softcapping", "logits_scaling")


def _unhandled_logit_settings(config) -> list[str]:
    """Config values that change the logits in a family's own forward in a way no generic step repeats
    (Inkling's ``logits_mup_width_multiplier``)."""
    out = []
    for k, v in config.to_dict().items():
        if "logit" in k and "router" not in k and k not in _HANDLED_LOGIT_SETTINGS:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v not in (0, 1):
                out.append(k)
    return out


def _router(block: nn.Module) -> nn.Module | None:
    """The router of an MoE block: its child named as families name routers."""
    for n in _ROUTER_NAMES:
        mod = getattr(block, n, None)
        if isinstance(mod, nn.Module) and n != "shared_expert_gate":
            return mod
    return None


def _has_linear(mod: nn.Module) -> bool:
    return any(is_linear_like(m) for m in mod.modules())


def text_config(config):
    """The language model's config (a vision-language config's ``text_config``; else the config)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, ModuleList)`` of the decoder layer stack (see the module docstring)."""
    cands = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(w in name.lower() for w in _TOWER_WORDS):
            continue
        if all(_has_linear(child) for child in mod):
            cands.append((name, mod))
    cands = [(n, m) for n, m in cands if not any(n.startswith(o + ".") for o, _ in cands if o != n)]
    if not cands:
        raise TypeError(
            f"[models] {type(model).__name__}: no decoder layer stack found (a ModuleList of blocks holding "
            f"Linear layers); calibra cannot compress this model"
        )
    depth = getattr(text_config(model.config), "num_hidden_layers", None)
    pool = [c for c in cands if len(c[1]) == depth] or cands
    return max(pool, key=lambda c: (len(c[1]), sum(p.numel() for p in c[1].parameters())))


def _takes_input_ids(mod: nn.Module) -> bool:
    try:
        return "input_ids" in inspect.signature(mod.forward).parameters
    except (TypeError, ValueError):
        return False


def find_base(model: nn.Module, stack_path: str) -> tuple[str, nn.Module]:
    """``(path, module)``: the innermost ancestor of the stack that takes ``input_ids`` (the model itself
    when no inner one does)."""
    parts = stack_path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:cut])
        mod = model.get_submodule(path)
        if _takes_input_ids(mod):
            return path, mod
    return "", model


class StructuralAdapter(ModelAdapter):
    """A :class:`ModelAdapter` derived from the module tree (see the module docstring)."""

    explicit = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self._stack_path, self._stack = find_layer_stack(model)
        self._base_path, self.base = find_base(model, self._stack_path)

    # -- structure -------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self._stack

    @property
    def layers_prefix(self) -> str:
        return self._stack_path

    def _outside_stack(self) -> list[tuple[str, nn.Module]]:
        """The largest subtrees of the base that are neither the stack nor an ancestor of it, as
        ``(path relative to the base, module)`` in registration order."""
        rel = self._stack_path[len(self._base_path) + 1 :] if self._base_path else self._stack_path
        out = []

        def walk(mod: nn.Module, prefix: str) -> None:
            for name, child in mod.named_children():
                path = f"{prefix}{name}"
                if child is self._stack:
                    continue
                if rel.startswith(path + "."):
                    walk(child, path + ".")
                else:
                    out.append((path, child))

        walk(self.base, "")
        return out

    def pre_layer_modules(self) -> list[nn.Module]:
        return [m for _, m in self._outside_stack()]

    def final_norm(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        norms, others = [], []
        for path, mod in self._outside_stack():
            if mod is head or not any(True for _ in mod.parameters()):
                continue
            leaf = path.rsplit(".", 1)[-1]
            if _is_norm(mod) and leaf in _FINAL_NORM_NAMES:
                norms.append(mod)
            elif not (_is_norm(mod) or isinstance(mod, nn.Embedding) or "emb" in path.lower() or "wte" in leaf):
                others.append(path)
        others += self._between_base_and_head(head)
        others += [f"config.{k}" for k in _unhandled_logit_settings(text_config(self.config))]
        if len(norms) != 1 or others:
            why = (
                f"modules with weights outside the layers besides embeddings and norms: {', '.join(others)}"
                if others
                else f"{len(norms)} candidate final norms"
            )
            raise NotImplementedError(
                f"[models] {type(self.model).__name__}: the step from the last decoder layer to the output head "
                f"is not a single norm ({why}); a layer-by-layer evaluation cannot reproduce it -- evaluate the "
                f"model loaded whole"
            )
        return norms[0]

    def _between_base_and_head(self, head: nn.Module) -> list[str]:
        """Modules with weights outside the base that may run between it and the head (a prediction head's
        dense + norm); towers, projectors and embeddings run before the base and do not count."""
        out = []

        def walk(mod: nn.Module, prefix: str) -> None:
            for name, child in mod.named_children():
                path = f"{prefix}{name}"
                if child is self.base or child is head or not any(True for _ in child.parameters()):
                    continue
                if self._base_path.startswith(path + "."):
                    walk(child, path + ".")
                elif not any(w in path.lower() for w in (*_TOWER_WORDS, "projector", "multi_modal", "emb")):
                    out.append(path)

        walk(self.model, "")
        return out

    @property
    def num_kv_heads(self) -> int:
        c = text_config(self.config)
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = text_config(self.config)
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def attention_kind(self) -> str:
        from calibra.models.adapter import attention_kind

        return attention_kind(text_config(self.config))

    # -- inside a layer ----------------------------------------------------------------------------
    def _expert_modules(self, layer: nn.Module) -> list[tuple[str, nn.Module, nn.Module, str | None]]:
        """``(block path, block, experts, why they stay dense or None)`` for every module of the layer with an
        ``experts`` child."""
        from calibra.compat.transformers import standard_fused_experts_issue

        out = []
        for name, mod in layer.named_modules():
            experts = getattr(mod, "experts", None)
            if not isinstance(experts, nn.Module) or name.endswith("experts"):
                continue
            why = standard_fused_experts_issue(experts)
            if why is None and _router(mod) is None:
                why = f"no router found beside the experts (none of {', '.join(_ROUTER_NAMES)})"
            out.append((name, mod, experts, why))
        return out

    def moe_blocks(self, layer: nn.Module) -> list[MoEBlock]:
        """The layer's MoE blocks whose experts are transformers 5's standard fused experts: quantized per
        expert, with per-expert statistics fed the tokens the family's own routing sends them (read from the
        experts' call, so grouped top-k, correction biases or sparse mixers need no code here). Other
        layouts stay dense (:meth:`dense_linears` names them and why)."""
        from calibra.compat.transformers import fused_expert_count, parallel_experts

        cfg = text_config(self.config)
        blocks = []
        for name, mod in layer.named_modules():
            router = getattr(getattr(mod, "router", None), "layer", None)
            if parallel_experts(mod) and isinstance(router, nn.Linear) and isinstance(mod.router.top_k, int):
                # JetMoE: the block holds its experts and sorts the tokens by expert before calling them, so
                # the runner routes the block's input with the router's Linear: top-k of softmax(logits) is
                # JetMoE's own top-k of the logits
                blocks.append(
                    MoEBlock(
                        name=name,
                        module=mod,
                        router=router,
                        experts=mod,
                        num_experts=fused_expert_count(mod),
                        top_k=mod.router.top_k,
                        fused=True,
                        norm_topk_prob=True,
                        act_fn=mod.activation,
                    )
                )
        for name, mod, experts, why in self._expert_modules(layer):
            if why is not None:
                continue
            router = _router(mod)
            top_k = (
                getattr(router, "top_k", None)
                or getattr(mod, "top_k", None)
                or getattr(cfg, "num_experts_per_tok", None)
                or getattr(cfg, "moe_topk", None)
                or 1
            )
            blocks.append(
                MoEBlock(
                    name=name,
                    module=mod,
                    router=router,
                    experts=experts,
                    num_experts=fused_expert_count(experts),
                    top_k=int(top_k),
                    fused=True,
                    norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", True)),
                    act_fn=getattr(experts, "act_fn", None),
                    routed_at_experts=True,
                )
            )
        return blocks

    def dense_linears(self, layer: nn.Module) -> dict[str, str]:
        """Linear-like modules of a block that stay dense, with the reason (for reports and tests)."""
        out = {}
        for name, mod in layer.named_modules():
            if not is_linear_like(mod):
                continue
            parts = name.split(".")
            parent = layer.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else layer
            if "experts" in parts[:-1]:
                out[name] = "MoE expert"
            elif in_out(mod)[1] == 1:
                out[name] = "scalar gate"
            elif any("router" in p for p in parts) or (hasattr(parent, "experts") and parts[-1] in _ROUTER_NAMES):
                out[name] = "MoE router"
        for name, _, _, why in self._expert_modules(layer):
            if why is not None:
                out[f"{name}.experts"] = f"MoE experts: {why}"
        return out

    def linear_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        dense = self.dense_linears(layer)
        return {n: m for n, m in layer.named_modules() if is_linear_like(m) and n not in dense}

    @staticmethod
    def role(name: str) -> str:
        return "other"

    def attention(self, layer: nn.Module) -> nn.Module:
        raise AttributeError("[models] the structural adapter does not single out an attention block")

    def key_value_sources(self, layer: nn.Module):
        raise NotImplementedError(
            f"[models] {type(self.model).__name__}: K/V observers need an explicit adapter (the family's "
            f"key/value projections and RoPE placement); KV-cache calibration supports "
            f"{', '.join(_explicit_types())}"
        )


def _explicit_types() -> list[str]:
    from calibra.models.explicit import ADAPTERS

    return sorted(ADAPTERS)


__all__ = ["StructuralAdapter", "find_layer_stack", "find_base", "text_config"]
