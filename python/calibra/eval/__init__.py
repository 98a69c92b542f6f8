"""Evaluation: perplexity, KL divergence against a reference, per-layer attribution.

:func:`evaluate` is the one entry point (``calibra.evaluate``); the modules hold the parts:

* :mod:`~calibra.eval.windows` -- the strided sliding-window protocol (Hugging Face perplexity guide)
* :mod:`~calibra.eval.perplexity` -- ``exp`` of the mean next-token NLL over the scored tokens
* :mod:`~calibra.eval.kl` -- KL(ref||cmp) and KL(cmp||ref), top-k streamed or exact
* :mod:`~calibra.eval.attribution` -- which decoder layer's compression costs the most

Defaults: ``seq_len`` = the model's ``max_position_embeddings`` capped at 2048, ``stride`` =
``seq_len // 2``, the built-in held-out eval text, float32 weights and logits, top-k ``k = 64``.
"""

from __future__ import annotations

from pathlib import Path

from calibra.eval._forward import model_device
from calibra.eval.attribution import AttributionResult, attribute_layers
from calibra.eval.kl import DEFAULT_TOP_K, KLResult, ReferenceTopK, collect_reference, compare, kl_divergence_from_ids
from calibra.eval.perplexity import PerplexityResult, perplexity_from_ids
from calibra.eval.windows import DEFAULT_SEQ_LEN_CAP, dataset_version, plan_windows, resolve_protocol, token_stream

__all__ = [
    "evaluate",
    "METRICS",
    "PerplexityResult",
    "KLResult",
    "AttributionResult",
    "ReferenceTopK",
    "perplexity_from_ids",
    "kl_divergence_from_ids",
    "collect_reference",
    "compare",
    "attribute_layers",
    "plan_windows",
    "token_stream",
    "resolve_protocol",
    "check_protocol",
    "DEFAULT_TOP_K",
    "DEFAULT_SEQ_LEN_CAP",
]

METRICS = ("perplexity", "kl-divergence")
#: attribution runs one pass per decoder layer, so by default it uses a slice of the eval stream
ATTRIBUTION_WINDOWS = 4


def _validate(metric, reference, seq_len, stride, max_tokens, top_k, exact, attribution, rank_by):
    """Every argument check that needs no weights, so a bad call fails before anything loads."""
    if metric not in METRICS:
        raise ValueError(f"[eval] metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "kl-divergence" and reference is None:
        raise ValueError("[eval] metric 'kl-divergence' needs a reference model (reference=... / --reference DIR)")
    if attribution and reference is None:
        raise ValueError("[eval] per-layer attribution needs a reference model (reference=... / --reference DIR)")
    if seq_len is not None and seq_len < 2:
        raise ValueError(f"[eval] seq_len must be >= 2, got {seq_len}")
    if stride is not None and (stride < 1 or (seq_len is not None and stride > seq_len)):
        raise ValueError(f"[eval] stride must be in 1..seq_len, got stride {stride} with seq_len {seq_len}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"[eval] max_tokens must be >= 2, got {max_tokens}")
    if not exact and top_k < 1:
        raise ValueError(f"[eval] top_k must be >= 1, got {top_k}")
    if rank_by not in ("kl", "ppl"):
        raise ValueError(f"[eval] rank_by must be 'kl' or 'ppl', got {rank_by!r}")


def _check_protocol_before_loading(model, seq_len, stride, read) -> None:
    """A window longer than a named model's context is refused from its config, before its weights are
    read (the same check :func:`resolve_protocol` makes on a loaded model)."""
    if seq_len is None or not isinstance(model, (str, Path)):
        return
    from transformers import AutoConfig

    from calibra.io import inspect_model

    folder = inspect_model(str(model), allow_quantized=True, check_tensors=False, component="eval", **read)
    remote = {"trust_remote_code": True} if read.get("trust_remote_code") else {}
    check_protocol(AutoConfig.from_pretrained(folder.path, local_files_only=True, **remote), seq_len, stride)


def check_protocol(model_config, seq_len: int | None, stride: int | None = None, *, flag: str = "--seq-len") -> None:
    """Check an evaluation window against a model's config alone (no weights): what the compressing
    verbs call before loading a model whose report they will evaluate. ``flag``: the option the error
    message tells the user to change."""
    from types import SimpleNamespace

    if seq_len is not None and seq_len < 2:
        raise ValueError(f"[eval] seq_len must be >= 2, got {seq_len}")
    resolve_protocol(SimpleNamespace(config=model_config), seq_len, stride, flag=flag)


def _auto_device(device):
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(model, tokenizer, dtype, device, read=None, stream: bool | None = False):
    """``(model, tokenizer)`` from a spec (``builtin:NAME`` / folder) or an already built model. Folders go
    through the checking reader; quantized checkpoints are allowed (evaluating them is the point).
    ``stream``: True evaluates a folder layer by layer (:mod:`calibra.eval.streamed`), None does so when
    the whole model would not fit in memory, False never."""
    if isinstance(model, (str, Path)):
        if stream is not False:
            streamed = _open_streamed(model, dtype, device, read or {}, force=bool(stream))
            if streamed is not None:
                return streamed
        if _is_quantize_output(model):
            m, tok = _load_quantize_output(model, dtype, read)
        else:
            from calibra.io import load_model

            m, tok = load_model(str(model), dtype, allow_quantized=True, **(read or {}))
        return m.to(_auto_device(device)), (tokenizer or tok)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


#: the whole model is loaded when it takes at most this share of the available host memory (the rest is
#: the logits, the activations and what the rest of the process holds)
WHOLE_MODEL_SHARE = 0.7


def _open_streamed(spec, dtype, device, read, *, force: bool):
    """``(StreamedLM, tokenizer)`` for a model folder evaluated layer by layer, or None when the whole model
    fits (``force``: stream whatever its size). Only the config and the shard headers are read here."""
    import sys

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from calibra.eval.streamed import StreamedLM
    from calibra.io import inspect_model
    from calibra.io.streamed import weightless_model
    from calibra.rss import proc_kib

    quantized = _is_quantize_output(spec)
    folder = inspect_model(str(spec), allow_quantized=True, check_tensors=False, component="eval", **read)
    remote = {"trust_remote_code": True} if read.get("trust_remote_code") else {}
    cfg = AutoConfig.from_pretrained(folder.path, local_files_only=True, **remote)
    dt = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (dtype or torch.float32)
    dt = dt if isinstance(dt, torch.dtype) else torch.float32
    unloadable = _whole_load_problem(cfg, dt)
    if not force and unloadable:
        msg = f"[eval] {spec}: {unloadable}: evaluating it layer by layer (its weights dequantized here)"
        print(msg, file=sys.stderr)
    elif not force:
        shapes = weightless_model(cfg, bool(remote))
        need = sum(p.numel() for p in shapes.parameters()) * torch.empty((), dtype=dt).element_size()
        avail = proc_kib("/proc/meminfo", "MemAvailable")
        if avail is None or need <= WHOLE_MODEL_SHARE * avail:
            return None
        print(
            f"[eval] {spec}: the model needs {need / 2**30:.1f} GiB in {str(dt).replace('torch.', '')}, "
            f"{avail / 2**30:.1f} GiB are available: evaluating it layer by layer (streamed from its shards)",
            file=sys.stderr,
        )
    try:
        streamed = _streamed_source(spec, folder, cfg, dt, quantized, bool(remote))
    except ValueError as e:
        if force:
            raise
        print(f"{e}; loading it whole instead", file=sys.stderr)
        return None
    tok = AutoTokenizer.from_pretrained(folder.path, local_files_only=True)
    return StreamedLM(streamed, _auto_device(device), label=str(spec)), tok


def _whole_load_problem(cfg, dtype) -> str | None:
    """Why transformers + compressed-tensors cannot evaluate this compressed-tensors export whole on the
    CPU at ``dtype`` (the layer-by-layer reader can), or None."""
    import torch

    q = getattr(cfg, "quantization_config", None)
    q = q.to_dict() if q is not None and not isinstance(q, dict) else q
    if not q or q.get("quant_method") != "compressed-tensors":
        return None
    for g in (q.get("config_groups") or {}).values():
        fmt, w = g.get("format") or q.get("format"), g.get("weights") or {}
        if fmt == "nvfp4-pack-quantized" and dtype != torch.bfloat16:
            return f"compressed-tensors decompresses NVFP4 weights to bfloat16 only, not {str(dtype)[6:]}"
        if fmt == "pack-quantized" and w.get("symmetric") is False:
            return "transformers 5.23+ rejects the shape of its packed zero points (FORMATS.md 2.6)"
    return None


def _streamed_source(spec, folder, cfg, dtype, quantized: bool, trust_remote_code: bool):
    """The ``StreamedModel`` of a checked folder, or ValueError saying why it cannot be read layer by layer."""
    from calibra.io.streamed import open_streamed

    if folder.weight_format != "safetensors":
        raise ValueError(f"[eval] {spec}: a layer-by-layer evaluation needs safetensors weights, not pickle files")
    if quantized:
        from calibra.quant.streamed_load import open_streamed_quantized

        return open_streamed_quantized(folder, cfg, dtype)
    if folder.quantized:
        qcfg = getattr(cfg, "quantization_config", None)
        qcfg = qcfg.to_dict() if qcfg is not None and not isinstance(qcfg, dict) else qcfg
        if not qcfg or qcfg.get("quant_method") != "compressed-tensors":  # ct_weight_scheme checks the rest
            raise ValueError(
                f"[eval] {spec}: {folder.quantized}; of the engines' quantized checkpoints only weight-only "
                f"compressed-tensors ones are read layer by layer: evaluate this one whole (through transformers)"
            )
        from calibra.quant.streamed_load import open_streamed_quantized

        return open_streamed_quantized(folder, cfg, dtype)
    streamed, why = open_streamed(folder, cfg, dtype, trust_remote_code=trust_remote_code)
    if streamed is None:
        raise ValueError(f"[eval] {spec} cannot be evaluated layer by layer: {why}")
    return streamed


def _is_quantize_output(spec) -> bool:
    """Whether ``spec`` is a folder ``calibra quantize`` wrote (its own layout, not an engine export)."""
    from calibra.quant.save import INDEX, MANIFEST, WEIGHTS

    folder = Path(str(spec))
    # one file, or (a streamed job's output) shards with their index
    return (folder / MANIFEST).is_file() and ((folder / WEIGHTS).is_file() or (folder / INDEX).is_file())


def _load_quantize_output(spec, dtype, read):
    """The simulated quantized model of a ``calibra quantize`` folder (every quantized weight dequantized
    from its codes, exactly what the report's evaluation measured) and the tokenizer saved beside it."""
    import torch
    from transformers import AutoTokenizer

    from calibra.io import check_model_finite, inspect_model
    from calibra.quant.save import load as load_quantized

    folder = inspect_model(str(spec), allow_quantized=True, check_tensors=False, component="eval", **(read or {}))
    dt = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (dtype or torch.float32)
    model, _ = load_quantized(folder.path, dtype=dt if isinstance(dt, torch.dtype) else torch.float32)
    check_model_finite(model, str(spec))
    return model.eval(), AutoTokenizer.from_pretrained(folder.path, local_files_only=True)


def _texts(dataset):
    """``(texts, name)`` for ``"builtin"``, a file or folder path, or a list of strings."""
    from calibra.assets import resolve_texts

    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(t, str) for t in dataset):
            raise TypeError("[eval] a dataset given as a list must hold strings")
        return list(dataset), "texts"
    texts = resolve_texts(str(dataset), "eval")
    return texts, ("builtin:eval" if dataset == "builtin" else str(dataset))


def evaluate(
    model,
    *,
    metric: str = "perplexity",
    dataset="builtin",
    reference=None,
    seq_len: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    device=None,
    top_k: int = DEFAULT_TOP_K,
    exact: bool = False,
    attribution: bool = False,
    rank_by: str = "kl",
    attribution_tokens: int | None = None,
    tokenizer=None,
    dtype="float32",
    batch_size: int | None = None,
    progress: bool | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    stream: bool | None = None,
):
    """Evaluate ``model`` (a ``builtin:NAME`` spec, a Hugging Face folder, or a loaded causal LM).

    * ``metric="perplexity"`` -> :class:`PerplexityResult` (with ``.reference``, the reference's
      perplexity on the same tokens, when ``reference`` is given).
    * ``metric="kl-divergence"`` -> :class:`KLResult`, KL(reference||model) and KL(model||reference)
      per token (mean/median/max), top-k (``top_k``) or ``exact``, plus both perplexities.
    * ``attribution=True`` (needs ``reference``) adds ``.attribution``: an
      :class:`AttributionResult` ranking the decoder layers of ``model`` by the KL (or, with
      ``rank_by="ppl"``, the perplexity increase) each causes alone, on the first
      ``attribution_tokens`` tokens (default: 4 windows).

    ``dataset``: ``"builtin"`` (held-out eval text), a ``.jsonl``/``.txt`` file or folder, or a list
    of strings. ``seq_len`` defaults to the model's context capped at 2048, ``stride`` to half of it;
    ``max_tokens`` cuts the token stream. ``device`` moves the models (default for specs: CUDA
    when available, else CPU; a loaded model stays where it is). Logits are always float32.
    ``stream``: evaluate a model folder layer by layer, reading one decoder layer at a time from its
    shards (host memory: one layer plus the windows' hidden states); ``None`` (default) does so when the
    whole model would take more than 70% of the available memory. Plain safetensors checkpoints and
    calibra's quantized folders stream; engine formats (compressed-tensors, GPTQ) load whole.
    A loaded model needs ``tokenizer`` unless ``dataset`` is already a 1-D tensor of token ids.
    """
    import torch

    _validate(metric, reference, seq_len, stride, max_tokens, top_k, exact, attribution, rank_by)
    read = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    _check_protocol_before_loading(model, seq_len, stride, read)
    model, tokenizer = _load(model, tokenizer, dtype, device, read, stream)
    if isinstance(dataset, torch.Tensor):
        ids, ds = dataset.reshape(-1).long(), {"name": "token-ids", "version": None, "documents": None}
    else:
        if tokenizer is None:
            raise ValueError(
                "[eval] a loaded model needs tokenizer=... to encode the eval text "
                "(or pass a folder / builtin:NAME, whose tokenizer is used)"
            )
        texts, name = _texts(dataset)
        if not texts:
            raise ValueError(f"[eval] dataset {name!r} holds no text")
        ids = torch.tensor(token_stream(tokenizer, texts), dtype=torch.long)
        ds = {"name": name, "version": dataset_version(texts), "documents": len(texts)}
    if max_tokens is not None:
        ids = ids[:max_tokens]
    seq_len, stride = resolve_protocol(model, seq_len, stride)
    if 2 <= ids.numel() < seq_len:
        import warnings

        warnings.warn(
            f"[eval] the eval stream has only {ids.numel()} tokens, fewer than seq_len {seq_len}: "
            f"one window of {ids.numel()} tokens is scored; give more text for a comparable number",
            stacklevel=2,
        )
    ref_model = None
    if reference is not None:
        # the reference runs where the model runs: the two are compared batch by batch
        ref_model, _ = _load(reference, None, dtype, model_device(model), read, stream)
        _check_vocab(ref_model, model)
    if attribution and _streamed(model, ref_model):
        raise ValueError(
            "[eval] per-layer attribution swaps layers between two models held in memory; one of them is "
            "evaluated layer by layer (too large to load whole, or stream=True / --stream). Run the "
            "attribution on a machine where both fit, or without --attribution"
        )
    kw = dict(seq_len=seq_len, stride=stride, batch_size=batch_size, progress=progress, dataset=ds)
    if metric == "perplexity":
        result = perplexity_from_ids(model, ids, **kw)
        result.reference = perplexity_from_ids(ref_model, ids, **kw) if ref_model is not None else None
    elif not exact and _streamed(model, ref_model):
        # layer by layer, each model holds every window's hidden states until its head runs: the reference
        # is reduced to its top-k first instead of running both in lockstep
        ref = collect_reference(
            ref_model, ids, seq_len=seq_len, stride=stride, top_k=top_k, batch_size=batch_size, progress=progress
        )
        result = compare(model, ref, ids, progress=progress, dataset=ds)
    else:
        result = kl_divergence_from_ids(ref_model, model, ids, top_k=top_k, exact=exact, **kw)
    if attribution:
        n = attribution_tokens or min(ids.numel(), seq_len + (ATTRIBUTION_WINDOWS - 1) * stride)
        result.attribution = attribute_layers(ref_model, model, ids[:n], top_k=top_k, rank_by=rank_by, **kw)
    return result


def _streamed(*models) -> bool:
    return any(hasattr(m, "iter_scored") for m in models)


def _check_vocab(reference, model):
    rv = getattr(getattr(reference, "config", None), "vocab_size", None)
    mv = getattr(getattr(model, "config", None), "vocab_size", None)
    if rv is not None and mv is not None and rv != mv:
        raise ValueError(
            f"[eval] the reference has vocab_size {rv}, the model {mv}; comparing them needs the same tokenizer"
        )
