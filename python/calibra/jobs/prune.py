"""``calibra.prune``: model in, pruned model + report out (and, with ``output=DIR``, a folder).

The order of work is the contract with the user (FAULTS rows 10, 11, 13, 26): every check that needs no
weights runs first -- the config, the output folder, the model's config (architecture, an existing
``quantization_config``), every layer's shape against the pattern (on a weightless meta-device copy of
the model), the calibration settings -- then the model loads, the reference for evaluation is collected,
the layers are pruned one by one (calibration interleaved for Wanda and SparseGPT), the pruned model is
evaluated, and only then is anything written.

The :class:`~calibra.prune.stages.StageTracker` follows the run (idle -> calibrating -> computing
importance -> pruning, per layer -> evaluating -> exporting -> complete, or failed); its transitions
drive the progress display and its history lands in the report (``stages``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from calibra.eval.session import REPORT_EVAL_TOKENS

REPORT_FORMAT = "calibra-prune-report"
_QUANTIZED_HINT = " (joint pruning + quantization: method 'sparsegpt' with quantize=JointQuant(...) / --bits)"


def _check_config(config):
    from calibra.prune import PruningConfig

    if not isinstance(config, PruningConfig):
        raise TypeError(f"[prune] config must be a calibra.prune.PruningConfig, got {type(config).__name__}")
    return config.validate()


def _shapes(model_config, model=None) -> dict[str, tuple[int, int]]:
    """Every prunable target's ``(out, in)``, from a weightless meta copy when no model is loaded."""
    from calibra.jobs.common import all_targets, meta_model
    from calibra.models import get_adapter

    shape_model = model if model is not None else meta_model(model_config)
    return {t.name: (t.out_features, t.in_features) for t in all_targets(shape_model, get_adapter(shape_model))}


def _observers(config, measure_error: bool) -> tuple[str, ...]:
    """SparseGPT needs the Hessian; Wanda the channel norms (plus the Hessian for the reported error)."""
    if config.method_enum.value == "sparsegpt":
        return ("hessian",)
    return ("norms", "hessian") if measure_error else ("norms",)


class _Progress:
    """Stage changes as one line each (per-layer stages go to the tqdm bar's postfix, not to lines)."""

    LOUD = {"evaluating", "exporting", "complete", "failed"}

    def __init__(self, say, enabled: bool):
        self.say, self.enabled = say, enabled
        self.bar = None

    def __call__(self, old, new, tracker) -> None:
        detail = tracker.history[-1]["detail"]
        if self.bar is not None:
            self.bar.set_postfix_str(f"{new.value} {detail or ''}".strip(), refresh=False)
        if self.enabled and new.value in self.LOUD:
            self.say(f"[prune] {new.value}" + (f": {detail}" if detail else ""))


def prune(
    model,
    config,
    calibration=None,
    *,
    output=None,
    overwrite: bool = False,
    save_24: bool = False,
    evaluate: bool | None = None,
    measure_error: bool = True,
    device=None,
    dtype="float32",
    tokenizer=None,
    eval_dataset="builtin",
    eval_seq_len: int | None = None,
    eval_stride: int | None = None,
    eval_max_tokens: int | None = REPORT_EVAL_TOKENS,
    eval_top_k: int = 64,
    max_shard_bytes: int | None = None,
    progress: bool = True,
    echo=print,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dry_run: bool = False,
    resume: bool = False,
    checkpoint: bool | None = None,
    stream: bool | None = None,
    hessian_dtype="float32",
):
    """Prune ``model`` with ``config``; return ``(model, report)``.

    Args:
        model: ``"builtin:NAME"``, a local Hugging Face folder, or a loaded ``*ForCausalLM`` (modified in place).
        config: a :class:`calibra.prune.PruningConfig` -- validated, with every layer's shape against the
            pattern, before any weight loads.
        calibration: Wanda/SparseGPT data: a ``calibra.data.CalibrationConfig`` (default: ``config.calibration``,
            else 128 x min(context, 2048) tokens of builtin text), a ``TokenizedCalibration``,
            ``(input_ids, attention_mask)``, or a dataset name/path. Magnitude pruning reads no data.
        output: write the pruned folder there (see :mod:`calibra.prune.save`; atomic; an existing folder
            needs ``overwrite``).
        save_24: also write ``sparse24.safetensors`` (calibra's compressed 2:4 form; pattern 2:4 only).
        evaluate: perplexity (baseline and pruned) and KL against the dense model on the held-out
            ``eval_dataset``; default on for builtin models.
        measure_error: Wanda: also collect Hessians to report each module's reconstruction error
            (SparseGPT always has it; magnitude without data reports only the weight-space error).
        device: compute device for one layer at a time (default: CUDA if available, else CPU).
        dtype: dtype to load a model given by name/folder in (default float32).
        allow_pickle, trust_remote_code: see ``calibra.io.inspect_model`` (both refused by default).
        dry_run: check everything, print the memory plan (``calibra.jobs.plan``) and return ``(None, {"plan": ...})``
            without loading a weight.
        checkpoint: commit every finished layer into a work folder beside ``output``
            (``calibra.prune.resume``; default: on when ``output`` is given); removed once the output is written.
        resume: continue a killed or failed run from those checkpoints; refused when the model, the
            settings, the calibration data or the versions differ (FAULTS rows 22-24).
        stream: read the model one decoder layer at a time from its shards and write each pruned layer as it
            is finished (``None``: when the whole model would not fit the memory plan; see
            ``calibra.quantize``). Pruned weights are written in their stored dtype (bf16 stays bf16; the
            whole-model job writes ``dtype``) under the checkpoint's names (an MoE checkpoint's experts per
            expert, as the whole-model job saves them); the shards go to the checkpoint work folder layer by
            layer, so ``resume`` continues it too; no --save-24 or joint quantization yet. The returned
            model is the weightless one.
        hessian_dtype: ``"float32"`` (default) or ``"float64"`` Hessian and channel-norm sums; float64 under
            ``torchrun`` (the sum over the ranks then does not depend on their number).

    Returns ``(model, report)``: the pruned model (dense weights with zeros) and the report dict
    (the content of ``report.json``; the written path under ``report["output"]``).
    """
    from calibra.data import CalibrationConfig
    from calibra.export.writer import check_target
    from calibra.jobs.common import InMemoryLayers, read_model, report_moe_coverage
    from calibra.jobs.skeleton import Job
    from calibra.models import get_adapter
    from calibra.prune import StageTracker
    from calibra.prune import resume as presume
    from calibra.prune import save as psave
    from calibra.prune.apply import LayerPruner
    from calibra.prune.patterns import NM
    from calibra.prune.stages import PruningStage as S

    job = Job.for_call("prune", locals(), label="pruned", reference_name="the dense model")
    say, world = job.say, job.world
    progress = job.bars  # one rank draws the bars
    hessian_dtype = job.hessian_dtype(hessian_dtype)
    # -- 1. everything that needs no weights ---------------------------------------------------------
    config = _check_config(config)
    needs_data = config.requires_calibration()
    calibration = config.calibration if calibration is None else calibration
    if isinstance(calibration, (str, Path)):
        calibration = CalibrationConfig(dataset=str(calibration))
    pattern = config.pattern_obj
    if save_24 and not (isinstance(pattern, NM) and (pattern.n, pattern.m) == (2, 4)):
        raise ValueError(
            f"[prune] save_24 (--save-24) writes calibra's compressed 2:4 form, which needs pattern 2:4; "
            f"the pattern is {pattern}"
        )
    if output is not None:
        check_target(output, overwrite, tag="prune")
    checkpoint = output is not None if checkpoint is None else bool(checkpoint)
    if resume and (output is None or not checkpoint):
        raise ValueError("[prune] resume needs an output folder and checkpoints (output=DIR, checkpoint on)")
    if isinstance(calibration, CalibrationConfig):
        calibration.validate()
    model_config = job.open_config(_QUANTIZED_HINT)
    shapes = _shapes(model_config, None if isinstance(model, (str, Path)) else model)
    prune_names, dense = config.plan_layers(shapes)
    if save_24:
        bad = [f"{n} (in_features {shapes[n][1]})" for n in prune_names if shapes[n][1] % 16]
        if bad:
            raise ValueError(
                f"[prune] the compressed 2:4 form packs 16 columns per metadata word, so in_features must "
                f"be a multiple of 16; {len(bad)} layer(s) are not: {', '.join(bad[:8])}; drop --save-24"
            )
    if needs_data and (calibration is None or isinstance(calibration, CalibrationConfig)):
        from calibra.data import resolve_config

        calibration, _ = resolve_config(
            calibration or CalibrationConfig(),
            model_config,
            echo=say,
            print_estimate=False,
            observers=list(_observers(config, measure_error)),
        )
    do_eval = evaluate if evaluate is not None else job.source.startswith("builtin:")
    plan = job.choose_plan(
        stream=stream,
        unsupported=[
            (save_24, "the compressed 2:4 file is not written by it yet: drop --save-24"),
            (config.quantize is not None, "joint quantization is not implemented for it yet: drop --bits"),
        ],
        observers=_observers(config, measure_error),
        calibration=calibration if needs_data and isinstance(calibration, CalibrationConfig) else None,
        needs_data=needs_data,
        checkpoint=checkpoint and output is not None,
        solver="gptq" if config.method_enum.value == "sparsegpt" else "rtn",
    )
    streaming = job.streaming
    if dry_run:
        return None, {"plan": plan.to_dict()}
    ck = None
    if checkpoint and output is not None:
        open_ck = lambda: presume.open_checkpoints(  # noqa: E731
            model,
            output,
            config,
            calibration,
            resume=resume,
            overwrite=overwrite,
            # a streamed job checkpoints records of its shards, not the tensors
            options={
                "dtype": dtype,
                "measure_error": measure_error,
                "save_24": save_24,
                "streamed": streaming,
                "hessian_dtype": str(hessian_dtype),
                **world.fingerprint(),
            },
            echo=say,
        )
        ck = world.checkpoints(open_ck, "prune")
    if not world.writer:  # rank 0 writes, checkpoints and evaluates; the others only compute
        output, do_eval = None, False
    if streaming:
        args = locals()
        return job.guarded(ck, lambda: _run_streamed(**args))

    prog = _Progress(say, progress)
    tracker = StageTracker(on_change=prog)
    try:
        # -- 2. load ---------------------------------------------------------------------------------
        meter = job.meter
        if isinstance(model, (str, Path)):
            model, loaded_tok = read_model(model, dtype, **job.read)
            tokenizer = tokenizer or loaded_tok
        model.eval()
        adapter = get_adapter(model)
        meter.mark("load")
        n_layers = len(adapter.layers)
        ev = job.reference(model, tokenizer) if do_eval else None

        # -- 3. prune layer by layer -------------------------------------------------------------------
        pruner = LayerPruner(config, adapter, dense=dense, tracker=tracker, num_layers=n_layers, calibrating=needs_data)
        pruner.parallel = job.world if job.world.distributed else None  # a layer's solves split over the ranks
        t0 = time.perf_counter()
        run_meta = final_stats = None
        loop = InMemoryLayers(adapter, pruner, ck, restore=presume.restore, saver=presume.LayerSaver)
        with torch.no_grad():
            if not needs_data:
                _restored(loop.resume(None), tracker, adapter, False)
                loop.run_data_free(
                    pruner, progress=progress, desc=config.method_enum.value, on_bar=lambda b: setattr(prog, "bar", b)
                )
            else:
                from calibra.calib import LayerRunner

                tracker.advance(S.CALIBRATING, adapter.layer_name(0))
                ids, mask, run_meta, bs, fp = job.calibration_tokens(calibration, tokenizer, model)
                runner = LayerRunner(
                    model,
                    adapter,
                    device=device,
                    observers=_observers(config, measure_error),
                    on_layer=pruner,
                    feed_compressed=True,
                    progress=progress and world.writer,
                    desc=config.method_enum.value,
                    hessian_dtype=hessian_dtype,
                    combine=world.combine(),
                )
                if config.gradual_steps > 1:
                    pruner.recollect = runner.recollect
                # a resume on other data is refused here, before any layer runs
                _restored(loop.resume(fp, runner), tracker, adapter, True)
                final_stats = loop.run_calibrated(runner, ids, mask, run_meta, bs)
        t_prune = time.perf_counter() - t0
        t_solve = sum(pl.seconds for pl in pruner.layers.values())
        t_cal = max(0.0, t_prune - sum(pruner.layer_seconds)) if needs_data else 0.0
        meter.mark("layers")

        # -- 4. evaluate -------------------------------------------------------------------------------
        eval_block = None
        if ev is not None:
            tracker.advance(S.EVALUATING, ev.dataset["name"])
            eval_block = ev.finish(model)
            meter.mark("evaluation")

        # -- 5. report, write --------------------------------------------------------------------------
        pm = psave.PrunedModel(
            model=model, tokenizer=tokenizer, layers=pruner.layers, config=config, source=job.source, dense=dense
        )
        report = _report(
            pm,
            n_layers=n_layers,
            run_meta=run_meta,
            needs_data=needs_data,
            calibration=calibration,
            device=device,
            dtype=dtype,
            save_24=save_24,
            measure_error=measure_error,
        )
        report["plan"] = plan.to_dict()
        job.record_run(report, pruner, hessian_dtype)
        report_moe_coverage(report, final_stats, say)
        if eval_block is not None:
            report["eval"] = eval_block
        report["timings"] = {
            "calibration": t_cal,
            "solve": t_solve,
            "eval": ev.seconds if ev else 0.0,
            "per_layer": pruner.layer_seconds,
            "write": 0.0,
            "total": 0.0,
        }
        pm.report = report
        if output is not None:
            meter.into(report, "save")
            tracker.advance(S.EXPORTING, str(output))
            t0 = time.perf_counter()
            tracker.advance(S.COMPLETE)
            report["stages"] = tracker.to_dict()
            report["output"] = str(output)
            if ck is not None and ck.resumed_from:
                report["resumed_from_layer"] = ck.resumed_from
            report["timings"]["total"] = job.seconds()
            psave.write(
                pm, output, overwrite=overwrite, save_24=save_24, report=report, max_shard_bytes=max_shard_bytes
            )
            report["timings"]["write"] = time.perf_counter() - t0
            if ck is not None:
                ck.finish()
        else:
            tracker.advance(S.COMPLETE)
            report["stages"] = tracker.to_dict()
        report["timings"]["total"] = job.seconds()
    except BaseException as e:
        if not tracker.done:
            tracker.fail(f"{type(e).__name__}: {e}")
        if ck is not None:
            from calibra.jobs.common import on_failure

            on_failure(ck, e)
        raise
    return model, report


def _run_streamed(
    *,
    model,
    config,
    calibration,
    output,
    overwrite,
    measure_error,
    device,
    dtype,
    tokenizer,
    progress,
    job,
    say,
    model_config,
    needs_data,
    dense,
    plan,
    ck,
    do_eval,
    hessian_dtype,
    **_,
):
    """The streamed job: layers read from disk one at a time, each written pruned when finished (with
    checkpoints ``ck``: into the work folder, committed layer by layer, so --resume continues)."""
    from calibra.calib import LayerRunner
    from calibra.io.streamed import open_streamed
    from calibra.jobs.common import StreamedLayers, open_streamed_job, report_moe_coverage
    from calibra.models import get_adapter
    from calibra.prune import StageTracker
    from calibra.prune import save as psave
    from calibra.prune.apply import LayerPruner
    from calibra.prune.stages import PruningStage as S

    meter = job.meter
    weights, tokenizer = open_streamed_job(model, model_config, dtype, job.read, job.source, "prune", tokenizer)
    m = weights.model
    adapter = get_adapter(m)
    n_layers = len(adapter.layers)
    prog = _Progress(say, progress)
    tracker = StageTracker(on_change=prog)

    def reopen_pruned(info):
        pruned, why = open_streamed(info, model_config, weights.dtype)
        if pruned is None:  # pragma: no cover - the job's own shards, named as the input's
            raise RuntimeError(f"[prune] the written output cannot be read back layer by layer: {why}")
        return pruned

    staging = ck.folder / "output" if ck is not None and job.world.writer else None
    # the pruned layer is written as it is in memory, in the checkpoint's form (its names -- an MoE block's
    # fused experts cut back into per-expert tensors -- at the stored dtype), as the whole-model job saves it
    sink = job.streamed_output(
        output,
        overwrite=overwrite,
        prefix="model",
        layer_tensors=None,
        weights=weights,
        staging=staging,
        disk_names=True,
    )
    pruner = LayerPruner(config, adapter, dense=dense, tracker=tracker, num_layers=n_layers, calibrating=needs_data)
    pruner.parallel = job.world if job.world.distributed else None  # a layer's solves split over the ranks
    loop = StreamedLayers(weights, adapter, pruner, sink, ck)
    run_meta = ev = final_stats = None
    t0 = time.perf_counter()
    try:
        if do_eval:
            ev = job.reference(None, tokenizer, streamed_weights=weights)
            t0 = time.perf_counter()
        if not needs_data:
            _restored(loop.resume(None), tracker, adapter, needs_data)
            loop.run_data_free(
                pruner,
                device=job.compute_device(),
                progress=progress,
                desc=f"{config.method_enum.value} (streamed)",
            )
        else:
            tracker.advance(S.CALIBRATING, adapter.layer_name(0))
            ids, mask, run_meta, bs, fp = job.calibration_tokens(calibration, tokenizer, m)
            runner = LayerRunner(
                m,
                adapter,
                device=device,
                observers=_observers(config, measure_error),
                on_layer=pruner,
                feed_compressed=True,
                progress=progress,
                desc=f"{config.method_enum.value} (streamed)",
                keep_layer_stats=False,
                weights=weights,
                hessian_dtype=hessian_dtype,
                combine=job.world.combine(),
            )
            if config.gradual_steps > 1:
                pruner.recollect = runner.recollect
            # the finished layers back, with their MoE routing statistics (the report's coverage)
            _restored(loop.resume(fp, runner), tracker, adapter, needs_data)
            final_stats = loop.run_calibrated(runner, ids, mask, run_meta, bs)
        t_prune = time.perf_counter() - t0
        meter.mark("layers")  # the capture (embeddings) included
        t_solve = sum(pl.seconds for pl in pruner.layers.values())
        pm = psave.PrunedModel(
            model=m, tokenizer=tokenizer, layers=pruner.layers, config=config, source=job.source, dense=dense
        )
        report = _report(
            pm,
            n_layers=n_layers,
            run_meta=run_meta,
            needs_data=needs_data,
            calibration=calibration,
            device=device,
            dtype=dtype,
            save_24=False,
            measure_error=measure_error,
        )
        report["plan"] = plan.to_dict()
        report["streaming"] = {"bytes_read": 0, "rss_after_layer": sink.rss_after_layer, "dense_dtype": "stored"}
        job.record_run(report, pruner, hessian_dtype)
        report_moe_coverage(report, final_stats, say)
        report["timings"] = {
            "calibration": max(0.0, t_prune - sum(pruner.layer_seconds)) if needs_data else 0.0,
            "solve": t_solve,
            "eval": 0.0,
            "per_layer": pruner.layer_seconds,
        }
        if loop.done:
            report["resumed_from_layer"] = loop.done
        pm.report = report
        meter.into(report, "rest of the output" + (" and its evaluation" if ev is not None else ""))
        tracker.advance(S.EXPORTING, str(output))
        t_write = time.perf_counter()

        def write_files(folder):
            tracker.advance(S.COMPLETE)
            report["stages"] = tracker.to_dict()
            report["output"] = str(output)
            report["streaming"]["bytes_read"] = weights.bytes_read
            report["timings"]["write"] = time.perf_counter() - t_write
            psave.write_files(folder, pm, None)
            if ev is not None:  # the folder is complete but for the report: measure it, layer by layer
                report["eval"] = job.evaluate_written(ev, folder, reopen_pruned)
                report["timings"]["eval"] = ev.seconds
            report["timings"]["total"] = job.seconds()
            psave.write_report(folder, report)

        sink.finish(write_files)
    except BaseException as e:
        if not tracker.done:
            tracker.fail(f"{type(e).__name__}: {e}")
        sink.abort(e)
        raise
    if ck is not None:
        ck.finish()
    return m, report


def _report(pm, *, n_layers, run_meta, needs_data, calibration, device, dtype, save_24, measure_error) -> dict:
    """report.json without the evaluation, stages and timings (the caller adds those)."""
    from calibra.data import CalibrationConfig
    from calibra.export.writer import versions
    from calibra.prune import save as psave
    from calibra.prune.config import config_dict

    config = pm.config
    pattern = config.pattern_obj
    rows = [pl.log() for pl in pm.layers.values()]
    block = psave.sparsity_block(pm)
    n_w = sum(pl.mask.numel() for pl in pm.layers.values())
    seed = calibration.seed if isinstance(calibration, CalibrationConfig) and needs_data else None
    report = {
        "format": REPORT_FORMAT,
        "format_version": 1,
        "model": {
            "source": pm.source,
            "model_type": getattr(pm.model.config, "model_type", None),
            "num_layers": n_layers,
        },
        "settings": {
            "config": config_dict(config),
            "method": config.method_enum.value,
            "pattern": str(pattern),
            "target_sparsity": config.sparsity,
            "joint_quantization": None if config.quantize is None else dataclasses.asdict(config.quantize),
            "calibration": (run_meta if needs_data else "none (data-free)"),
            "device": str(device or "auto"),
            "dtype": str(dtype),
            "save_24": bool(save_24),
            "measure_error": bool(measure_error),
            "lm_head": "excluded",
            "embeddings": "excluded",
            "router": "excluded",
        },
        "versions": versions(),
        "seed": seed,
        "summary": {
            "pruned_modules": len(pm.layers),
            "dense_modules": sorted(pm.dense),
            "pruned_weights_total": n_w,
            "zeroed_weights": n_w - sum(pl.kept for pl in pm.layers.values()),
            "target_sparsity": config.sparsity,
            "achieved_sparsity": block["achieved"],
            "joint_quantization_bits": None if config.quantize is None else config.quantize.bits,
        },
        "modules": rows,
        "sparsity": {"dense_modules": dict(sorted(pm.dense.items())), "layers": block["layers"]},
    }
    return report


def _restored(done: int, tracker, adapter, calibrating: bool) -> int:
    """Record the layers a resume put back in the stage history; returns ``done``."""
    from calibra.prune.stages import PruningStage as S

    if done:
        detail = f"{done} layer(s) restored from checkpoints"
        tracker.advance(S.COMPUTING_IMPORTANCE, detail)
        tracker.advance(S.PRUNING, detail)
        if calibrating and done < len(adapter.layers):
            tracker.advance(S.CALIBRATING, adapter.layer_name(done))
    return done


__all__ = ["prune"]
