"""Every place calibra relies on a transformers internal, in one module.

calibra is written against transformers 5 (``>=5.6,<6``, see pyproject.toml; docs/compatibility.md
says what breaks below 5.6). The public API
(``AutoModelForCausalLM``, ``AutoConfig``, ``from_pretrained``) is used directly by the verbs; what is
*not* a stable, documented API goes through here, so that a change between minor releases is fixed in
one place. Each assumption has a test in ``tests/compat/test_transformers_compat.py`` that builds tiny
random models from transformers' own config classes and checks the assumption itself, so a new
transformers release that breaks one fails that test by name rather than a KV or export test far away.

The assumptions:

1. **The cache keyword.** Models, decoder layers and attention modules take the KV cache as ``cache=``
   from 5.25 on (``past_key_values`` is a deprecated alias there, removed in 5.40) and as
   ``past_key_values=`` before. :func:`cache_kwarg` names the one the installed model's ``forward``
   declares; :func:`cache_from_call` finds the cache in a module call's keyword arguments under either
   name (a forward pre-hook sees the keywords as the caller passed them, before any renaming).
2. **The cache classes.** ``transformers.cache_utils.Cache`` is built from a list of per-layer objects
   (``Cache(layers=[...])``) and ``DynamicLayer`` keeps ``keys``/``values`` as ``[batch, kv_heads, seq,
   head_dim]`` with the sequence in dim -2; ``Cache.update(k, v, layer_idx, ...)`` is the one call
   through which attention writes and reads.
3. **RoPE reaches the attention as ``position_embeddings=(cos, sin)``**, computed once per forward by
   ``model.model.rotary_emb(x, position_ids)`` with ``cos``/``sin`` of shape ``[batch, seq, head_dim]``.
4. **Save-time renaming** (``transformers.core_model_loading.revert_weight_conversion``): transformers 5
   fuses some tensors in memory (MoE experts) and saves them under their on-disk names; a fused expert
   tensor is saved as runs of consecutive rows of one expert (:func:`fused_expert_layout`).
5. **MoE routers** return either ``(logits, scores, top_k_index)`` (the 5.x ``TopKRouter`` modules;
   raw logits from 5.6 on -- before, the first element was already soft-maxed) or plain logits (an
   ``nn.Linear`` gate, soft-maxed and top-k'd by the caller).
6. **Fused experts** hold ``gate_up_proj [E, 2*I, H]`` (gate rows first, then up) and
   ``down_proj [E, H, I]`` as 3-D parameters, with the activation in ``act_fn``; the MoE block calls
   them as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` with the routing
   it chose (:func:`standard_fused_experts_issue` says when a module is not of that kind). GPT-OSS's
   experts are the one other fused layout calibra quantizes per expert (:func:`transposed_experts`:
   ``[E, H, 2I]`` applied as ``x @ W``, interleaved gate/up, biases); every consumer of an expert's weight
   goes through :func:`expert_slice` / :func:`store_expert_slice` / :func:`expert_down_input`. DBRX's
   experts (:func:`stacked_glu_experts`: 2-D ``w1``/``v1``/``w2`` ``[E*I, H]`` viewed per expert, ``w2``
   applied transposed) and JetMoE's (:func:`parallel_experts`: the block's own ``input_linear`` /
   ``output_linear`` 3-D weights) are quantized per expert through the same functions, and so are Aria's
   (:func:`transposed_glu_experts`: ``[E, H, 2I]`` applied as ``x @ W``, gate columns then up columns),
   Nemotron-H's and Ergo's (:func:`ungated_experts`: ``up_proj`` / ``down_proj`` and no gate, Ergo's
   transposed) and MiniMax-M3's (the standard layout with its own clamped ``_apply_gate`` instead of an
   ``act_fn``). The orientation of a transposed layout is transformers' own ``is_transposed`` flag (set by
   its ``use_experts_implementation`` decorator), since the shapes cannot tell it when ``H == 2I``.
7. **Modules swapped on a quantized load** (``transformers.quantizers.base.MODULES_TO_PATCH_FOR_QUANTIZATION``):
   loading a compressed-tensors checkpoint, transformers replaces Llama 4's fused ``Llama4TextExperts``
   with a ModuleList of per-expert ``Llama4TextMLP`` Linears before it reads the weights
   (:func:`swapped_on_quantized_load`), so such a checkpoint stores those experts per expert.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# The keyword names a module call may carry the KV cache under: the current one first.
CACHE_KWARGS = ("cache", "past_key_values")


# -- 1. the cache keyword -------------------------------------------------------------------------------
def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes the KV cache under: ``"cache"`` (transformers >= 5.25) or
    ``"past_key_values"`` (older 5.x). ``inspect.signature`` follows the ``deprecate_kwarg`` wrapper to
    the real signature."""
    params = inspect.signature(model.forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise TypeError(
        f"[compat] {type(model).__name__}.forward takes none of the KV-cache keywords "
        f"{CACHE_KWARGS}; this transformers version is not supported"
    )


def with_cache(model, cache, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``kwargs`` with ``cache`` passed under the keyword ``model.forward`` declares (any cache passed
    under the other name is replaced)."""
    out = {k: v for k, v in (kwargs or {}).items() if k not in CACHE_KWARGS}
    out[cache_kwarg(model)] = cache
    return out


def cache_from_call(kwargs: dict[str, Any]):
    """The KV cache of a module call (a forward pre-hook's ``kwargs``), under whichever name the caller
    used; ``None`` when the call carries none."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def given_cache(kwargs: dict[str, Any]):
    """Pop the cache a user passed to one of calibra's wrappers under either name (``None`` if none)."""
    found = None
    for name in CACHE_KWARGS:
        cache = kwargs.pop(name, None)
        if cache is not None:
            found = cache
    return found


def drop_cache_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A decoder layer's captured call keywords without the cache (replayed calls never cache)."""
    return {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}


# -- 2. the cache classes ---------------------------------------------------------------------------------
def cache_classes():
    """``(Cache, DynamicLayer, DynamicCache)`` from ``transformers.cache_utils``."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    return Cache, DynamicLayer, DynamicCache


def dynamic_cache(model):
    """An empty ``DynamicCache`` for ``model`` (the dense cache KV measurements compare against)."""
    _, _, DynamicCache = cache_classes()
    return DynamicCache(config=model.config)


# -- 3. RoPE -----------------------------------------------------------------------------------------------
def rotary_module(base_model):
    """The rotary-embedding module of a decoder stack (``model.model``), or ``None`` when the model has
    none there (no RoPE, or per-layer rotary modules)."""
    return getattr(base_model, "rotary_emb", None)


def rope_from_call(kwargs: dict[str, Any]):
    """``(position_ids, cos, sin)`` an attention call received (``None`` for what is missing)."""
    pe = kwargs.get("position_embeddings")
    cos, sin = pe if pe is not None else (None, None)
    return kwargs.get("position_ids"), cos, sin


# -- 4. save-time renaming ----------------------------------------------------------------------------------
def saved_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (in-memory names) renamed and split as ``save_pretrained`` would write it to disk."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, state))


def disk_name(model, name: str, shape: tuple[int, ...] = (1,)) -> str | None:
    """The on-disk key of the in-memory tensor ``name`` when ``save_pretrained`` writes it whole under one
    name (a rename, e.g. Mixtral's ``mlp.`` -> ``block_sparse_moe.``); None when it is split."""
    out = saved_state(model, {name: torch.empty(shape, device="meta")})
    return next(iter(out)) if len(out) == 1 else None


def fused_expert_layout(model, key: str) -> dict[int, list[tuple[str, int, int]]]:
    """``{expert: [(on-disk module, first row, end row), ...]}``: where ``save_pretrained`` writes each
    expert of the fused parameter ``key`` ``[E, R, C]`` (e.g. ``experts.gate_up_proj`` -> ``experts.<e>.w1``
    rows ``0:I`` and ``.w3`` rows ``I:2I``). Learned from the save-time conversion itself, run on a probe
    ``[E, R, 2]`` holding ``e * R + r`` in both columns (exact in float64, E * R numbers whatever the width;
    two columns, not one: transformers 5.6's conversion squeezes a trailing dimension of size 1); ValueError
    when a piece is not a run of consecutive rows of one expert (a transposing or interleaving layout)."""
    n_exp, rows = model.get_parameter(key).shape[:2]
    probe = torch.arange(n_exp * rows, dtype=torch.float64).reshape(n_exp, rows, 1).expand(n_exp, rows, 2).clone()
    out: dict[int, list[tuple[str, int, int]]] = {}
    for disk_key, t in saved_state(model, {key: probe}).items():
        ok = disk_key.endswith(".weight") and t.dim() == 2 and t.shape[1] == 2 and t.shape[0] >= 1
        if ok:
            first = int(t[0, 0])
            e, r0 = divmod(first, rows)
            ok = torch.equal(t[:, 0].long(), torch.arange(first, first + t.shape[0])) and r0 + t.shape[0] <= rows
        if not ok and t.dim() == 3 and t.shape[:2] == (n_exp, rows):
            raise ValueError(
                f"transformers saves the fused experts {key} whole, as {disk_key} (the checkpoint holds no "
                f"per-expert Linears, and transformers' loader reads the experts only so)"
            )
        if not ok:
            raise ValueError(
                f"transformers saves the fused experts {key} as {disk_key} {tuple(t.shape)}, which is not a run "
                f"of rows of one expert"
            )
        out.setdefault(e, []).append((disk_key[: -len(".weight")], r0, r0 + t.shape[0]))
    for e in range(n_exp):
        spans = sorted((a, b) for _, a, b in out.get(e, []))
        if sum(b - a for a, b in spans) != rows or any(b != a2 for (_, b), (a2, _) in zip(spans, spans[1:])):
            raise ValueError(f"transformers' save-time conversion of {key} does not split expert {e} into rows {spans}")
    return out


# -- 5. routers ---------------------------------------------------------------------------------------------
def router_probs_and_topk(out, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs [n, E] float32, top_k index [n, k] int64)`` from a router module's output: a 5.x
    ``TopKRouter`` returns ``(logits, scores, index)`` and has chosen the experts itself; a plain
    ``nn.Linear`` gate returns logits, soft-maxed and top-k'd here as those models do."""
    if isinstance(out, tuple):
        logits, _, index = out
        return torch.softmax(logits.float(), dim=-1), index
    probs = torch.softmax(out.float(), dim=-1)
    return probs, torch.topk(probs, top_k, dim=-1).indices


# -- 6. fused experts ---------------------------------------------------------------------------------------
def is_fused_experts(experts) -> bool:
    """Whether an ``experts`` module holds all experts as 3-D ``gate_up_proj``/``down_proj`` tensors."""
    return isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)


def transposed_experts(experts) -> bool:
    """GPT-OSS's layout: ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]`` applied as ``x @ W`` (each
    expert's Linear weight transposed), gate and up columns interleaved (``[..., ::2]`` / ``[..., 1::2]``),
    per-expert biases ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias [E, H]`` and the family's own
    clamped gate ``_apply_gate``. Explicit because the orientation cannot be told from the shapes alone."""
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    gb, db = getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None)
    if not all(isinstance(t, torch.Tensor) for t in (gu, down, gb, db)):
        return False
    if not callable(getattr(experts, "_apply_gate", None)):
        return False
    if gu.dim() != 3 or down.dim() != 3:
        return False
    e, h, two_i = gu.shape
    return tuple(down.shape) == (e, two_i // 2, h) and tuple(gb.shape) == (e, two_i) and tuple(db.shape) == (e, h)


def stacked_glu_experts(experts) -> bool:
    """DBRX's layout: ``experts.mlp`` holds ``w1`` (gate), ``v1`` (up) and ``w2`` (down, stored transposed:
    applied as ``h @ w2``) as 2-D ``[E*I, H]`` parameters, expert ``e`` in rows ``e*I:(e+1)*I``
    (``experts.num_experts`` / ``ffn_hidden_size``), its activation in ``mlp.activation_fn``. Explicit
    because nothing in the shapes says where one expert ends or that ``w2`` is transposed."""
    mlp = getattr(experts, "mlp", None)
    ws = [getattr(mlp, n, None) for n in ("w1", "v1", "w2")]
    n_exp, inter = getattr(experts, "num_experts", None), getattr(experts, "ffn_hidden_size", None)
    if not (isinstance(n_exp, int) and isinstance(inter, int) and callable(getattr(mlp, "activation_fn", None))):
        return False
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in ws):
        return False
    return all(tuple(t.shape) == (n_exp * inter, ws[0].shape[1]) for t in ws)


def parallel_experts(block) -> bool:
    """JetMoE's MoE block: it holds its experts itself, as ``input_linear.weight [E, 2I, H]`` (gate rows then
    up rows) and ``output_linear.weight [E, H, I]`` (``JetMoeParallelExperts``, called with the tokens sorted
    by expert and the per-expert counts), its activation in ``activation``, routed by ``router.layer``'s
    top-k. Calibra addresses these experts as ``<block>.experts`` (:func:`experts_module`). JetMoE's
    mixture-of-attention block (no ``activation``, query/output projections as experts) is not one."""
    wi = getattr(getattr(block, "input_linear", None), "weight", None)
    wo = getattr(getattr(block, "output_linear", None), "weight", None)
    if not (isinstance(wi, torch.Tensor) and isinstance(wo, torch.Tensor) and wi.dim() == 3 and wo.dim() == 3):
        return False
    if not callable(getattr(block, "activation", None)):
        return False
    e, two_i, h = wi.shape
    return two_i % 2 == 0 and tuple(wo.shape) == (e, h, two_i // 2)


def _flagged_transposed(experts) -> bool:
    """transformers' own record that ``experts`` holds ``[E, in, out]`` weights applied as ``x @ W``
    (``use_experts_implementation(is_transposed=True)``; 5.6 and later)."""
    return getattr(experts, "is_transposed", False) is True


def transposed_glu_experts(experts) -> bool:
    """Aria's layout: ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]`` applied as ``x @ W`` (each
    expert's Linear weight transposed) with the gate columns first, then the up columns (not interleaved as
    GPT-OSS's), an ``act_fn``, no biases. Explicit because only transformers' ``is_transposed`` flag tells
    it from the standard ``[E, 2I, H]`` layout (the same shapes when ``H == 2I``). Llama 4's experts have
    the same tensors but are called without the routing (:func:`standard_fused_experts_issue` refuses them)."""
    if transposed_experts(experts) or not _flagged_transposed(experts):
        return False
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3):
        return False
    e, h, two_i = gu.shape
    return two_i % 2 == 0 and tuple(down.shape) == (e, two_i // 2, h) and callable(getattr(experts, "act_fn", None))


def ungated_experts(experts) -> bool:
    """Nemotron-H's and Ergo's layout: no gate projection, each expert computes ``act(x W_up^T) W_down^T``
    from ``up_proj [E, I, H]`` / ``down_proj [E, H, I]`` (Ergo: ``[E, H, I]`` / ``[E, I, H]`` applied as
    ``x @ W``, flagged ``is_transposed``) with an ``act_fn`` (transformers' ``has_gate=False``). Explicit
    because calibra names an expert's input projection ``gate_up_proj`` everywhere (statistics, folders,
    exports): here that name stands for ``up_proj`` (:func:`expert_params`). Ergo's per-expert norm after
    the down projection (``post_expert_norm``) stays dense; it does not change the down projection's input."""
    up, down = getattr(experts, "up_proj", None), getattr(experts, "down_proj", None)
    if getattr(experts, "has_gate", None) is not False or isinstance(
        getattr(experts, "gate_up_proj", None), torch.Tensor
    ):
        return False
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3):
        return False
    if not callable(getattr(experts, "act_fn", None)):
        return False
    e, a, b = up.shape  # [E, I, H], or [E, H, I] transposed
    return tuple(down.shape) == (e, b, a)


def _own_apply_gate(experts):
    """The experts class's own gate function (MiniMax-M3's clamped ``(up + 1) * gate * sigmoid(alpha gate)``
    on ``x W_gate_up^T``, gate columns first), or None: transformers' decorator also installs a default one
    that reads ``act_fn``, which is not the class's own."""
    fn = getattr(type(experts), "_apply_gate", None)
    if not callable(fn) or getattr(fn, "__name__", "") == "_default_apply_gate":
        return None
    return experts._apply_gate


def expert_weights_transposed(experts) -> bool:
    """Whether ``experts`` applies its weights as ``x @ W`` (GPT-OSS, Aria, Ergo): not through
    ``F.linear``, so a hook on ``F.linear`` sees none of its projections."""
    return transposed_experts(experts) or _flagged_transposed(experts)


def holds_fused_experts(experts) -> bool:
    """Whether ``experts`` holds its experts as 3-D parameters of a layout calibra quantizes per expert,
    gated (:func:`is_fused_experts`) or not (:func:`ungated_experts`)."""
    return is_fused_experts(experts) or ungated_experts(experts)


def experts_module(model, path: str):
    """The module that holds the experts calibra names ``<path>.<e>.<proj>`` (``path`` ends in ``.experts``):
    that submodule, or a :func:`parallel_experts` block (JetMoE) that holds its experts itself."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        parent = model.get_submodule(path.rpartition(".")[0])
        if path.endswith(".experts") and parallel_experts(parent):
            return parent
        raise


def _param(experts, name: str, params: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The parameter ``name`` (relative to ``experts``, as :func:`expert_params` names it), or its stand-in
    in ``params`` (a reader assembling the parameter outside the module, e.g. from a quantized folder)."""
    return experts.get_parameter(name).data if params is None else params[name]


def _stacked_rows(experts, name: str, e: int, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    inter = experts.ffn_hidden_size
    return _param(experts, f"mlp.{name}", params)[e * inter : (e + 1) * inter]


def fused_expert_count(experts) -> int:
    """How many experts a fused experts module holds (any layout calibra quantizes per expert)."""
    if stacked_glu_experts(experts):
        return int(experts.num_experts)
    if parallel_experts(experts):
        return int(experts.input_linear.weight.shape[0])
    if ungated_experts(experts):
        return int(experts.up_proj.shape[0])
    return int(experts.gate_up_proj.shape[0])


def expert_params(experts, proj: str) -> list[str]:
    """The parameters (relative to ``experts``) that expert slices of ``proj`` live in: ``[proj]``, or
    DBRX's ``mlp.w1`` + ``mlp.v1`` (gate_up) / ``mlp.w2`` (down)."""
    if stacked_glu_experts(experts):
        return ["mlp.w1", "mlp.v1"] if proj == "gate_up_proj" else ["mlp.w2"]
    if parallel_experts(experts):
        return ["input_linear.weight" if proj == "gate_up_proj" else "output_linear.weight"]
    if ungated_experts(experts) and proj == "gate_up_proj":
        return ["up_proj"]
    return [proj]


def expert_slice(experts, proj: str, e: int, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Expert ``e``'s ``proj`` (``gate_up_proj`` / ``down_proj``) as a Linear weight ``[out, in]`` (a view:
    transposed for the ``x @ W`` layouts; for :func:`stacked_glu_experts` the gate_up weight is a copy,
    gate rows then up rows, since they live in two parameters -- write it back with :func:`store_expert_slice`).
    ``params``: stand-ins for the parameters, keyed as :func:`expert_params` names them (``experts`` may then
    be a weightless module: only its layout is read)."""
    if stacked_glu_experts(experts):
        if proj == "gate_up_proj":
            return torch.cat([_stacked_rows(experts, "w1", e, params), _stacked_rows(experts, "v1", e, params)])
        return _stacked_rows(experts, "w2", e, params).t()
    (name,) = expert_params(experts, proj)
    w = _param(experts, name, params)[e]
    return w.t() if expert_weights_transposed(experts) else w


def store_expert_slice(
    experts, proj: str, e: int, w: torch.Tensor, params: dict[str, torch.Tensor] | None = None
) -> None:
    """Write a ``[out, in]`` weight back into expert ``e``'s ``proj`` in place (into ``params``' stand-ins
    when given, see :func:`expert_slice`)."""
    if stacked_glu_experts(experts) and proj == "gate_up_proj":
        inter = experts.ffn_hidden_size
        _stacked_rows(experts, "w1", e, params).copy_(w[:inter])
        _stacked_rows(experts, "v1", e, params).copy_(w[inter:])
        return
    expert_slice(experts, proj, e, params).copy_(w)


def fused_expert_weights(experts, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_gate [I, H], W_up [I, H], W_down [H, I])`` of expert ``e`` of a fused experts module
    (views, no copies; GPT-OSS's interleaved gate/up columns taken apart; ``W_gate`` is None for
    :func:`ungated_experts`)."""
    if stacked_glu_experts(experts):
        return _stacked_rows(experts, "w1", e), _stacked_rows(experts, "v1", e), _stacked_rows(experts, "w2", e).t()
    if parallel_experts(experts):
        gate, up = experts.input_linear.weight[e].chunk(2, dim=0)
        return gate, up, experts.output_linear.weight[e]
    if transposed_experts(experts):
        gu = experts.gate_up_proj[e]
        return gu[:, ::2].t(), gu[:, 1::2].t(), experts.down_proj[e].t()
    if ungated_experts(experts):
        return None, expert_slice(experts, "gate_up_proj", e), expert_slice(experts, "down_proj", e)
    if transposed_glu_experts(experts):
        gate, up = experts.gate_up_proj[e].t().chunk(2, dim=0)
        return gate, up, experts.down_proj[e].t()
    gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
    return gate, up, experts.down_proj[e]


def expert_down_input(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """The input of expert ``e``'s down projection for its routed tokens ``x [n, H]``, computed as the
    experts module computes it (GPT-OSS: its biased, clamped gate; otherwise ``act(x W_g^T) * (x W_u^T)``)."""
    if transposed_experts(experts):
        return experts._apply_gate(x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e])
    if ungated_experts(experts):
        return experts.act_fn(torch.nn.functional.linear(x, expert_slice(experts, "gate_up_proj", e)))
    own_gate = None if callable(getattr(experts, "act_fn", None)) else _own_apply_gate(experts)
    if own_gate is not None and is_fused_experts(experts):
        return own_gate(torch.nn.functional.linear(x, expert_slice(experts, "gate_up_proj", e)))
    gate, up, _ = fused_expert_weights(experts, e)
    if stacked_glu_experts(experts):
        return experts.mlp.activation_fn(x @ gate.T) * (x @ up.T)
    if parallel_experts(experts):
        return experts.activation(torch.nn.functional.linear(x, gate)) * torch.nn.functional.linear(x, up)
    return experts.act_fn(torch.nn.functional.linear(x, gate)) * torch.nn.functional.linear(x, up)


# the call of a fused experts module: (hidden states, chosen experts, their weights) -- transformers 5's
# standard names, and GPT-OSS's
_EXPERTS_CALLS = (
    ("hidden_states", "top_k_index", "top_k_weights"),
    ("hidden_states", "router_indices", "routing_weights"),
)
_EXPERTS_CALL = _EXPERTS_CALLS[0]


def _call_names(experts) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(experts.forward).parameters)[:3]
    except (TypeError, ValueError):
        return ()


def standard_fused_experts_issue(experts) -> str | None:
    """None when calibra quantizes ``experts`` per expert: transformers 5's standard fused experts module
    (assumption 6: the two 3-D parameters and nothing else, gate rows then up rows, ``act_fn``, called with
    the block's routing; or, instead of the ``act_fn``, the class's own ``_apply_gate``: MiniMax-M3) or
    GPT-OSS's (:func:`transposed_experts`, its biases kept dense), Aria's (:func:`transposed_glu_experts`),
    Nemotron-H's and Ergo's (:func:`ungated_experts`); otherwise why not (Llama 4: transposed and called
    without the routing). DBRX's :func:`stacked_glu_experts` too."""
    if stacked_glu_experts(experts):
        params = _call_names(experts)
        if params != _EXPERTS_CALL:
            return f"experts are called as ({', '.join(params)}), not with the block's ({', '.join(_EXPERTS_CALL)})"
        return None
    params = _call_names(experts)
    if ungated_experts(experts):
        # Ergo's per-expert norm runs after the down projection: dense, and not part of any expert's input
        extra = sorted(
            n for n, _ in experts.named_parameters() if n not in ("up_proj", "down_proj", "post_expert_norm.weight")
        )
        if extra:
            return f"experts carry parameters beyond up_proj / down_proj ({', '.join(extra)})"
        if params != _EXPERTS_CALL:
            return f"experts are called as ({', '.join(params)}), not with the block's ({', '.join(_EXPERTS_CALL)})"
        return None
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3):
        return "experts are not fused as 3-D gate_up_proj / down_proj parameters"
    if transposed_experts(experts):
        if params != _EXPERTS_CALLS[1]:
            return f"experts are called as ({', '.join(params)}), not with the block's ({', '.join(_EXPERTS_CALLS[1])})"
        return None
    extra = sorted(n for n, _ in experts.named_parameters() if n not in ("gate_up_proj", "down_proj"))
    if extra:
        return f"experts carry parameters beyond gate_up_proj / down_proj ({', '.join(extra)})"
    if params != _EXPERTS_CALL:
        # Llama 4: the block hands every expert every token, pre-scaled by its router score, and no routing:
        # which tokens an expert serves is not in the call (and its checkpoint keeps the experts whole)
        return f"experts are called as ({', '.join(params)}), not with the block's ({', '.join(_EXPERTS_CALL)})"
    if transposed_glu_experts(experts):
        return None
    e, two_i, h = gu.shape
    if down.shape[0] != e or down.shape[1] != h or two_i != 2 * down.shape[2]:
        return (
            f"fused expert shapes gate_up_proj {tuple(gu.shape)} / down_proj {tuple(down.shape)} are not "
            f"[E, 2I, H] / [E, H, I]"
        )
    if _flagged_transposed(experts):
        return "experts are flagged transposed (x @ W) with [E, 2I, H] / [E, H, I] shapes"
    if not callable(getattr(experts, "act_fn", None)) and _own_apply_gate(experts) is None:
        return "experts have neither an act_fn nor their own _apply_gate"
    return None


def experts_call_routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states [T, H], top_k_index [T, k])`` of one call of a fused experts module (either naming
    of :data:`_EXPERTS_CALLS`, positional or by keyword)."""
    vals = dict(zip(range(3), args))
    for names in _EXPERTS_CALLS:
        vals.update({names.index(k): v for k, v in kwargs.items() if k in names})
    x = vals[0]
    x2 = x.reshape(-1, x.shape[-1])
    return x2, vals[1].reshape(x2.shape[0], -1)


# -- 7. modules swapped on a quantized load -------------------------------------------------------------------
def swapped_on_quantized_load(model, quant_method: str = "compressed-tensors") -> list[str]:
    """Paths of the modules transformers replaces before reading a ``quant_method`` checkpoint (its
    ``MODULES_TO_PATCH_FOR_QUANTIZATION``; a transformers without that table swaps nothing). Only swaps
    calibra can write the replacement's tensors for are listed (:func:`per_expert_tensors`); another is
    a ValueError naming it, so an export never writes what the loader would not fill."""
    try:
        from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION as table
    except ImportError:
        return []
    out = []
    for path, mod in model.named_modules():
        entry = table.get(type(mod).__name__)
        methods = [str(getattr(m, "value", m)) for m in (entry or {}).get("quantization_methods", ())]
        if quant_method not in methods:
            continue
        if type(mod).__name__ not in _PER_EXPERT:
            raise ValueError(
                f"transformers replaces {path} ({type(mod).__name__}) by {entry['module_name'].__name__} when it "
                f"loads a {quant_method} checkpoint, a layout calibra does not write"
            )
        out.append(path)
    return out


def _llama4_per_expert(experts) -> dict[str, torch.Tensor]:
    # Llama 4 holds its experts transposed (x @ W): gate_up_proj [E, H, 2I] with the gate columns first,
    # down_proj [E, I, H]; the replacement's Llama4TextMLP holds nn.Linear weights [out, in].
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    inter = down.shape[1]
    out = {}
    for e in range(gate_up.shape[0]):
        out[f"{e}.gate_proj.weight"] = gate_up[e, :, :inter].t().contiguous()
        out[f"{e}.up_proj.weight"] = gate_up[e, :, inter:].t().contiguous()
        out[f"{e}.down_proj.weight"] = down[e].t().contiguous()
    return out


# The replacement's tensors, relative to the swapped module, per swapped class (explicit: each family's
# fused layout is its own, and no save-time conversion of transformers describes it).
_PER_EXPERT = {"Llama4TextExperts": _llama4_per_expert}


def per_expert_tensors(module) -> dict[str, torch.Tensor]:
    """The dense tensors of the per-expert replacement of a swapped experts module
    (:func:`swapped_on_quantized_load`), keyed relative to the module (``<e>.gate_proj.weight``)."""
    return _PER_EXPERT[type(module).__name__](module)
