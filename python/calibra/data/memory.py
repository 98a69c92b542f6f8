"""How much memory a layer-by-layer calibration run needs, estimated from the model config alone
(before any weight is loaded), printed before a run.

The runner holds one decoder layer on the device at a time; all samples' hidden states wait on the
host between layers. So the device peak is one layer's weights + the activations of one batch
through it + that layer's observer state (Hessians: in_features^2 per observed Linear) + the
solver's workspace (a copy of the largest Hessian for its Cholesky inverse). The estimate is an
upper bound: it counts every intermediate of the layer as live at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibra.data.config import CalibrationConfig, model_max_positions

__all__ = ["MemoryEstimate", "estimate_memory", "format_bytes", "OBSERVERS"]

OBSERVERS = ("hessian", "norms", "ranges", "kv", "routing")


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class MemoryEstimate:
    """All sizes in bytes."""

    model: str
    num_layers: int
    hidden_size: int
    num_samples: int
    sequence_length: int
    batch_size: int
    dtype: str
    hessian_dtype: str
    observed_linears: int  # observed Linear weights in one layer (experts counted one by one)
    layer_weights: int  # one decoder layer's parameters
    activations: int  # one batch through one layer, every intermediate counted
    hessians: int  # all Hessians of one layer
    observer_state: int  # other observers of one layer (norms, ranges, K/V covariance, routing)
    solver_workspace: int  # a copy of the largest Hessian (Cholesky / inverse)
    peak_device: int  # layer_weights + activations + hessians + observer_state + workspace
    host_activations: int  # all samples' layer inputs and outputs, held between layers
    embeddings: int  # embedding + lm_head (used only before the first / after the last layer)
    attention_scores: int  # part of `activations`: the L x L scores when eager attention is used
    notes: tuple = ()

    def __str__(self) -> str:
        rows = [
            (
                "calibration data",
                f"{self.num_samples} samples x {self.sequence_length} tokens, batch {self.batch_size}",
            ),
            ("one layer's weights", format_bytes(self.layer_weights)),
            (f"activations, one batch ({self.dtype})", format_bytes(self.activations)),
            (f"Hessians ({self.observed_linears} Linear, {self.hessian_dtype})", format_bytes(self.hessians)),
            ("other observers", format_bytes(self.observer_state)),
            ("solver workspace", format_bytes(self.solver_workspace)),
            ("peak device memory", format_bytes(self.peak_device)),
            ("host: all layer inputs+outputs", format_bytes(self.host_activations)),
            ("embeddings + lm_head", format_bytes(self.embeddings)),
        ]
        width = max(len(k) for k, _ in rows)
        head = f"[data] calibration memory estimate: {self.model}, {self.num_layers} layers, hidden {self.hidden_size}"
        lines = [head] + [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def config_value(cfg, *names, default=None):
    for n in names:
        try:
            v = getattr(cfg, n, None)
        except Exception:  # noqa: BLE001 - heterogeneous configs (Gemma 4) refuse global per-layer reads
            v = None
        if v is not None:
            return v
    return default


def _dtype_bytes(dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def estimate_memory(
    model_config,
    config: CalibrationConfig,
    *,
    dtype=torch.float32,
    observers=("hessian",),
    hessian_dtype=torch.float32,
    attn_implementation: str | None = None,
) -> MemoryEstimate:
    """Estimate the memory of a calibration run from a transformers ``PretrainedConfig``.

    Args:
        model_config: reads hidden_size, intermediate_size, num_hidden_layers, attention heads,
            key/value heads, head_dim, vocab_size, tie_word_embeddings, and for MoE models
            num_local_experts / num_experts / n_routed_experts, num_experts_per_tok,
            moe_intermediate_size, shared_expert_intermediate_size / n_shared_experts.
        config: the calibration config (``sequence_length=None`` is capped like the runner does).
        dtype: activation and weight dtype on the device.
        observers: any of ``"hessian", "norms", "ranges", "kv", "routing"``.
        hessian_dtype: float32 or float64 (4 or 8 bytes per Hessian entry).
        attn_implementation: ``"eager"`` counts the ``[b, heads, L, L]`` scores and probabilities;
            default: the config's ``_attn_implementation`` (sdpa/flash never materialize them).
    """
    unknown = [o for o in observers if o not in OBSERVERS]
    if unknown:
        raise ValueError(f"[data] unknown observer(s) {unknown}; known: {', '.join(OBSERVERS)}")
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    H = config_value(cfg, "hidden_size", "n_embd", "d_model")
    if not H:
        raise ValueError(
            f"[data] model config {type(model_config).__name__} has no hidden_size; cannot estimate memory"
        )
    n_layers = config_value(cfg, "num_hidden_layers", "n_layer", "num_layers", default=1)
    n_heads = config_value(cfg, "num_attention_heads", "n_head", default=1)
    n_kv = config_value(cfg, "num_key_value_heads", default=n_heads)
    head_dim = config_value(cfg, "head_dim", default=H // n_heads)
    inter = config_value(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * H)
    vocab = config_value(cfg, "vocab_size", default=0)
    tied = bool(config_value(cfg, "tie_word_embeddings", default=False))
    experts = config_value(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0
    top_k = config_value(cfg, "num_experts_per_tok", "moe_topk", default=2 if experts else 0) or 0
    moe_inter = config_value(cfg, "moe_intermediate_size", default=inter) if experts else 0
    shared_inter = config_value(cfg, "shared_expert_intermediate_size", default=0) or 0
    if experts and not shared_inter and config_value(cfg, "n_shared_experts", default=0):
        shared_inter = cfg.n_shared_experts * moe_inter

    config.validate(model_max_positions(model_config))
    S = config.num_samples
    L = config.resolved_sequence_length(model_max_positions(model_config))
    b = config.resolved_batch_size(L)
    db = _dtype_bytes(dtype)
    hb = _dtype_bytes(hessian_dtype)
    attn = attn_implementation or getattr(model_config, "_attn_implementation", None) or "sdpa"
    notes = []

    # (in_features, out_features, count) of every Linear weight in one layer; the widest MLP kind is
    # used for the whole model (a MoE layer where layers mix dense and sparse MLPs).
    q_out, kv_out = n_heads * head_dim, n_kv * head_dim
    linears = [(H, q_out, 1), (H, kv_out, 2), (q_out, H, 1)]
    if experts:
        # transformers 5 fuses gate and up per expert ([E, 2I, H]): one input, one Hessian per expert
        linears += [(H, 2 * moe_inter, experts), (moe_inter, H, experts)]
        router = H * experts
        if shared_inter:
            linears += [(H, 2 * shared_inter, 1), (shared_inter, H, 1)]
        notes.append(f"MoE: {experts} experts, top-{top_k}; per-expert Hessians counted for all experts")
    else:
        linears += [(H, inter, 2), (inter, H, 1)]
        router = 0
    weights = (sum(i * o * c for i, o, c in linears) + router + 2 * H) * db

    T = b * L
    scores = 2 * b * n_heads * L * L * db if attn == "eager" else 0
    mlp_act = (T * top_k * moe_inter * 3 + T * experts + (T * shared_inter * 3)) if experts else T * inter * 3
    activations = (
        3 * T * H  # layer input, normed input, layer output
        + T * (q_out + 2 * kv_out)  # q, k, v
        + T * q_out  # attention output before o_proj
        + mlp_act
    ) * db + scores

    n_linear = sum(c for _, _, c in linears)
    hessians = sum(i * i * c for i, _, c in linears) * hb if "hessian" in observers else 0
    largest = max(i for i, _, _ in linears)
    workspace = largest * largest * hb if "hessian" in observers else 0
    other = 0
    if "norms" in observers:
        other += sum(i * c for i, _, c in linears) * 4 + 8 * n_linear
    if "ranges" in observers:
        other += sum(i * c for i, _, c in linears) * 2 * 4
    if "kv" in observers:
        other += 2 * n_kv * head_dim * head_dim * 8  # K and V covariance per head, fp64
    if "routing" in observers and experts:
        other += experts * 8 * 2
    if attn == "eager":
        notes.append(f"eager attention: {format_bytes(scores)} of the activations are L x L scores")
    if hb == 4 and "hessian" in observers:
        notes.append("Hessians in float32; float64 doubles them")

    peak = weights + activations + hessians + other + workspace
    host = 2 * S * L * H * db
    embeddings = vocab * H * db * (1 if tied else 2)
    return MemoryEstimate(
        model=type(model_config).__name__.replace("Config", ""),
        num_layers=int(n_layers),
        hidden_size=int(H),
        num_samples=S,
        sequence_length=L,
        batch_size=b,
        dtype=str(dtype).replace("torch.", ""),
        hessian_dtype=str(hessian_dtype).replace("torch.", ""),
        observed_linears=n_linear,
        layer_weights=weights,
        activations=activations,
        hessians=hessians,
        observer_state=other,
        solver_workspace=workspace,
        peak_device=peak,
        host_activations=host,
        embeddings=embeddings,
        attention_scores=scores,
        notes=tuple(notes),
    )
