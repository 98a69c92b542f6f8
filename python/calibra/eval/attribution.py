"""Per-layer attribution: which decoder layer's compression costs the most.

For every decoder layer ``i`` the hybrid model "reference everywhere, compressed in layer ``i``
only" is scored against the reference with the top-k KL of :mod:`calibra.eval.kl` (and its
perplexity) on a small eval slice; the table ranks the layers by that cost.

Cheap by construction: the reference is run once and reduced to its top-k
(:class:`~calibra.eval.kl.ReferenceTopK`); each hybrid is made by putting the compressed model's
layer ``i`` module into the reference model's layer list for one pass and putting the reference
layer back afterwards -- no model is ever copied, only one layer's weights change hands (and if
the compressed model lives on another device, e.g. the CPU, only that one layer is moved over
for its pass and moved back). The reference model is restored even if a pass fails.

Attribution measures each layer's damage in isolation. Errors of several compressed layers
interact, so the per-layer KLs need not add up to the KL of the fully compressed model; the
result reports that total too, for scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from calibra.eval._forward import model_device
from calibra.eval.kl import DEFAULT_TOP_K, KLResult, collect_reference, compare


def decoder_layers(model):
    """``(qualified_name, ModuleList)`` of the model's decoder layers.

    Hugging Face causal LMs keep them at ``model.model.layers``; otherwise the ``ModuleList``
    whose length equals ``config.num_hidden_layers`` is taken (the one named ``...layers`` first).
    """
    import torch

    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return "model.layers", inner.layers
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and (n is None or len(m) == n) and len(m) > 0
    ]
    found.sort(key=lambda nm: (not nm[0].endswith("layers"), nm[0].count(".")))
    if not found:
        raise ValueError(
            f"[eval] cannot find the decoder layers of {type(model).__name__}: no ModuleList "
            f"of num_hidden_layers ({n}) modules; attribution needs a Hugging Face causal LM"
        )
    return found[0]


@dataclass
class LayerCost:
    layer: int
    name: str
    kl_mean: float  # KL(reference || hybrid), mean over tokens (nats)
    kl_reverse_mean: float  # KL(hybrid || reference)
    kl_max: float
    ppl: float  # perplexity of the hybrid
    ppl_delta: float  # hybrid perplexity - reference perplexity


@dataclass
class AttributionResult:
    layers: list[LayerCost]  # ranked, costliest first
    rank_by: str  # "kl" or "ppl"
    ppl_reference: float
    full: dict | None  # KL/ppl of the fully compressed model on the same slice
    tokens: int
    seq_len: int
    stride: int
    top_k: int
    dataset: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"{'rank':>4}  {'layer':<18} {'KL(ref||hyb)':>13} {'KL(hyb||ref)':>13} {'max KL':>10} "
            f"{'ppl':>10} {'Δppl':>9}"
        ]
        for r, c in enumerate(self.layers, 1):
            lines.append(
                f"{r:>4}  {c.name:<18} {c.kl_mean:>13.6f} {c.kl_reverse_mean:>13.6f} {c.kl_max:>10.4f} "
                f"{c.ppl:>10.4f} {c.ppl_delta:>+9.4f}"
            )
        if self.full:
            lines.append(
                f"{'':>4}  {'all layers':<18} {self.full['kl_mean']:>13.6f} "
                f"{self.full['kl_reverse_mean']:>13.6f} {self.full['kl_max']:>10.4f} "
                f"{self.full['ppl']:>10.4f} {self.full['ppl'] - self.ppl_reference:>+9.4f}"
            )
        return "\n".join(lines)


def _check_same_architecture(reference, compressed, ref_layers, cmp_layers):
    rt = getattr(getattr(reference, "config", None), "model_type", None)
    ct = getattr(getattr(compressed, "config", None), "model_type", None)
    if rt != ct:
        raise ValueError(
            f"[eval] attribution needs two models of the same architecture; the reference is "
            f"{rt!r}, the compressed model {ct!r}"
        )
    if len(ref_layers) != len(cmp_layers):
        raise ValueError(
            f"[eval] attribution needs the same number of decoder layers; the reference has "
            f"{len(ref_layers)}, the compressed model {len(cmp_layers)}"
        )


def attribute_layers(
    reference,
    compressed,
    ids,
    *,
    seq_len: int,
    stride: int,
    top_k: int = DEFAULT_TOP_K,
    rank_by: str = "kl",
    batch_size: int | None = None,
    progress: bool | None = None,
    dataset: dict | None = None,
    include_full: bool = True,
) -> AttributionResult:
    """Rank the decoder layers of ``compressed`` by the KL (``rank_by="kl"``) or perplexity increase
    (``"ppl"``) that each one alone causes when put into ``reference`` (see the module docstring)."""
    if rank_by not in ("kl", "ppl"):
        raise ValueError(f"[eval] rank_by must be 'kl' or 'ppl', got {rank_by!r}")
    prefix, ref_layers = decoder_layers(reference)
    _, cmp_layers = decoder_layers(compressed)
    _check_same_architecture(reference, compressed, ref_layers, cmp_layers)
    ref = collect_reference(
        reference, ids, seq_len=seq_len, stride=stride, top_k=top_k, batch_size=batch_size, progress=progress
    )
    ppl_ref = _exp(ref.nll())
    device = model_device(reference)
    costs = []
    for i in range(len(ref_layers)):
        own, theirs = ref_layers[i], cmp_layers[i]
        home = model_device(theirs)
        if home != device:
            theirs.to(device)
        ref_layers[i] = theirs
        try:
            r = compare(reference, ref, ids, progress=progress)
        finally:
            ref_layers[i] = own
            if home != device:
                theirs.to(home)
        costs.append(
            LayerCost(
                layer=i,
                name=f"{prefix}.{i}",
                kl_mean=r.kl_ref_cmp["mean"],
                kl_reverse_mean=r.kl_cmp_ref["mean"],
                kl_max=r.kl_ref_cmp["max"],
                ppl=r.ppl_compressed,
                ppl_delta=r.ppl_compressed - ppl_ref,
            )
        )
    key = (lambda c: c.kl_mean) if rank_by == "kl" else (lambda c: c.ppl_delta)
    costs.sort(key=key, reverse=True)
    full = None
    if include_full and model_device(compressed) == device:
        r: KLResult = compare(compressed, ref, ids, progress=progress)
        full = {
            "kl_mean": r.kl_ref_cmp["mean"],
            "kl_reverse_mean": r.kl_cmp_ref["mean"],
            "kl_max": r.kl_ref_cmp["max"],
            "ppl": r.ppl_compressed,
        }
    return AttributionResult(
        layers=costs,
        rank_by=rank_by,
        ppl_reference=ppl_ref,
        full=full,
        tokens=ref.tokens,
        seq_len=seq_len,
        stride=stride,
        top_k=ref.top_k,
        dataset=dict(dataset or {}),
    )


def _exp(x: float) -> float:
    import math

    return math.exp(x)
