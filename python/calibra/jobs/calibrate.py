"""``calibra.calibrate``: one calibration pass -> ``CalibrationStats`` (and a file)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from calibra.jobs.common import calibration_input, model_config_of, read_model, tokenized_meta

_HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _check_args(observers, hessian_dtype, moe_quota, moe_tau, moe_pool):
    from calibra.calib.observers import OBSERVER_KINDS

    obs = [observers] if isinstance(observers, str) else list(observers)
    bad = [o for o in obs if o not in OBSERVER_KINDS]
    if not obs or bad:
        raise ValueError(
            f"[calibrate] observers must be a non-empty subset of {', '.join(OBSERVER_KINDS)}, got {obs!r}"
        )
    hd = _HESSIAN_DTYPES.get(str(hessian_dtype).replace("torch.", ""))
    if hd is None:
        raise ValueError(
            f"[calibrate] hessian_dtype must be float32 or float64 (never half precision), got {hessian_dtype!r}"
        )
    if moe_quota is not None and (isinstance(moe_quota, bool) or not isinstance(moe_quota, int) or moe_quota < 1):
        raise ValueError(f"[calibrate] moe_quota must be a positive token count or None, got {moe_quota!r}")
    if not (isinstance(moe_tau, (int, float)) and moe_tau >= 0):
        raise ValueError(f"[calibrate] moe_tau must be >= 0 (tokens), got {moe_tau!r}")
    if not (isinstance(moe_pool, (int, float)) and moe_pool >= 1):
        raise ValueError(f"[calibrate] moe_pool must be >= 1 (candidate pool / num_samples), got {moe_pool!r}")
    return obs, hd


def calibrate(
    model,
    calibration=None,
    *,
    observers=("hessian",),
    device=None,
    output=None,
    tokenizer=None,
    dtype="float32",
    hessian_dtype="float32",
    moe_quota: int | None = None,
    moe_tau: float = 256.0,
    moe_pool: float = 4.0,
    on_layer=None,
    feed_compressed: bool = False,
    progress: bool = True,
    echo=print,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dry_run: bool = False,
):
    """Run calibration text through ``model`` layer by layer and return its ``CalibrationStats``.

    Args:
        model: ``"builtin:NAME"``, a local Hugging Face folder, or a loaded ``PreTrainedModel`` (then
            pass ``tokenizer`` unless ``calibration`` is already tokenized).
        calibration: a ``calibra.data.CalibrationConfig`` (default: 128 x min(context, 2048) tokens of builtin text),
            a ``TokenizedCalibration``, or ``(input_ids [S, L], attention_mask [S, L])``.
        observers: any of ``"hessian"``, ``"norms"``, ``"ranges"``, ``"kv"``.
        device: compute device for one layer at a time (default: cuda if available, else cpu).
        output: write the statistics file there (atomically).
        dtype: dtype to load a model given by name/folder in (default float32).
        hessian_dtype: ``"float32"`` or ``"float64"`` Hessian sums (never half precision).
        moe_quota: tokens each expert should see; when set (and the model has MoE layers), samples
            are added from a candidate pool of ``moe_pool x num_samples`` by router-guided selection.
        moe_tau: shrinkage strength: an expert with ``n`` tokens gets weight ``tau / (n + tau)`` on
            its layer's pooled Hessian.
        on_layer, feed_compressed: see ``calibra.calib.LayerRunner`` (compression hooks).
        echo: where the memory estimate, coverage table and notes are printed (``None``: silent).
        allow_pickle, trust_remote_code: see ``calibra.io.inspect_model`` (both refused by default).
        dry_run: check everything, print the memory plan (``calibra.jobs.plan``) and return None without loading
            a weight.

    Under ``torchrun`` (or inside an initialized process group) the samples are split over the ranks and
    every layer's statistics are summed across them in float64 (``calibra.jobs.distributed``); every rank
    returns the statistics of the whole set, rank 0 writes ``output``.
    """
    from calibra.calib import LayerRunner, coverage_table, refresh_coverage, select_samples_for_coverage
    from calibra.data import CalibrationConfig, CalibrationDataset, resolve_config, tokenize_calibration
    from calibra.data.config import model_max_positions
    from calibra.jobs.distributed import current_world, refuse

    say = echo or (lambda *a, **k: None)
    obs, hd = _check_args(observers, hessian_dtype, moe_quota, moe_tau, moe_pool)
    world = current_world("calibrate")
    refuse(
        world,
        "calibrate",
        [
            (on_layer is not None, "an on_layer callback is not distributed yet"),
        ],
    )
    if world.distributed:
        hd = torch.float64  # the sums across ranks do not depend on the number of ranks (module docstring)
        if not world.writer:
            say = lambda *a, **k: None  # noqa: E731 - one rank speaks
    calibration = CalibrationConfig() if calibration is None else calibration
    read = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    model_config = model_config_of(model, **read)
    ids, mask, run_meta, config = calibration_input(calibration, tokenizer, model_config, say, dtype, obs)
    is_moe = getattr(model_config, "model_type", None) in ("mixtral", "qwen2_moe", "qwen3_moe")
    if config is not None:  # validate + memory estimate before any weight is loaded
        est_obs = list(obs) + (["routing"] if is_moe else [])
        load_dtype = (
            getattr(torch, dtype)
            if isinstance(dtype, str) and dtype != "auto"
            else (dtype if isinstance(dtype, torch.dtype) else torch.float32)
        )
        config, _ = resolve_config(
            config, model_config, dtype=load_dtype, observers=est_obs, echo=say, print_estimate=False, hessian_dtype=hd
        )
    from calibra.jobs.plan import plan_job, weight_files_bytes

    plan = plan_job(
        model_config,
        job="calibrate",
        calibration=config,
        observers=obs,
        dtype=dtype,
        device=device,
        hessian_dtype=hd,
        weight_files_bytes=weight_files_bytes(model),
        output=output,
        needs_data=config is not None,
    )
    say(str(plan))
    if dry_run:
        return None
    if isinstance(model, (str, Path)):
        model, loaded_tok = read_model(model, dtype, **read)
        tokenizer = tokenizer or loaded_tok
    if config is not None:
        if tokenizer is None:
            raise ValueError(
                "[calibrate] a loaded model with a CalibrationConfig needs tokenizer=...; or pass "
                "pre-tokenized calibration"
            )
        dataset = CalibrationDataset.from_source(config.dataset)
        max_pos = model_max_positions(model.config)
        base = config.num_samples
        want = config
        if moe_quota is not None and is_moe:
            want = dataclasses.replace(config, num_samples=int(base * moe_pool), min_tokens=config.min_tokens)
            want = dataclasses.replace(
                want, batch_size=min(config.resolved_batch_size(config.sequence_length or 1), want.num_samples)
            )
        tok = tokenize_calibration(dataset, tokenizer, want, max_positions=max_pos)
        ids, mask, run_meta = tok.input_ids, tok.attention_mask, tokenized_meta(tok)
        batch_size = config.resolved_batch_size(tok.sequence_length)
    else:
        from calibra.data.config import auto_batch_size

        base, batch_size = int(ids.shape[0]), auto_batch_size(ids.shape[0], ids.shape[1])
    selection = None
    if moe_quota is not None and is_moe:
        selection = select_samples_for_coverage(
            model,
            ids,
            mask,
            quota=moe_quota,
            base=min(base, ids.shape[0]),
            device=device,
            batch_size=batch_size,
            progress=progress and world.writer,
            world=world,
        )
        say(selection.summary())
        idx = torch.tensor(selection.indices, dtype=torch.long)
        ids, mask = ids[idx], mask[idx]
        from calibra.data.tokenize import fingerprint

        run_meta = dict(
            run_meta,
            samples=int(ids.shape[0]),
            tokens=int(mask.sum()),
            pool_fingerprint=run_meta.get("fingerprint"),
            fingerprint=fingerprint(ids, mask),
            selected_from_pool=selection.pool_size,
            selected_indices=selection.indices,
        )
    t0 = time.perf_counter()
    sample_ids = None
    if world.distributed:
        ids, mask, sample_ids = world.shard(ids, mask, "calibrate")
    runner = LayerRunner(
        model,
        device=device,
        observers=obs,
        hessian_dtype=hd,
        on_layer=on_layer,
        feed_compressed=feed_compressed,
        progress=progress and world.writer,
        combine=world.combine(),
    )
    stats = runner.run(ids, mask, batch_size=batch_size, sample_ids=sample_ids, extra_metadata={"runs": [run_meta]})
    stats.metadata["seconds"] = round(time.perf_counter() - t0, 3)
    if world.distributed:
        stats.metadata["token_count"] = world.total(stats.metadata["token_count"])
        stats.metadata["distributed"] = world.to_dict()
    if "moe" in stats.metadata:
        stats.metadata["moe"].update({"quota": moe_quota, "tau": float(moe_tau)})
        refresh_coverage(stats)
        say(coverage_table(stats))
    if output is not None and world.writer:
        stats.save(output)
        from calibra.report import write_stats_html  # NAME.report.html beside NAME.safetensors

        write_stats_html(output, stats)
    return stats
