"""``calibra.quantize``: model in, quantized model + report out (and, with ``output=DIR``, a folder).

The order of work is the contract with the user (FAULTS rows 10, 11, 13, 26): every check that needs
no weights runs first -- the config, the output folder, the model's config (architecture, an existing
``quantization_config``), every layer's shape against the config (on a weightless meta-device copy of
the model) -- then the model loads, the reference for evaluation is collected, calibration and the
solvers run layer by layer, the quantized model is evaluated, and only then is anything written.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from calibra.eval.session import REPORT_EVAL_TOKENS
from calibra.jobs.common import (
    all_targets,
    meta_model,
    report_moe_coverage,
)

REPORT_FORMAT = "calibra-quantize-report"


# ---------------------------------------------------------------------------------------- checks
def _check_config(config):
    from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig

    if not isinstance(config, (RTNConfig, GPTQConfig, MRGPTQConfig)):
        raise TypeError(
            f"[quantize] config must be an RTNConfig, GPTQConfig or MRGPTQConfig, got {type(config).__name__}"
        )
    config.validate()
    return config


def _check_scheme(config, scheme, observer="absmax", clip_percentile=99.99):
    """``(weight config, ActQuantConfig or None)`` from ``config`` or ``scheme`` (exactly one of them)."""
    from calibra.quant.scheme import SCHEMES, scheme_configs

    if scheme is None and observer != "absmax":
        raise ValueError(
            f"[quantize] act_observer {observer!r} chooses static input scales: it needs scheme='fp8' or 'w8a8-static'"
        )
    if scheme is None:
        if config is None:
            raise ValueError(
                f"[quantize] give a config (RTNConfig, GPTQConfig, MRGPTQConfig; --method) or a scheme "
                f"({', '.join(SCHEMES)}; --scheme)"
            )
        return config, None
    weights, act = scheme_configs(scheme, observer=observer, clip_percentile=clip_percentile)
    if config is not None:  # only a W4A4 scheme takes its weights' solver (RTN or GPTQ) from a config
        from calibra.quant.scheme import check_weights

        check_weights(scheme, config)
        weights = config
    return weights, act.validate()


def _resolve_scheme(scheme):
    from calibra.quant.scheme import resolve_scheme

    return resolve_scheme(scheme)


def _check_smoothquant(value, act):
    from calibra.quant.smoothquant import parse_smoothquant

    return parse_smoothquant(value, act)


def _check_kv_cache(kv_cache):
    from calibra.quant.scheme import check_kv_cache

    return check_kv_cache(kv_cache)


def _refuse_for_act_quant(
    scheme, kv_cache, stats, act_ranges, calibration, mixed_precision, stream, resume, checkpoint, export
):
    """The options an activation-quantized scheme or an FP8 KV cache does not combine with (yet), refused
    before anything loads. Returns the checkpoint setting (off: the layer checkpoints hold no activation or
    KV-cache scales, so they are not written)."""
    what = f"--scheme {scheme}" if scheme is not None else f"--kv-cache {kv_cache}"
    refusals = [
        (
            scheme is not None and stats is not None,
            "--stats (the scheme calibrates its weights, smoothing and static scales in its own pass)",
        ),
        (
            scheme is not None and (act_ranges or (isinstance(calibration, (str, Path)) and _is_ranges(calibration))),
            "--act-ranges / an activation_ranges.json (RTN's smoothing; w8a8 searches its own, --smoothquant)",
        ),
        (scheme is not None and mixed_precision is not None, "--mixed-precision"),
        (stream is True, "--stream (a streamed job does not calibrate activation or KV-cache scales yet)"),
        (resume, "--resume (the layer checkpoints do not hold activation or KV-cache scales)"),
        (checkpoint is True, "checkpoint=True (the layer checkpoints do not hold activation or KV-cache scales)"),
    ]
    if export is not None:
        from calibra.export import parse_formats

        others = [f for f in parse_formats(export) if f != "compressed-tensors"]
        refusals.append(
            (
                bool(others),
                f"--export {','.join(others)} (only compressed-tensors can express activation and KV-cache scales)",
            )
        )
    bad = [why for cond, why in refusals if cond]
    if bad:
        raise ValueError(f"[quantize] {what} does not combine with " + "; ".join(bad))
    return False


def _is_ranges(path) -> bool:
    from calibra.quant.act_ranges import is_ranges_file

    return is_ranges_file(path)


# ---------------------------------------------------------------------------------------- pieces


def quantize(
    model,
    config=None,
    calibration=None,
    *,
    scheme: str | None = None,
    act_observer: str = "absmax",
    act_clip_percentile: float = 99.99,
    smoothquant=None,
    kv_cache: str | None = None,
    stats=None,
    output=None,
    overwrite: bool = False,
    evaluate: bool | None = None,
    act_ranges: bool = False,
    act_percentile: float = 99.9,
    smooth_alpha: float = 0.5,
    mixed_precision: float | None = None,
    device=None,
    dtype="float32",
    hessian_dtype="float32",
    tokenizer=None,
    eval_dataset="builtin",
    eval_seq_len: int | None = None,
    eval_stride: int | None = None,
    eval_max_tokens: int | None = REPORT_EVAL_TOKENS,
    eval_top_k: int = 64,
    export: str | None = None,
    progress: bool = True,
    echo=print,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    resume: bool = False,
    checkpoint: bool | None = None,
    dry_run: bool = False,
    stream: bool | None = None,
    preset: str | None = None,
):
    """Quantize ``model`` with ``config``; return ``(QuantizedModel, report)``.

    Args:
        model: ``"builtin:NAME"``, a local Hugging Face folder, or a loaded ``*ForCausalLM`` (modified in place).
        config: ``RTNConfig``, ``GPTQConfig`` or ``MRGPTQConfig`` -- validated, with every layer's shape,
            before any weight loads. None when ``scheme`` is given (or, with ``scheme="nvfp4"`` / ``"mxfp4"``,
            an RTNConfig or GPTQConfig of that format: the solver of the scheme's weights).
        scheme: an activation-quantized recipe instead of ``config`` (``calibra.quant.scheme``): ``"fp8"``
            (FP8 weights per channel, static per-tensor FP8 input scales calibrated on ``calibration``) or
            ``"fp8-dynamic"`` (the same weights, per-token FP8 inputs; data-free), ``"w8a8"`` (alias
            ``"int8"``: int8 weights per channel by GPTQ, per-token int8 inputs, SmoothQuant strength searched
            per layer), ``"w8a8-static"`` (static per-tensor int8 input scales), ``"nvfp4"`` (W4A4: NVFP4
            weights, NVFP4 inputs with per-16 scales under a calibrated global scale) or ``"mxfp4"`` (W4A4:
            MXFP4 weights and dynamic MXFP4 inputs). The evaluation and the saved model simulate the
            quantized inputs (and KV cache) as the engine computes them.
        act_observer: a static scheme's scales: ``"absmax"`` (default), ``"percentile"`` (the
            ``act_clip_percentile``-th percentile of each input's magnitudes; larger values saturate) or
            ``"mse"`` (the shrink factor of the absmax with the least measured error, ``calibra.quant.act_mse``).
        smoothquant: the w8a8 schemes' SmoothQuant strength: ``"search"`` (default: per layer, the measured
            best of none and alpha 0..1, ``calibra.quant.smoothquant``), ``"off"`` or a fixed alpha.
        kv_cache: ``"fp8"``: calibrate per-layer k/v scales (``calibra.quant.kv_fp8``) and quantize the KV
            cache with them; combines with any ``config`` or ``scheme`` (needs calibration data).
        calibration: a ``calibra.data.CalibrationConfig`` (default: 128 x min(context, 2048) tokens of builtin text), a
            ``TokenizedCalibration``, ``(input_ids, attention_mask)``, or the path of an
            ``activation_ranges.json`` (RTN: reuse its smoothing factors). RTN alone needs no data.
        stats: a ``CalibrationStats`` or its file: GPTQ/MR-GPTQ solve from these Hessians without a forward
            pass (needs ``true_sequential=False``: re-collecting needs the forward pass).
        output: write the quantized folder there (atomic; an existing folder needs ``overwrite``).
        evaluate: perplexity (baseline and quantized) and KL against the unquantized model on the held-out
            ``eval_dataset``; default on for builtin models.
        act_ranges: RTN: collect activation ranges, fold SmoothQuant factors (``smooth_alpha``) into the
            norms before rounding, write ``activation_ranges.json`` into ``output``.
        mixed_precision: a bits-per-weight budget: the most sensitive modules are promoted (8-bit int, or
            dense for FP4) while the average stays within it (see ``calibra.quant.mixed``).
        export: engine format(s) for ``output`` (``calibra.export.FORMATS``: compressed-tensors, gptq, mlx,
            gguf-q4_0, gguf-q8_0, dense; comma-separated for several); ``None`` writes calibra's own folder.
        allow_pickle, trust_remote_code: see ``calibra.io.inspect_model`` (both refused by default).
        hessian_dtype: ``"float32"`` (default) or ``"float64"`` Hessian sums. Under ``torchrun`` (or in an
            initialized process group) the calibration samples are split over the ranks, each layer's
            statistics summed across them in float64 before every rank solves it, and rank 0 writes and
            evaluates (``calibra.jobs.distributed``; every method and placement but the activation schemes
            and GPTAQ; ``resume`` needs the same number of ranks).
        checkpoint: commit every finished layer into a work folder beside ``output``
            (``calibra.io.checkpoint``; default: on when ``output`` is given); removed once the output is written.
        resume: continue a killed or failed run from those checkpoints; refused when the model, the
            settings, the calibration data or the versions differ. The output equals an uninterrupted run's.
        dry_run: check everything, print the memory plan (``calibra.jobs.plan``) and return ``(None, {"plan": ...})``
            without loading a weight.
        stream: read the model one decoder layer at a time from its safetensors shards and write the result
            layer by layer (``calibra.io.streamed``, ``calibra.export.streamed``), so host memory holds one
            layer, not the model. ``None`` (default): stream when the whole model would not fit the memory
            plan. A streamed job needs ``output``, writes calibra's folder or compressed-tensors (its shards
            go to the checkpoint work folder layer by layer, so ``resume`` continues it too), runs mixed
            precision's sensitivity pass and RTN's activation-ranges pass layer by layer from disk too, and
            does not yet calibrate activation / KV-cache scales (``scheme``, ``kv_cache``); the returned
            QuantizedModel holds the weightless model and slim layer records (shapes and settings).
        preset: ``"best"``: the combination measured best for int GPTQ, applied to ``config`` (default
            ``GPTQConfig()``): GPTAQ with its per-Linear choice against GPTQ (``calibra.quant.presets``).
    """
    from calibra.calib import CalibrationStats
    from calibra.data import CalibrationConfig
    from calibra.export.writer import check_target
    from calibra.jobs.distributed import refuse as refuse_distributed
    from calibra.jobs.skeleton import Job
    from calibra.models import get_adapter
    from calibra.quant import RTNConfig, check_layers
    from calibra.quant import act_ranges as ar

    job = Job.for_call("quantize", locals(), label="quantized", reference_name="the unquantized model")
    say, world = job.say, job.world
    progress = job.bars  # one rank draws the bars
    hessian_dtype = job.hessian_dtype(hessian_dtype)
    # -- 1. everything that needs no weights ---------------------------------------------------------
    scheme = _resolve_scheme(scheme)  # int8 -> w8a8
    if preset is not None:
        from calibra.quant.presets import apply_preset

        if scheme is not None:
            raise ValueError(f"[quantize] preset {preset!r} is a weight-only recipe; it does not take a scheme")
        config = apply_preset(preset, config)
    config, act = _check_scheme(config, scheme, act_observer, act_clip_percentile)
    smooth = _check_smoothquant(smoothquant, act)
    kv_cache = _check_kv_cache(kv_cache)
    if act is not None or kv_cache is not None:
        checkpoint = _refuse_for_act_quant(
            scheme, kv_cache, stats, act_ranges, calibration, mixed_precision, stream, resume, checkpoint, export
        )
    config = _check_config(config)
    # "is_rtn": a data-free RTN job; RTN whose clipping is searched on the output error reads Hessians and
    # runs through the calibration runner as GPTQ does
    is_rtn = isinstance(config, RTNConfig) and not config.needs_hessian
    ranges_file = None
    if isinstance(calibration, (str, Path)):
        if ar.is_ranges_file(calibration):
            ranges_file = str(calibration)
            calibration = None
        else:
            calibration = CalibrationConfig(dataset=str(calibration))
    if getattr(config, "awq", False):  # AWQ (calibra.quant.awq): what it does not combine with yet
        from calibra.quant.awq import refuse_for_awq

        refuse_for_awq(resume=resume, act_ranges=bool(act_ranges or ranges_file))
    if getattr(config, "gptaq", False):  # GPTAQ (calibra.quant.gptaq) pairs two input streams of one pass
        if resume:
            raise ValueError(
                "[quantize] --resume with GPTAQ is not implemented: the checkpoints hold the quantized model's "
                "layer inputs, not the full-precision stream GPTAQ pairs them with; rerun without --resume"
            )
        if stats is not None:
            raise ValueError(
                "[quantize] GPTAQ needs the calibration pass itself (it pairs the full-precision and the quantized "
                "model's inputs of every Linear); a statistics file has neither: drop --stats or --gptaq"
            )
    if (act_ranges or ranges_file) and isinstance(config, RTNConfig) and config.needs_hessian:
        raise ValueError(
            "[quantize] activation ranges / smoothing and clip_metric 'output' are not combined (the clip "
            "search reads unsmoothed Hessians); drop --act-ranges or use --clip mse"
        )
    if (act_ranges or ranges_file) and not is_rtn:
        raise ValueError(
            "[quantize] activation ranges / smoothing apply to RTN only (GPTQ solves on the "
            "unsmoothed Hessians); drop --act-ranges or use --method rtn"
        )
    if act_ranges and ranges_file:
        raise ValueError(
            "[quantize] give either act_ranges=True (collect ranges) or an activation_ranges.json "
            "as calibration, not both"
        )
    if mixed_precision is not None and (
        isinstance(mixed_precision, bool)
        or not isinstance(mixed_precision, (int, float))
        or not 1.0 <= mixed_precision <= 16.0
    ):
        raise ValueError(
            f"[quantize] mixed_precision must be a bits-per-weight budget in [1, 16], got {mixed_precision!r}; e.g. 4.5"
        )
    true_seq = bool(getattr(config, "true_sequential", False))
    if stats is not None and not is_rtn and true_seq:
        raise ValueError(
            "[quantize] a statistics file skips the forward pass, but true_sequential=True re-collects "
            "Hessians inside every layer; set true_sequential=False (--no-true-sequential) to use "
            "--stats, or drop --stats"
        )
    if export is not None:
        from calibra.export import parse_formats

        export = parse_formats(export)  # unknown names fail here, before anything loads
        if output is None:
            raise ValueError("[quantize] export needs an output folder (output=DIR / --output DIR)")
    if output is not None:
        check_target(output, overwrite, tag="quantize")
    if isinstance(calibration, CalibrationConfig):
        calibration.validate()
    model_config = job.open_config()
    if kv_cache is not None:
        from calibra.models.registry import ADAPTERS, supported_architectures

        if getattr(model_config, "model_type", None) not in ADAPTERS:  # the stand-in cache hooks the attention
            raise ValueError(
                f"[quantize] --kv-cache needs an explicit adapter (the attention module that writes the cache); "
                f"model_type={getattr(model_config, 'model_type', None)!r} has none; supported: "
                f"{', '.join(supported_architectures())}"
            )
    shape_model = model if not isinstance(model, (str, Path)) else meta_model(model_config)
    shape_adapter = get_adapter(shape_model)
    targets = all_targets(shape_model, shape_adapter)
    check_layers(config, {t.name: t.in_features for t in targets})
    export_dense: dict[str, str] = {}
    if export is not None:  # what an engine format refuses whatever the weights: before loading them
        from calibra.export import kept_dense, precheck
        from calibra.quant import MRGPTQConfig
        from calibra.quant import mixed as mp

        one_scheme = [f for f in export if f in ("compressed-tensors", "gptq", "mlx")]
        if mixed_precision is not None and one_scheme and mp.promoted(config) is not None:
            raise ValueError(
                f"[quantize] mixed precision promotes the most sensitive modules to int{mp.promoted(config).bits}, "
                f"and --export {one_scheme[0]} writes one scheme per checkpoint: write calibra's folder (no "
                f"--export) or drop --mixed-precision"
            )

        precheck(
            export,
            [t.name for t in targets],
            rotated=isinstance(config, MRGPTQConfig),
            transposed=[t.name for t in targets if t.transposed],
        )
        # widths a format cannot hold (a ragged last group where its loader needs whole groups, GPTQ's and
        # GGUF's multiples of 32): those Linears stay dense, recorded, instead of refusing the model
        export_dense = kept_dense(
            export, {t.name: (t.out_features, t.in_features) for t in targets}, getattr(config, "group_size", -1)
        )
        if export_dense:
            say(
                f"[quantize] {len(export_dense)} module(s) kept dense for --export {','.join(export)}: "
                + "; ".join(f"{n} ({why})" for n, why in list(export_dense.items())[:3])
                + (" ..." if len(export_dense) > 3 else "")
            )
    needs_data = (
        (not is_rtn)
        or act_ranges
        or mixed_precision is not None
        or (act is not None and act.needs_data)
        or kv_cache is not None
    )
    if stats is not None and not isinstance(stats, CalibrationStats):
        stats = CalibrationStats.load(stats)
    if needs_data and stats is None and isinstance(calibration, (CalibrationConfig, type(None))):
        from calibra.data import resolve_config

        calibration, _ = resolve_config(
            calibration or CalibrationConfig(), model_config, echo=say, print_estimate=False, observers=["hessian"]
        )
    do_eval = evaluate if evaluate is not None else job.source.startswith("builtin:")
    checkpoint = output is not None if checkpoint is None else bool(checkpoint)
    if resume and (output is None or not checkpoint):
        raise ValueError("[quantize] resume needs an output folder and checkpoints (output=DIR, checkpoint on)")
    from calibra.export.streamed import refuse_format

    data_pass = needs_data and stats is None
    plan = job.choose_plan(
        stream=stream,
        unsupported=[
            (getattr(config, "awq", False), "AWQ is not implemented for it yet: drop --awq"),
            (getattr(config, "gptaq", False), "GPTAQ is not implemented for it yet: drop --gptaq"),
            (
                act is not None or kv_cache is not None,
                "activation / KV-cache quantization (--scheme, --kv-cache) is not implemented for it yet",
            ),
        ],
        check_streamed=lambda: refuse_format(export, lambda: shape_model),
        calibration=calibration if data_pass and isinstance(calibration, CalibrationConfig) else None,
        group_size=getattr(config, "group_size", None),
        needs_data=data_pass,
        solver="rtn" if is_rtn else "gptq",
        replay=true_seq and not is_rtn and stats is None,
        checkpoint=checkpoint and output is not None,
        sensitivity=mixed_precision is not None and stats is None,
        ranges=bool(act_ranges),
    )
    streaming = job.streaming
    refuse_distributed(
        world,
        "quantize",
        [
            (getattr(config, "gptaq", False), "GPTAQ is not distributed yet"),
            (act is not None or kv_cache is not None, "--scheme / --kv-cache are not distributed yet"),
        ],
    )
    if dry_run:
        return None, {"plan": plan.to_dict()}
    ck = None
    if checkpoint and output is not None:
        from calibra.quant import resume as qresume

        open_ck = lambda: qresume.open_checkpoints(  # noqa: E731
            model,
            output,
            config,
            calibration,
            stats,
            resume=resume,
            overwrite=overwrite,
            options={
                "dtype": dtype,
                "act_ranges": act_ranges,
                "ranges_file": ranges_file,
                "mixed_precision": mixed_precision,
                "export": export,
                "smooth_alpha": smooth_alpha,
                "act_percentile": act_percentile,
                "streamed": streaming,  # a streamed job checkpoints records of its shards, not the tensors
                "hessian_dtype": str(hessian_dtype),
                **world.fingerprint(),
            },
            echo=say,
        )
        ck = world.checkpoints(open_ck, "quantize")
    if not world.writer:  # rank 0 writes, checkpoints and evaluates; the others only compute
        output, do_eval = None, False
    # the work itself is in _run, so that a failure can keep (OOM) or drop the checkpoints
    run = _run_streamed if streaming else _run
    args = locals()
    return job.guarded(ck, lambda: run(**args))


def _run(
    *,
    model,
    config,
    calibration,
    stats,
    output,
    overwrite,
    evaluate,
    act_ranges,
    act_percentile,
    smooth_alpha,
    mixed_precision,
    device,
    dtype,
    tokenizer,
    export,
    progress,
    ck,
    job,
    world,
    hessian_dtype,
    say,
    is_rtn,
    ranges_file,
    true_seq,
    model_config,
    needs_data,
    do_eval,
    plan,
    scheme,
    act,
    kv_cache,
    smooth=None,
    preset=None,
    export_dense=None,
    **_,
):
    from calibra.calib import LayerRunner, model_identity
    from calibra.data import CalibrationConfig
    from calibra.jobs.common import InMemoryLayers, read_model
    from calibra.models import get_adapter
    from calibra.quant import act_ranges as ar
    from calibra.quant import mixed as mp
    from calibra.quant import resume as qresume
    from calibra.quant import save as qsave
    from calibra.quant.apply import LayerQuantizer
    from calibra.quant.model import QuantizedModel

    # -- 2. load -------------------------------------------------------------------------------------
    meter = job.meter
    if isinstance(model, (str, Path)):
        model, loaded_tok = read_model(model, dtype, **job.read)
        tokenizer = tokenizer or loaded_tok
    model.eval()
    if plan.placement.startswith("whole model"):  # it fits: no per-layer transfers (calibra.jobs.plan)
        model.to(plan.device)
    adapter = get_adapter(model)
    meter.mark("load")
    ev = job.reference(model, tokenizer) if do_eval else None

    tokens_cache = {}

    def tokens():  # (a distributed job's: this rank's share of the samples)
        if "v" not in tokens_cache:
            ids, mask, meta, bs, fp = job.calibration_tokens(calibration or CalibrationConfig(), tokenizer, model)
            if ck is not None:  # a resume on other data is refused here, before any layer runs
                ck.check_data(fp)
            tokens_cache["v"] = (ids, mask, meta, bs, fp)
        return tokens_cache["v"][:4]

    t_cal = 0.0
    report_extra: dict = {}
    files: dict = {}
    # -- 3. activation ranges (RTN) ------------------------------------------------------------------
    smoothed: list[str] = []
    if act_ranges or ranges_file:
        if ranges_file:
            doc = ar.load(ranges_file)
        else:
            t0 = time.perf_counter()
            ids, mask, meta, bs = tokens()
            rstats = LayerRunner(
                model,
                adapter,
                device=device,
                observers=("ranges",),
                progress=progress,
                desc="activation ranges",
                combine=world.combine(),
            ).run(ids, mask, batch_size=bs)
            doc = ar.build(rstats, model, adapter, percentile=act_percentile, alpha=smooth_alpha)
            doc["calibration"] = meta
            t_cal += time.perf_counter() - t0
        smoothed = ar.apply_smoothing(doc, model)
        files["activation_ranges.json"] = doc
        report_extra["activation_ranges"] = dict(
            ar.summary(doc), source=ranges_file or "collected", smoothed_modules=smoothed
        )

    # -- 4. mixed precision --------------------------------------------------------------------------
    overrides = {}
    if stats is not None:
        _check_stats_model(stats, model_identity(model))
    if mixed_precision is not None:
        t0 = time.perf_counter()
        mstats = stats
        if mstats is None:
            ids, mask, meta, bs = tokens()
            mstats = LayerRunner(
                model,
                adapter,
                device=device,
                observers=("hessian",),
                progress=progress,
                desc="sensitivity",
                hessian_dtype=hessian_dtype,
                combine=world.combine(),
            ).run(ids, mask, batch_size=bs)
        base = mp.base_rtn(config)
        sens = mp.sensitivities([(t, base) for t in all_targets(model, adapter)], mstats)
        overrides, report_extra["mixed_precision"] = _mixed_plan(model, adapter, sens, config, mixed_precision, say)
        t_cal += time.perf_counter() - t0

    # -- 5. quantize layer by layer ------------------------------------------------------------------
    overrides.update(dict.fromkeys(export_dense or {}))  # None: kept dense (widths an export format cannot hold)
    quantizer = LayerQuantizer(config, adapter, overrides=overrides)
    quantizer.parallel = world if world.distributed else None  # a group's solves split over the ranks
    t0 = time.perf_counter()
    final_stats = stats
    run_meta = None
    loop = InMemoryLayers(adapter, quantizer, ck, restore=qresume.restore, saver=qresume.LayerSaver)
    input_quant = None
    if smooth is not None:  # --scheme w8a8: smoothing searched, GPTQ and input scales in one pass
        from calibra.quant import w8a8

        ids, mask, run_meta, bs = tokens()
        input_quant, final_stats, report_extra["smoothquant"] = w8a8.run(
            model, adapter, quantizer, ids, mask, bs, run_meta, device, progress, act, smooth
        )
    elif act is not None and not is_rtn:  # W4A4 with GPTQ weights: the w8a8 pass without smoothing
        from calibra.quant import w8a8

        ids, mask, run_meta, bs = tokens()
        input_quant, final_stats, _ = w8a8.run(
            model, adapter, quantizer, ids, mask, bs, run_meta, device, progress, act, None
        )
    elif act is not None and not act.dynamic:  # static scales: calibrated while the weights are quantized
        ids, mask, run_meta, bs = tokens()
        input_quant, final_stats = _static_fp8_pass(
            model, adapter, quantizer, ids, mask, bs, run_meta, device, progress, act
        )
    elif is_rtn or stats is not None:
        loop.resume(None if stats is None else "stats")
        loop.run_data_free(lambda i, layer, _: quantizer(i, layer, stats), progress=progress, desc="quantizing")
    else:
        ids, mask, run_meta, bs = tokens()
        runner = LayerRunner(
            model,
            adapter,
            device=device,
            observers=("hessian",),
            on_layer=quantizer,
            feed_compressed=True,
            progress=progress,
            desc=f"{config.method}",
            keep_layer_stats=False,  # each layer's Hessians are consumed by on_layer
            collect_on_demand=true_seq,
            hessian_dtype=hessian_dtype,
            combine=world.combine(),
            gptaq=bool(getattr(config, "gptaq", False)),  # the full-precision stream beside the quantized one
        )  # true-sequential: each group's when it is solved
        if true_seq:
            quantizer.collect, quantizer.freeze = runner.collect, runner.freeze
            quantizer.input_groups = runner.input_groups
        # the runner drops each layer's statistics with the layer (keep_layer_stats=False): the solver may
        # work in their memory and in the weights' (the same numbers; no second copy of H or W)
        quantizer.consume, quantizer.release = True, runner.release
        loop.resume(tokens_cache["v"][4], runner)
        final_stats = loop.run_calibrated(runner, ids, mask, run_meta, bs)
    t_quant = time.perf_counter() - t0
    t_solve = sum(ql.log.seconds for ql in quantizer.layers.values())
    t_cal += max(0.0, t_quant - t_solve) if not (is_rtn or stats is not None) or input_quant else 0.0
    if act is not None and act.dynamic and input_quant is None:
        from calibra.quant.activations import dynamic_input_quant

        input_quant = dynamic_input_quant(quantizer.layers, format=act.format)
    sim = _simulate_inputs(model, input_quant) if input_quant is not None else {}
    kv_scales = None
    if kv_cache is not None:  # on the finished model: K/V as the quantized model writes them
        from calibra.quant import kv_fp8

        t0 = time.perf_counter()
        ids, mask, meta, bs = tokens()
        run_meta = run_meta or meta
        kv_scales = _kv_scales_pass(model, adapter, ids, mask, bs, device, progress)
        kv_fp8.install(model, adapter, kv_scales)
        t_cal += time.perf_counter() - t0
    if act is not None:
        report_extra["activation_quant"] = {"scheme": scheme, **act.to_dict(), **sim}
        report_extra["activation_quant"]["modules"] = {n: iq.to_dict() for n, iq in sorted(input_quant.items())}
    if kv_scales is not None:
        from calibra.quant import kv_fp8

        report_extra["kv_cache"] = {"format": kv_cache, "scales": kv_fp8.scales_to_dict(adapter, kv_scales)}
    if quantizer.awq is not None:  # AWQ: per group, the alpha chosen and the output loss before/after
        report_extra["awq"] = quantizer.awq.report()
    if getattr(config, "gptaq", False):  # experts are solved as plain GPTQ (no pairing of routed tokens)
        solved = [n for n, ql in quantizer.layers.items() if ql.method == "gptq"]
        experts = [n for n in solved if ".experts." in n]
        report_extra["gptaq"] = {
            "alpha": config.gptaq_alpha,
            "corrected_modules": len(solved) - len(experts),
            "plain_gptq_experts": len(experts),
        }
        if config.gptaq_choose:  # per Linear: the solve kept (each module's log row has both errors)
            kept = [ql.log.choice["kept"] for ql in quantizer.layers.values() if ql.log.choice]
            report_extra["gptaq"]["kept"] = {k: kept.count(k) for k in sorted(set(kept) | {"gptaq", "gptq"})}
    if preset is not None:
        report_extra["preset"] = preset
    meter.mark("layers")  # (with evaluation: the reference logits collected before the layers too)

    # -- 6. evaluate, report, write --------------------------------------------------------------------
    eval_block = ev.finish(model) if ev is not None else None
    if ev is not None:
        meter.mark("evaluation")
    report = _report(
        source=job.source,
        model=model,
        adapter=adapter,
        config=config,
        calibration=calibration,
        run_meta=run_meta,
        needs_data=needs_data,
        stats=stats,
        true_seq=true_seq,
        is_rtn=is_rtn,
        device=device,
        dtype=dtype,
        act_ranges=bool(act_ranges or ranges_file),
        mixed_precision=mixed_precision,
        quantizer=quantizer,
        overrides=overrides,
        smoothed=smoothed,
        plan=plan,
        extra=report_extra,
        export_dense=export_dense,
    )
    report["settings"]["scheme"] = scheme
    report["settings"]["kv_cache"] = kv_cache
    job.record_run(report, quantizer, hessian_dtype)
    report_moe_coverage(report, final_stats, say)
    if eval_block is not None:
        report["eval"] = eval_block
    report["timings"] = {
        "calibration": t_cal,
        "solve": t_solve,
        "eval": ev.seconds if ev else 0.0,
        "per_layer": quantizer.layer_seconds,
        "total": job.seconds(),
    }
    qm = QuantizedModel(
        model=model,
        tokenizer=tokenizer,
        layers=quantizer.layers,
        config=config,
        source=job.source,
        report=report,
        scheme=scheme,
        input_quant=input_quant,
        kv_scales=kv_scales,
    )
    if output is not None:
        meter.into(report, "save")
        report["timings"]["total"] = job.seconds()
        report["output"] = str(output)
        if ck is not None and ck.resumed_from:
            report["resumed_from_layer"] = ck.resumed_from
        if export is None:
            qsave.write(qm, output, overwrite=overwrite, report=report, extra_files=files)
        else:
            _export(qm, output, export, overwrite, report, files)
        if ck is not None:
            ck.finish()
    return qm, report


def _static_fp8_pass(model, adapter, quantizer, ids, mask, bs, run_meta, device, progress, act):
    """One calibration pass that quantizes each layer's weights (RTN) and calibrates its Linears' static
    input scales (``ranges`` observer; FP8, or NVFP4's global scales), then simulates them at once, so every
    later layer calibrates on what the deployed model feeds it. Returns ``({module: InputQuant}, final
    statistics)``."""
    from calibra.calib import LayerRunner
    from calibra.quant import activations
    from calibra.quant.apply import layer_targets

    dtype = next(model.parameters()).dtype
    input_quant: dict = {}

    def on_layer(i, layer, st):
        shrink = None
        if act.observer == "mse":  # measured on the very inputs behind the ranges: before the weights round
            from calibra.quant.act_mse import choose_shrink

            targets = layer_targets(adapter, i, layer)
            shrink, _ = choose_shrink(runner, i, layer, st, targets, dtype, act.format)
        quantizer(i, layer, None)  # RTN: no statistics needed
        targets = [t for t in layer_targets(adapter, i, layer) if t.name in quantizer.layers]
        clip = act.clip_percentile if act.observer == "percentile" else None
        input_quant.update(activations.static_input_quant(st, targets, dtype, clip, format=act.format, shrink=shrink))
        activations.install(model, input_quant)

    runner = LayerRunner(
        model,
        adapter,
        device=device,
        observers=("ranges",),
        on_layer=on_layer,
        feed_compressed=True,
        progress=progress,
        desc=f"{act.format} weights + input scales",
        keep_layer_stats=False,
    )
    final = runner.run(ids, mask, batch_size=bs, extra_metadata={"runs": [run_meta]})
    return input_quant, final


def _mixed_plan(model, adapter, sens: dict, config, budget, say) -> tuple[dict, dict]:
    """``(overrides, the report's mixed_precision block)``: mixed precision's solve (``quant.mixed.plan``) on
    every target's sensitivity ``sens``, the same for both placements."""
    from calibra.quant import mixed as mp

    targets = all_targets(model, adapter)
    mplan = mp.plan(targets, sens, config, float(budget))
    overrides = mplan.pop("overrides")
    say(
        f"mixed precision: {len(mplan['promoted'])} of {len(targets)} modules promoted to "
        f"{mplan['promoted_to']}; {mplan['avg_bits_per_weight']:.3f} bits/weight (budget {budget})"
    )
    return overrides, mplan


def _streamed_sensitivities(loop, runner_for, config, stats, tokens, *, device, progress) -> dict:
    """Mixed precision's sensitivity pass, layer by layer from disk (``loop``: the job's StreamedLayers, whose
    ``weights`` load each layer): every target of a layer scored (``quant.mixed.sensitivities``) on that
    layer's statistics -- from a calibration pass over ``tokens()`` (``runner_for(on_layer)``: a LayerRunner
    over the unquantized layers, each layer's statistics dropped with it) or from ``stats`` -- then the layer
    released. The scores are the whole-model pass's, which scores every layer at the end."""
    from calibra.jobs.common import layer_loop
    from calibra.quant import mixed as mp
    from calibra.quant.apply import layer_targets

    base = mp.base_rtn(config)
    sens: dict[str, float] = {}
    adapter = loop.adapter

    def score(i, layer, st):
        sens.update(mp.sensitivities([(t, base) for t in layer_targets(adapter, i, layer)], st))

    if stats is not None:
        layer_loop(
            adapter,
            lambda i, layer, _: score(i, layer, stats),
            None,
            progress=progress,
            desc="sensitivity (streamed)",
            weights=loop.weights,
            device=device,
        )
    else:
        ids, mask, _, bs, _ = tokens()
        runner_for(score).run(ids, mask, batch_size=bs)
    return sens


def _streamed_ranges(loop, runner, tokens, ranges_file, percentile, alpha, sink, *, progress):
    """``(activation-ranges document, smooth_layer(i, layer))`` of a streamed RTN job: the document from
    ``ranges_file`` or from a streamed pass with the ``ranges`` observer (each layer's ranges and smoothing
    factors taken while it is loaded, ``quant.act_ranges.module_ranges`` / ``layer_smoothing``: the
    whole-model ``build``'s numbers); ``smooth_layer`` folds a loaded layer's factors into its norms and
    Linears (``apply_smoothing``) and marks the norms for ``sink`` to write as changed. A file that names a
    module outside the decoder layers is refused before any layer is read."""
    from calibra.quant import act_ranges as ar

    adapter = loop.adapter
    names = [adapter.layer_name(i) + "." for i in range(len(adapter.layers))]

    def layer_of(module: str) -> int:
        i = next((k for k, pre in enumerate(names) if module.startswith(pre)), None)
        if i is None:
            raise ValueError(
                f"[quantize] activation ranges name {module}, which this model lacks; calibrate the ranges on "
                f"this model"
            )
        return i

    if ranges_file:
        doc = ar.load(ranges_file)
        for norm in doc["smooth_factor"]:
            layer_of(norm)
    else:
        ar.check_settings(percentile, alpha)
        ranges: dict = {}
        smooth: dict = {}

        def collect(i, layer, st):
            ranges.update(ar.module_ranges(st, percentile))
            smooth.update(ar.layer_smoothing(st, adapter, i, layer, alpha))

        ids, mask, meta, bs, _ = tokens()
        runner(collect, observers=("ranges",), desc="activation ranges (streamed)").run(ids, mask, batch_size=bs)
        doc = ar.document(ranges, smooth, percentile, alpha)
        doc["calibration"] = meta
    by_layer: dict[int, dict] = {}
    for norm, entry in doc["smooth_factor"].items():
        by_layer.setdefault(layer_of(norm), {})[norm] = entry
    sink_changed = getattr(sink, "changed", set())  # (a distributed job's other ranks write nothing)

    def smooth_layer(i, layer) -> None:
        entries = by_layer.get(i)
        if entries:
            ar.apply_smoothing({"smooth_factor": entries}, loop.weights.model)
            sink_changed.update(f"{norm}.weight" for norm in entries)

    return doc, smooth_layer


def _kv_scales_pass(model, adapter, ids, mask, bs, device, progress):
    """Per-layer FP8 k/v scales from one calibration pass over ``model`` as it is now (quantized,
    activations simulated): absmax of the keys and values each attention writes to its cache."""
    from calibra.calib import LayerRunner
    from calibra.quant import kv_fp8

    dtype = next(model.parameters()).dtype
    runner = LayerRunner(model, adapter, device=device, observers=(), progress=progress, desc="kv-cache scales")
    with kv_fp8.KVRecorder(model, adapter, mask=lambda: runner.token_mask) as rec:
        runner.run(ids, mask, batch_size=bs)
    return rec.scales(dtype)


def _simulate_inputs(model, input_quant) -> dict:
    """Install the hooks that quantize every quantized Linear's input as the engine will; returns what the
    report says about the simulation."""
    from calibra.quant import activations

    missing = activations.install(model, input_quant)
    return {
        "not_simulated": missing,  # modules of an architecture the hooks do not cover (expected empty)
        "fallbacks": sorted(n for n, iq in input_quant.items() if iq.fallback),
    }


def _check_stats_model(stats, identity: str) -> None:
    if stats.metadata.get("model", {}).get("id") not in (None, identity):
        raise ValueError(
            "[quantize] the statistics file was calibrated on a different model (model identity "
            "differs); calibrate this model or pass its own --stats"
        )


# ---------------------------------------------------------------------------------------- streaming
def _run_streamed(
    *,
    model,
    config,
    calibration,
    stats,
    output,
    overwrite,
    device,
    dtype,
    tokenizer,
    export,
    progress,
    job,
    say,
    is_rtn,
    true_seq,
    model_config,
    needs_data,
    plan,
    ck,
    do_eval,
    hessian_dtype,
    mixed_precision=None,
    act_ranges=False,
    ranges_file=None,
    act_percentile=99.9,
    smooth_alpha=0.5,
    export_dense=None,
    **_,
):
    """The streamed job: layers read from disk one at a time, each written to the output when finished
    (with checkpoints ``ck``: into the work folder, committed layer by layer, so --resume continues)."""
    from calibra.calib import LayerRunner, model_identity
    from calibra.data import CalibrationConfig
    from calibra.jobs.common import StreamedLayers, open_streamed_job
    from calibra.models import get_adapter
    from calibra.quant import act_ranges as ar
    from calibra.quant.apply import LayerQuantizer
    from calibra.quant.model import QuantizedModel
    from calibra.quant.streamed_load import open_streamed_quantized

    meter = job.meter
    weights, tokenizer = open_streamed_job(model, model_config, dtype, job.read, job.source, "quantize", tokenizer)
    m = weights.model
    adapter = get_adapter(m)
    if stats is not None:
        _check_stats_model(stats, model_identity(m, weights.first_values))
    dev = job.compute_device()
    if export:
        from calibra.export import compressed_tensors as fmt

        prefix, layer_tensors = "model", _checked_ct_tensors
    else:
        from calibra.quant import save as fmt

        prefix, layer_tensors = "quantized", fmt.layer_tensors
    staging = ck.folder / "output" if ck is not None and job.world.writer else None
    sink = job.streamed_output(
        output,
        overwrite=overwrite,
        prefix=prefix,
        layer_tensors=layer_tensors,
        weights=weights,
        staging=staging,
        disk_names=bool(export),  # engine formats: the checkpoint's names (per-expert Linears)
    )
    # the streamed runner drops each layer's statistics with the layer: the solver may consume them
    quantizer = LayerQuantizer(
        config, adapter, overrides=dict.fromkeys(export_dense or {}), keep_dense=False, consume=stats is None
    )
    quantizer.parallel = job.world if job.world.distributed else None  # a group's solves split over the ranks
    run_meta = final_stats = None
    loop = StreamedLayers(weights, adapter, quantizer, sink, ck)
    tokens_cache: dict = {}

    def tokens():  # the calibration tokens, made once for the sensitivity pass and the layers
        if "v" not in tokens_cache:
            tokens_cache["v"] = job.calibration_tokens(calibration or CalibrationConfig(), tokenizer, m)
        return tokens_cache["v"]

    def runner(on_layer, observers=("hessian",), **kw):  # a pass reading each layer, dropping its statistics
        return LayerRunner(
            m,
            adapter,
            observers=observers,
            device=device,
            on_layer=on_layer,
            progress=progress,
            keep_layer_stats=False,
            weights=weights,
            hessian_dtype=hessian_dtype,
            combine=job.world.combine(),
            **kw,
        )

    t0 = time.perf_counter()
    report_extra: dict = {}
    overrides: dict = dict.fromkeys(export_dense or {})  # None: kept dense (widths an export format cannot hold)
    files: dict = {}
    smoothed: list[str] = []
    smooth_layer = lambda i, layer: None  # noqa: E731 - no smoothing
    t_sens = 0.0
    data_fp = None  # the data a data-free RTN job's own passes (ranges, sensitivity) read
    try:
        ev = None
        if do_eval:
            ev = job.reference(None, tokenizer, streamed_weights=weights)
            t0 = time.perf_counter()
        if ck is not None and stats is None and (act_ranges or mixed_precision is not None):
            data_fp = tokens()[4]
            ck.check_data(data_fp)  # a resume on other data is refused before any pass reads a layer
        if act_ranges or ranges_file:  # the ranges (a streamed pass, or the file), then SmoothQuant's folding
            doc, smooth_layer = _streamed_ranges(
                loop, runner, tokens, ranges_file, act_percentile, smooth_alpha, sink, progress=progress
            )
            smoothed = [n for entry in doc["smooth_factor"].values() for n in entry["modules"]]
            files["activation_ranges.json"] = doc
            report_extra["activation_ranges"] = dict(
                ar.summary(doc), source=ranges_file or "collected", smoothed_modules=smoothed
            )
            meter.mark("activation ranges")
        if mixed_precision is not None:  # the sensitivity pass, then the solve, before any layer is quantized
            sens = _streamed_sensitivities(
                loop,
                lambda score: runner(score, desc="sensitivity (streamed)"),
                config,
                stats,
                tokens,
                device=dev,
                progress=progress,
            )
            overrides, report_extra["mixed_precision"] = _mixed_plan(m, adapter, sens, config, mixed_precision, say)
            overrides.update(dict.fromkeys(export_dense or {}))
            quantizer.overrides = overrides
            meter.mark("sensitivity")
            t_sens = time.perf_counter() - t0
        if is_rtn or stats is not None:
            # (RTN with activation ranges or mixed precision depends on the calibration data too)
            loop.resume("stats" if stats is not None else data_fp)
            loop.run_data_free(
                lambda i, layer, _: (smooth_layer(i, layer), quantizer(i, layer, stats)),
                device=dev,
                progress=progress,
                desc="quantizing (streamed)",
            )
        else:
            ids, mask, run_meta, bs, fp = tokens()
            qrunner = runner(
                quantizer, feed_compressed=True, desc=f"{config.method} (streamed)", collect_on_demand=true_seq
            )
            loop.resume(fp, qrunner)  # (the runner's MoE routing statistics of the finished layers back)
            if true_seq:
                quantizer.collect, quantizer.freeze = qrunner.collect, qrunner.freeze
            quantizer.input_groups = qrunner.input_groups
            quantizer.release = qrunner.release
            final_stats = loop.run_calibrated(qrunner, ids, mask, run_meta, bs)
        t_quant = time.perf_counter() - t0
        t_solve = sum(ql.log.seconds for ql in quantizer.layers.values())
        meter.mark("layers")  # the capture (embeddings) included
        report = _report(
            source=job.source,
            model=m,
            adapter=adapter,
            config=config,
            calibration=calibration,
            run_meta=run_meta,
            needs_data=needs_data,
            stats=stats,
            true_seq=true_seq,
            is_rtn=is_rtn,
            device=device,
            dtype=dtype,
            quantizer=quantizer,
            plan=plan,
            mixed_precision=mixed_precision,
            overrides=overrides,
            act_ranges=bool(act_ranges or ranges_file),
            smoothed=smoothed,
            extra=report_extra,
            export_dense=export_dense,
        )
        report_moe_coverage(report, final_stats, say)  # the routing each layer's experts saw
        report["output"] = str(output)
        job.record_run(report, quantizer, hessian_dtype)
        if loop.done:
            report["resumed_from_layer"] = loop.done
        qm = QuantizedModel(
            model=m, tokenizer=tokenizer, layers=quantizer.layers, config=config, source=job.source, report=report
        )
        t_write = time.perf_counter()
        meter.into(report, "rest of the output" + (" and its evaluation" if ev is not None else ""))
        report["streaming"] = {"bytes_read": 0, "rss_after_layer": sink.rss_after_layer}
        report["timings"] = {
            "calibration": max(0.0, t_quant - t_solve) if not (is_rtn or stats is not None) else t_sens,
            "sensitivity": t_sens,  # (part of the calibration)
            "solve": t_solve,
            "eval": 0.0,
            "per_layer": quantizer.layer_seconds,
        }

        def write_files(folder):
            from calibra.quant.save import _write_json
            from calibra.report import write_report_html

            if export:
                fmt.write_streamed_files(qm, folder)
                report["export"] = {"formats": list(export), "streamed": True}
                for name, obj in files.items():  # beside the export, outside its manifest (as _export does)
                    _write_json(folder / name, obj)
            else:
                fmt.write_files(folder, qm, extra_files=files)
            if ev is not None:  # the folder is complete but for the report: measure it, layer by layer
                report["eval"] = job.evaluate_written(
                    ev, folder, lambda info: open_streamed_quantized(info, model_config, weights.dtype)
                )
                report["timings"]["eval"] = ev.seconds
            _stamp(report, weights, job.t_start, t_write)
            write_report_html(folder, report)  # before report.json: it adds the measured peaks
            _write_json(folder / "report.json", report)

        sink.finish(write_files)
    except BaseException as e:
        sink.abort(e)
        raise
    if ck is not None:
        ck.finish()
    return qm, report


def _checked_ct_tensors(name: str, ql) -> dict:
    """One quantized weight's compressed-tensors tensors, after the format's check of that one layer. A
    fused expert's piece named like an expert slice (Qwen-MoE's ``experts.0.down_proj``) is checked under a
    suffixed name, or the check would take it for a slice of a fused parameter of a model it is not given;
    that every expert of a fused parameter is quantized is checked by ``StreamedOutput`` itself."""
    from types import SimpleNamespace

    from calibra.export import compressed_tensors as ct
    from calibra.export.streamed import fused_slice

    ct.check(SimpleNamespace(layers={name if fused_slice(name) is None else f"{name} (rows of fused experts)": ql}))
    return ct.layer_tensors(name, ql)


def _stamp(report, weights, t_start, t_write) -> None:
    """The last numbers, taken just before report.json is written."""
    report["streaming"]["bytes_read"] = weights.bytes_read
    report["timings"]["write_rest"] = time.perf_counter() - t_write
    report["timings"]["total"] = time.perf_counter() - t_start


def _report(
    *,
    source,
    model,
    adapter,
    config,
    calibration,
    run_meta,
    needs_data,
    stats,
    true_seq,
    is_rtn,
    device,
    dtype,
    quantizer,
    plan,
    act_ranges: bool = False,
    mixed_precision=None,
    overrides=None,
    smoothed=(),
    extra=None,
    export_dense=None,
) -> dict:
    """report.json without the evaluation, MoE coverage and timings (the caller adds those); the streamed
    job has no activation ranges, mixed precision or extra sections yet."""
    overrides = overrides or {}
    extra = extra or {}
    from calibra.data import CalibrationConfig
    from calibra.export.writer import versions
    from calibra.quant import mixed as mp
    from calibra.quant import save as qsave

    rows = [ql.log.to_dict() for ql in quantizer.layers.values()]
    n_q = sum(ql.codes.numel() for ql in quantizer.layers.values())
    bits = sum(mp.bits_per_weight(overrides.get(n, config)) * ql.codes.numel() for n, ql in quantizer.layers.items())

    report = {
        "format": REPORT_FORMAT,
        "format_version": 1,
        "model": {
            "source": source,
            "model_type": getattr(model.config, "model_type", None),
            "num_layers": len(adapter.layers),
            **adapter_record(adapter),
        },
        "settings": {
            "config": qsave.config_dict(config),
            "method": config.method,
            "calibration": (
                run_meta or (dataclasses.asdict(calibration) if isinstance(calibration, CalibrationConfig) else None)
            )
            if needs_data and stats is None
            else ("stats file" if stats is not None else "none (data-free)"),
            "true_sequential": true_seq and not is_rtn and stats is None,
            "device": str(device or "auto"),
            "dtype": str(dtype),
            "act_ranges": act_ranges,
            "mixed_precision": mixed_precision,
            "lm_head": "excluded",
            "embeddings": "excluded",
            "router": "excluded",
        },
        "versions": versions(),
        "seed": calibration.seed if isinstance(calibration, CalibrationConfig) else None,
        "summary": {
            "quantized_modules": len(quantizer.layers),
            "dense_modules": sorted(quantizer.dense),
            "quantized_weights": n_q,
            "avg_bits_per_weight": bits / n_q if n_q else None,
            # module -> "<format>: <reason>": left dense because an --export format cannot hold its width
            **({"export_dense": dict(export_dense)} if export_dense else {}),
        },
        "modules": rows,
        "quantization": {"dense_modules": sorted(quantizer.dense), "smoothed_modules": sorted(smoothed)},
        "plan": plan.to_dict(),
        **extra,
    }
    return report


def adapter_record(adapter) -> dict:
    """How the model's structure was found, for the report: explicit adapter, or discovered (the layer
    stack, and the Linear-like modules of the layers that stay dense, by reason)."""
    if getattr(adapter, "explicit", True):
        return {"adapter": "explicit"}
    kept: dict[str, list[str]] = {}
    for i, layer in enumerate(adapter.layers):
        for name, why in adapter.dense_linears(layer).items():
            kept.setdefault(why, []).append(f"{adapter.layer_name(i)}.{name}")
    return {"adapter": "structural", "layer_stack": adapter.layers_prefix, "kept_dense_in_layers": kept}


def _export(qm, output, formats, overwrite, report, files) -> None:
    """Engine formats through ``calibra.export`` (checked first: a format that cannot express the model
    raises before anything is written). report.json (and activation_ranges.json) go beside the exported
    files in the same folder; they are not in calibra_manifest.json's hash list, because report.json
    holds timings and the manifest must hash identically for identical weights."""
    from calibra.export import check, export

    check(qm, formats)
    report["export"] = {"formats": formats}
    folders = export(qm, output, formats, overwrite=overwrite)
    from calibra.quant.save import _write_json
    from calibra.report import write_report_html

    write_report_html(output, report)  # before report.json: it adds the measured peaks
    for name, obj in dict(files, **{"report.json": report}).items():
        tmp = Path(output) / f".{name}.tmp"
        _write_json(tmp, obj)
        tmp.replace(Path(output) / name)
    report["export"]["folders"] = [str(f) for f in folders]


__all__ = ["quantize"]
