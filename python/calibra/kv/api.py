"""``calibra.kv.calibrate`` (model -> KV preset) and ``calibra.kv.evaluate`` (model + preset -> quality).

Calibration is one pass of the calibration engine with the ``kv`` observer (``calibra.api.calibrate``:
per layer and KV head ``sum x x^T`` and ``sum x`` of pre-RoPE keys and values), then PCA
(``calibra.kv.basis``), then either a fixed rank or the auto-tuner (``calibra.kv.autotune``), then the
measured quality on the held-out eval text, then the preset files (``calibra.kv.preset``).
"""

from __future__ import annotations

import time
from pathlib import Path

from calibra.kv.autotune import METRICS, NoCompressionFits, autotune  # noqa: F401  (re-exported)
from calibra.kv.basis import bases_from_stats
from calibra.kv.measure import QualityProbe, measure_bytes
from calibra.kv.plan import KVArchitectureError, KVPlan, which_of
from calibra.kv.preset import KVPreset, check_output

#: tokens of calibration text the auto-tuner measures every candidate on (see calibra.kv.autotune)
DEFAULT_TUNE_TOKENS = 8192


def _spec_name(model) -> str | None:
    return (
        str(model) if isinstance(model, (str, Path)) else getattr(getattr(model, "config", None), "_name_or_path", None)
    )


def default_eval_seq_len(model) -> int | None:
    """For a built-in model, the sequence length it was trained at (its config claims 1024 positions, but
    only the first 256 were trained, so perplexity at 1024 would be meaningless); None otherwise."""
    from calibra.assets import is_builtin, training_facts

    if isinstance(model, (str, Path)) and is_builtin(str(model)):
        return int(training_facts(str(model))["training"]["seq_len"])
    return None


def _check_config(model, *, rank=None) -> object:
    """Architecture checks from the config alone, before any weight loads. MLA is refused by name (its
    model types have no calibra adapter, which would otherwise say only "unsupported architecture")."""
    import json

    from calibra.jobs.common import model_config_of
    from calibra.kv.plan import check_architecture
    from calibra.models.adapter import attention_kind

    if isinstance(model, (str, Path)):
        from calibra.assets import resolve_model

        try:
            raw = json.loads((resolve_model(str(model)) / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, ValueError):
            raw = {}  # model_config_of below names the problem
        if isinstance(raw, dict) and raw.get("kv_lora_rank"):
            check_architecture(type("MLA", (), {"attention_kind": "mla"}))
        cfg = model_config_of(model)
    else:
        cfg = model.config
    check_architecture(type("Cfg", (), {"attention_kind": attention_kind(cfg)}))
    _check_explicit(cfg)
    if rank is not None:
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if not 1 <= rank <= d:
            raise ValueError(f"[kv] rank must be in 1..head_dim ({d}), got {rank}")
    return cfg


def _check_explicit(cfg) -> None:
    """K/V observers need the family's key/value projections and where RoPE is applied: only the explicit
    adapters know them (a structurally discovered family is quantized, not KV-calibrated)."""
    from calibra.kv.plan import KVArchitectureError
    from calibra.models.registry import ADAPTERS, supported_architectures

    model_type = getattr(cfg, "model_type", None)
    if model_type not in ADAPTERS:
        raise KVArchitectureError(
            f"[kv] model_type={model_type!r} has no explicit adapter: KV-cache calibration needs the family's "
            f"key/value projections and RoPE placement; supported: {', '.join(supported_architectures())}"
        )


def _check_lengths(cfg, calibration, eval_seq_len: int | None, flag: str) -> None:
    """Every length setting against the model's positions, from its config alone: a setting out of range
    is an error before any weight is read (a ``CalibrationConfig`` with ``sequence_length=None`` is capped
    at the model's context by the calibration pass, as for the other verbs)."""
    from calibra.data import CalibrationConfig
    from calibra.data.config import model_max_positions
    from calibra.eval import check_protocol

    if isinstance(calibration, CalibrationConfig):
        calibration.validate(model_max_positions(cfg))
    check_protocol(cfg, eval_seq_len, flag=flag)


def _load(model, tokenizer, dtype, device):
    if isinstance(model, (str, Path)):
        from calibra.assets import load_model

        m, tok = load_model(str(model), dtype=dtype)
        if device is not None:
            m.to(device)
        return m, (tokenizer or tok)
    return model.eval(), tokenizer


def _quality(model, tokenizer, plan, probe: QualityProbe) -> dict:
    block = probe.measure(plan)
    block["memory"] = measure_bytes(model, plan, probe.sample_window())
    return block


def calibrate(
    model,
    calibration=None,
    *,
    rank: int | None = None,
    targets: str = "v",
    target_ppl_delta: float | None = None,
    target_kl: float | None = None,
    output=None,
    overwrite: bool = False,
    tokenizer=None,
    device=None,
    dtype="float32",
    evaluate: bool = True,
    eval_dataset="builtin",
    eval_seq_len: int | None = None,
    eval_max_tokens: int | None = None,
    tune_max_tokens: int = DEFAULT_TUNE_TOKENS,
    progress: bool = True,
    echo=print,
) -> KVPreset:
    """Calibrate per-layer, per-KV-head PCA bases for V (``targets="v"``) or K and V (``"kv"``) and return
    (and with ``output``, write) a :class:`KVPreset`.

    Exactly one of ``rank`` (every targeted tensor of every layer at that rank), ``target_ppl_delta``
    (auto-tune: the largest saving whose perplexity increase stays within it) or ``target_kl`` (the same
    with a mean-KL budget, nats/token) is required. ``calibration``: as for :func:`calibra.calibrate`
    (default: 128 x min(context, 2048) tokens of builtin text). ``eval_*``: the held-out text the preset's quality is
    measured on (default: builtin eval text, for built-in models at their trained length 256, non-
    overlapping windows). Raises :class:`NoCompressionFits` when auto-tuning finds nothing within budget.
    """
    from calibra.data import CalibrationConfig

    say = echo or (lambda *a, **k: None)
    which = which_of(targets)
    modes = [x is not None for x in (rank, target_ppl_delta, target_kl)]
    if sum(modes) != 1:
        raise ValueError("[kv] give exactly one of rank=R, target_ppl_delta=D or target_kl=K")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise ValueError(f"[kv] rank must be an integer, got {rank!r}")
    for name, v in (("target_ppl_delta", target_ppl_delta), ("target_kl", target_kl)):
        if v is not None and not (isinstance(v, (int, float)) and v >= 0):
            raise ValueError(f"[kv] {name} must be a number >= 0, got {v!r}")
    if (target_ppl_delta is not None or target_kl is not None) and tune_max_tokens < 2:
        raise ValueError(f"[kv] tune_max_tokens must be >= 2, got {tune_max_tokens}")
    if output is not None:
        check_output(output, overwrite)
    from calibra.jobs.distributed import current_world

    world = current_world("kv")  # under torchrun: the samples split, the statistics summed, rank 0 writes
    if not world.writer:
        output, evaluate, progress, echo = None, False, False, None
        say = lambda *a, **k: None  # noqa: E731
    cfg = _check_config(model, rank=rank)
    source = _spec_name(model)
    eval_seq_len = eval_seq_len or default_eval_seq_len(model)
    calibration = CalibrationConfig() if calibration is None else calibration
    _check_lengths(cfg, calibration, eval_seq_len, "--eval-seq-len")
    model, tokenizer = _load(model, tokenizer, dtype, device)
    from calibra.calib.stats import model_identity
    from calibra.models import get_adapter

    adapter = get_adapter(model)
    kind = adapter.attention_kind
    t0 = time.perf_counter()
    import calibra

    stats = calibra.calibrate(
        model, calibration, observers=("kv",), tokenizer=tokenizer, device=device, progress=progress, echo=echo
    )
    keys = [adapter.layer_name(i) for i in range(len(adapter.layers))]
    plan = KVPlan(bases={w: bases_from_stats(stats, keys, w) for w in which})
    run = (stats.metadata.get("runs") or [{}])[0]
    timings = {"calibration": round(time.perf_counter() - t0, 3)}
    report = None
    if rank is not None:
        plan = plan.uniform(rank)
    else:
        metric, budget = ("ppl", target_ppl_delta) if target_ppl_delta is not None else ("kl", target_kl)
        texts = _tune_texts(calibration, tokenizer, tune_max_tokens)
        t1 = time.perf_counter()
        probe = QualityProbe(
            model, tokenizer, dataset=texts, seq_len=eval_seq_len, max_tokens=tune_max_tokens, progress=False
        )
        plan, report = autotune(probe, plan, metric=metric, budget=budget, progress=progress, echo=echo)
        report["tuning"]["dataset"]["name"] = (
            f"calibration text ({run.get('dataset', 'builtin')}), first "
            f"{int(probe.ids.numel())} tokens in document order"
        )
        timings["autotune"] = round(time.perf_counter() - t1, 3)
    quality = None
    if evaluate:
        t2 = time.perf_counter()
        probe = QualityProbe(
            model, tokenizer, dataset=eval_dataset, seq_len=eval_seq_len, max_tokens=eval_max_tokens, progress=progress
        )
        quality = _quality(model, tokenizer, plan, probe)
        timings["eval"] = round(time.perf_counter() - t2, 3)
        if report is not None:
            metric = report["metric"]
            from calibra.kv.measure import metric_value

            v = metric_value(quality, metric)
            report["verified"] = {
                "dataset": quality["protocol"]["dataset"]["name"],
                "value": v,
                "within_budget": v <= report["budget"],
            }
            if v > report["budget"]:
                say(
                    f"[kv] WARNING: the tuned ranks meet the budget on the tuning text but not on the eval text: "
                    f"{v:+.4f} > {report['budget']} ({report['metric_description']}); the preset records this"
                )
    preset = KVPreset(
        plan=plan,
        model={
            "source": source,
            "model_type": getattr(model.config, "model_type", None),
            "identity": model_identity(model),
            "attention": kind,
            "num_layers": plan.num_layers,
            "num_kv_heads": plan.num_kv_heads,
            "head_dim": plan.head_dim,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        },
        calibration={
            "dataset": run.get("dataset"),
            "version": run.get("version"),
            "samples": run.get("samples"),
            "sequence_length": run.get("sequence_length"),
            "seed": run.get("seed"),
            "tokens": run.get("tokens"),
            "fingerprint": run.get("fingerprint"),
            "observer": "kv (sum x x^T, sum x per layer and KV head; keys before RoPE)",
            "seconds": timings,
            **({"distributed": world.to_dict()} if world.distributed else {}),
        },
        quality=quality,
        autotune=report,
    )
    if output is not None:
        preset.save(output, overwrite=overwrite)
        from calibra.report import write_preset_html  # NAME.report.html beside NAME.json

        write_preset_html(output, preset)
    return preset


def _tune_texts(calibration, tokenizer, max_tokens: int) -> list[str]:
    """The calibration source's texts in document order, as many as ``max_tokens`` tokens need (the
    auto-tuner's stream; the rest is never tokenized). A token is far less than 16 characters."""
    from calibra.data import CalibrationConfig, CalibrationDataset

    spec = calibration.dataset if isinstance(calibration, CalibrationConfig) else "builtin"
    out, chars = [], 0
    for t in CalibrationDataset.from_source(spec).texts(tokenizer):
        out.append(t)
        chars += len(t)
        if chars >= 16 * max_tokens:
            break
    return out


def evaluate(
    model,
    preset,
    *,
    tokenizer=None,
    device=None,
    dtype="float32",
    dataset="builtin",
    seq_len: int | None = None,
    max_tokens: int | None = None,
    ranks: dict | None = None,
    progress: bool = True,
) -> dict:
    """Measure a preset on ``model``: perplexity (baseline, compressed, increase), KL and cache bytes.

    ``preset``: a :class:`KVPreset` or its JSON path; checked against the model before anything runs.
    ``ranks``: override the preset's ranks (``{"v": [...], "k": [...]}``).
    """
    if not isinstance(preset, KVPreset):
        preset = KVPreset.load(preset)
    plan = preset.plan if ranks is None else preset.plan.with_ranks(ranks)
    cfg = _check_config(model)
    seq_len = seq_len or default_eval_seq_len(model)
    _check_lengths(cfg, None, seq_len, "--seq-len")
    model, tokenizer = _load(model, tokenizer, dtype, device)
    preset.check_model(model)
    probe = QualityProbe(model, tokenizer, dataset=dataset, seq_len=seq_len, max_tokens=max_tokens, progress=progress)
    out = _quality(model, tokenizer, plan, probe)
    out["ranks"] = {w: list(r) for w, r in plan.ranks.items()}
    out["targets"] = plan.targets
    return out


__all__ = [
    "calibrate",
    "evaluate",
    "default_eval_seq_len",
    "KVArchitectureError",
    "NoCompressionFits",
    "DEFAULT_TUNE_TOKENS",
]
