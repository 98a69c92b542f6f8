"""The compressed KV cache: a transformers ``Cache`` whose layers store K/V projected to rank r.

Transformers API relied on (through :mod:`calibra.compat.transformers`, assumptions 1-3, each tested
there): ``transformers.cache_utils.Cache`` built from a list of per-layer objects
(``Cache(layers=[...])``), and ``DynamicLayer`` -- the growing per-layer cache whose ``keys``/``values``
tensors are ``[batch, kv_heads, seq, last]`` with the sequence in dim -2.
Our layer subclasses it and keeps **the stored form** in ``keys``/``values`` (``last`` = the rank for a
compressed tensor), so the base class's ``get_seq_length``, ``crop``, beam ``reorder_cache`` and batch
selection work on the compressed tensors unchanged. ``update()`` is the one place the attention reads
through: it returns the full ``head_dim`` keys/values reconstructed from everything stored. No private
transformers function is called; RoPE is re-implemented here in the Llama-family convention
(``rotate_half``, ``cos``/``sin`` of ``[batch, seq, head_dim]``) and checked against the model's own
rotary module at run time.

Values: ``store = P_r^T (v - mean)``, ``read = mean + P_r store`` per KV head (``calibra.kv.basis``).

Keys (``targets="kv"``): the bases are computed on **pre-RoPE** keys, where one head's keys share a
low-rank subspace. The attention hands the cache post-RoPE keys, so the cache un-rotates them with the
``cos``/``sin`` the attention used, stores the rank-r coefficients and the tokens' position ids (int32,
one per token and batch row), and on read reconstructs the pre-RoPE keys and rotates them again with the
model's rotary module at the stored positions. The ``cos``/``sin``/``position_ids`` of the current call
reach the cache through a forward pre-hook on every attention module (installed once per model by
:class:`PCACache`; it does nothing unless the call's cache -- ``cache=`` or ``past_key_values=``,
whichever the installed transformers passes -- is a :class:`PCACache`).

Everything the attention sees went through the cache, also the tokens of the current step (the prompt
in a prefill): perplexity measured with this cache and generation with it use the very same path.
"""

from __future__ import annotations

import weakref

import torch

from calibra.compat.transformers import cache_classes, cache_from_call, rope_from_call, rotary_module
from calibra.kv.basis import HeadBases
from calibra.kv.plan import KVArchitectureError, KVPlan

Cache, DynamicLayer, _ = cache_classes()

# model -> hook handles (one pre-hook per attention module); weak, so the model is not kept alive by us
_ROPE_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-family RoPE: ``x [B, H, T, d]``, ``cos``/``sin`` ``[B, T, d]``."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def remove_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`apply_rope`. Per rotated pair RoPE multiplies by ``s * rotation``
    (``s`` = the rotary module's attention scaling, 1 for plain RoPE, folded into cos and sin), so the
    inverse is the transposed rotation divided by ``s^2 = cos^2 + sin^2``."""
    c, s = cos[:, None], sin[:, None]
    return (x * c - _rotate_half(x) * s) / (c * c + s * s)


class _Projector:
    """``encode``: ``[B, H, T, d] -> [B, H, T, r]`` coefficients; ``decode`` back. The arithmetic is done
    in float32 (float64 for float64 inputs); the stored coefficients keep the K/V dtype, so a rank-r
    tensor holds exactly ``r / d`` of the bytes of the uncompressed one."""

    def __init__(self, bases: HeadBases, rank: int):
        self.rank = int(rank)
        self._basis = bases.vectors[:, :, :rank].contiguous()  # [H, d, r]
        self._mean = bases.mean[:, None, :].contiguous()  # [H, 1, d]
        self._placed: dict = {}

    def _on(self, like: torch.Tensor):
        dt = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (like.device, dt)
        if key not in self._placed:
            self._placed[key] = (self._basis.to(like.device, dt), self._mean.to(like.device, dt))
        return self._placed[key]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        P, mu = self._on(x)
        return ((x.to(P.dtype) - mu) @ P).to(x.dtype)

    def decode(self, c: torch.Tensor) -> torch.Tensor:
        P, mu = self._on(c)
        return (c.to(P.dtype) @ P.transpose(-1, -2) + mu).to(c.dtype)


class PCACacheLayer(DynamicLayer):
    """One decoder layer's compressed cache (see the module docstring).

    ``keys``/``values`` hold the stored tensors: ``[B, H, T, rank]`` coefficients for a compressed one,
    the plain ``[B, H, T, head_dim]`` states otherwise; ``positions [B, T]`` int32 when keys are compressed.
    """

    is_compileable = False

    def __init__(self, k: _Projector | None, v: _Projector | None, rotary=None, index: int = 0):
        super().__init__()
        self.k, self.v, self.rotary, self.index = k, v, rotary, index
        self.positions: torch.Tensor | None = None
        self._rope = None  # (position_ids, cos, sin) of the call in flight, set by the attention pre-hook

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H = key_states.shape[:2]
        rk = self.k.rank if self.k is not None else key_states.shape[-1]
        rv = self.v.rank if self.v is not None else value_states.shape[-1]
        self.keys = key_states.new_empty(B, H, 0, rk)
        self.values = value_states.new_empty(B, value_states.shape[1], 0, rv)
        if self.k is not None:
            self.positions = torch.empty(B, 0, dtype=torch.int32, device=key_states.device)
        self.is_initialized = True

    def _take_rope(self, key_states: torch.Tensor):
        rope, self._rope = self._rope, None
        if rope is None or rope[0] is None:
            raise RuntimeError(
                f"[kv] layer {self.index}: the positions of the new keys did not reach the compressed cache. Key "
                "compression needs the attention pre-hook that PCACache(model, ...) installs on that model; build "
                "the cache with the model it is used with"
            )
        pos, cos, sin = rope
        B, T = key_states.shape[0], key_states.shape[-2]
        pos = pos.to(key_states.device)
        pos = (pos[None] if pos.dim() == 1 else pos).expand(B, T)
        ref_cos, ref_sin = self.rotary(key_states, pos.long())
        if cos is None:
            cos, sin = ref_cos, ref_sin
        if cos.shape[-1] != key_states.shape[-1]:
            raise KVArchitectureError(
                f"[kv] layer {self.index}: RoPE covers {cos.shape[-1]} of {key_states.shape[-1]} "
                "key dims (partial rotary); key compression supports full-width RoPE only -- "
                "use targets='v'"
            )
        # The cache re-rotates stored keys with the rotary module at the stored positions; that must be
        # the rotation the attention applied, or the reconstructed keys would be wrong.
        if not torch.allclose(cos.float().expand_as(ref_cos), ref_cos.float(), atol=1e-3, rtol=1e-3):
            raise KVArchitectureError(
                f"[kv] layer {self.index}: the attention's RoPE tables differ from the model's "
                "rotary module at the same positions (a per-layer RoPE variant); key "
                "compression cannot re-apply it -- use targets='v'"
            )
        return pos, cos.expand_as(ref_cos), sin.expand_as(ref_sin)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.k is not None:
            pos, cos, sin = self._take_rope(key_states)
            pre = remove_rope(key_states.float(), cos.float(), sin.float()).to(key_states.dtype)
            k_store = self.k.encode(pre)
            self.positions = torch.cat([self.positions, pos.to(torch.int32)], dim=-1)
        else:
            k_store = key_states
        v_store = self.v.encode(value_states) if self.v is not None else value_states
        self.keys = torch.cat([self.keys, k_store], dim=-2)
        self.values = torch.cat([self.values, v_store], dim=-2)
        return self.read()

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full ``head_dim`` keys and values reconstructed from everything stored."""
        if self.k is not None:
            pre = self.k.decode(self.keys)
            cos, sin = self.rotary(pre, self.positions.long())
            keys = apply_rope(pre.float(), cos.float(), sin.float()).to(pre.dtype)
        else:
            keys = self.keys
        values = self.v.decode(self.values) if self.v is not None else self.values
        return keys, values

    def stored_bytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"k": 0, "v": 0, "positions": 0}
        pos = self.positions.nbytes if self.positions is not None else 0
        return {"k": self.keys.nbytes, "v": self.values.nbytes, "positions": pos}

    # positions follow the stored keys through every sequence/batch edit of the base class
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.positions is not None and tokens_to_remove < 0:
            self.positions = self.positions[:, :tokens_to_remove]

    def reset(self) -> None:
        super().reset()
        self.positions = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.positions.shape[-1]:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None and self.positions.shape[-1]:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None and self.positions.shape[-1]:
            self.positions = self.positions[indices]


def _install_rope_capture(model, adapter) -> None:
    """One forward pre-hook per attention module that hands the call's ``position_ids`` and
    ``position_embeddings`` (cos, sin) to a :class:`PCACache` passed as the call's cache."""
    if model in _ROPE_HOOKS:
        return
    handles = []
    for i, layer in enumerate(adapter.layers):
        attn = adapter.attention(layer)

        def pre_hook(module, args, kwargs, i=i):
            cache = cache_from_call(kwargs)
            if isinstance(cache, PCACache):
                idx = getattr(module, "layer_idx", i)
                cache.layers[idx]._rope = rope_from_call(kwargs)
            return None

        handles.append(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
    _ROPE_HOOKS[model] = handles


def remove_rope_capture(model) -> None:
    """Remove the attention pre-hooks :class:`PCACache` installed on ``model`` (they are inert otherwise)."""
    for h in _ROPE_HOOKS.pop(model, []):
        h.remove()


class PCACache(Cache):
    """A transformers ``Cache`` storing V (and K for ``targets="kv"``) projected to per-layer ranks.

    ``PCACache(model, plan)``: ``plan`` is a :class:`~calibra.kv.plan.KVPlan` or a
    :class:`~calibra.kv.preset.KVPreset`. Use one cache per generation, like a ``DynamicCache``::

        out = KVCompressedLM(model, preset).generate(ids, max_new_tokens=32)

    (``KVCompressedLM.generate`` passes the cache under the keyword the installed transformers takes.)

    Checks the plan against the model (layers, KV heads, head_dim, attention kind) before anything runs.
    A tensor whose rank equals ``head_dim`` is stored as is (it would save nothing); pass
    ``project_full_rank=True`` to send it through the projection anyway.
    """

    def __init__(self, model, plan, *, project_full_rank: bool = False):
        from calibra.models import get_adapter

        plan = plan.plan if hasattr(plan, "plan") and not isinstance(plan, KVPlan) else plan
        adapter = get_adapter(model)
        plan.check_model(adapter)
        rotary = None
        if "k" in plan.bases:
            rotary = rotary_module(adapter.base)
            if rotary is None:
                raise KVArchitectureError(
                    "[kv] key compression re-applies RoPE with the model's rotary module "
                    "(model.model.rotary_emb), which this model lacks; use targets='v'"
                )

        def projector(which, i):
            # at rank == head_dim nothing is saved: store the plain tensor (exact, no position ids) unless
            # the full-rank projection itself is wanted (the tests check it reproduces the model)
            if which not in plan.bases:
                return None
            b, r = plan.bases[which][i], plan.ranks[which][i]
            return _Projector(b, r) if (r < b.head_dim or project_full_rank) else None

        layers = [PCACacheLayer(projector("k", i), projector("v", i), rotary, index=i) for i in range(plan.num_layers)]
        super().__init__(layers=layers)
        self.plan = plan
        if any(layer.k is not None for layer in layers):
            _install_rope_capture(model, adapter)

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of the tensors the cache holds now, summed over layers: ``k``, ``v``, ``positions``."""
        out = {"k": 0, "v": 0, "positions": 0}
        for layer in self.layers:
            for key, n in layer.stored_bytes().items():
                out[key] += n
        return out
