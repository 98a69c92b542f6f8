"""What every job (calibrate, quantize, prune, kv calibrate) does around its own work: the model's config
read and checked without weights, the refusal of quantized inputs, the checked weight read, the
calibration input in each accepted form, the run metadata, the weightless shape copy, and the
checkpoint policy on failure. The verbs' modules (``jobs.calibrate``, ``jobs.quantize``, ``jobs.prune``, ``jobs.plan``,
``kv.api``) import from here; nothing here imports them, so imports flow one way.
"""

from __future__ import annotations

from pathlib import Path

import torch


def torch_dtype(dtype, model_config) -> torch.dtype:
    """The torch dtype of a ``--dtype`` value (``auto``: the config's)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        d = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or torch.float32
        return getattr(torch, d) if isinstance(d, str) else d
    return getattr(torch, str(dtype).replace("torch.", ""))


def model_config_of(
    model,
    *,
    component: str = "calibrate",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_quantized: bool = False,
):
    """The model's config, read without loading weights when ``model`` is a name or folder; the whole
    folder is checked first (``calibra.io.inspect_model``: config, architecture, index, headers, paths)."""
    from calibra.models import check_supported

    if not isinstance(model, (str, Path)):
        check_supported(getattr(model.config, "model_type", None), model.config)
        return model.config
    from transformers import AutoConfig

    from calibra.io import inspect_model

    folder = inspect_model(
        model,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        allow_quantized=allow_quantized,
        component=component,
    )
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    return AutoConfig.from_pretrained(folder.path, local_files_only=True, **remote)


def refuse_quantized(model_config, source: str, component: str, hint: str = "") -> None:
    """Refuse a model whose config carries a quantization_config (FAULTS row 10). Folders are already
    refused by ``calibra.io.inspect_model``; this covers models passed in already loaded."""
    qc = getattr(model_config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise ValueError(
            f"[{component}] {source} is already quantized (its config has a quantization_config, "
            f"quant_method {method!r}); calibra {component}s full-precision models only: start from "
            f"the original bf16/fp16/fp32 checkpoint{hint}"
        )


def read_model(
    model, dtype, *, allow_pickle: bool = False, trust_remote_code: bool = False, allow_quantized: bool = False
):
    """``(model, tokenizer)`` of a name/folder through the checking reader (NaN/Inf named at load)."""
    from calibra.io import load_model

    return load_model(
        str(model),
        dtype=dtype,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        allow_quantized=allow_quantized,
    )


def calibration_input(calibration, tokenizer, model_config, echo, config_dtype, observers):
    """``(input_ids, attention_mask, run-metadata, config or None)`` from any accepted calibration input."""
    from calibra.data import CalibrationConfig, TokenizedCalibration

    if isinstance(calibration, tuple):
        ids, mask = calibration
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        return (
            ids,
            mask,
            {
                "dataset": "tensors",
                "seed": None,
                "samples": int(ids.shape[0]),
                "tokens": int(mask.sum()),
                "sequence_length": int(ids.shape[1]),
            },
            None,
        )
    if isinstance(calibration, TokenizedCalibration):
        return calibration.input_ids, calibration.attention_mask, tokenized_meta(calibration), None
    if not isinstance(calibration, CalibrationConfig):
        raise TypeError(
            f"[calibrate] calibration must be a CalibrationConfig, a TokenizedCalibration or "
            f"(input_ids, attention_mask), got {type(calibration).__name__}"
        )
    return None, None, None, calibration


def tokenized_meta(tok) -> dict:
    return {
        "dataset": tok.dataset,
        "version": tok.version,
        "seed": tok.seed,
        "fingerprint": tok.fingerprint,
        "samples": tok.num_samples,
        "tokens": int(tok.token_count),
        "sequence_length": tok.sequence_length,
        "packing": tok.packing,
    }


def meta_model(model_config):
    """A weightless copy of the architecture (meta device) for the shape checks."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def all_targets(model, adapter):
    from calibra.quant.apply import layer_targets

    return [t for i, layer in enumerate(adapter.layers) for t in layer_targets(adapter, i, layer)]


def calibration_tokens(calibration, tokenizer, model, echo):
    """``(input_ids, attention_mask, run metadata, batch_size)``."""
    from calibra.data import CalibrationDataset, tokenize_calibration
    from calibra.data.config import model_max_positions

    ids, mask, meta, config = calibration_input(calibration, tokenizer, model.config, echo, None, ("hessian",))
    if config is None:
        from calibra.data.config import auto_batch_size

        return ids, mask, meta, auto_batch_size(ids.shape[0], ids.shape[1])  # pre-tokenized input
    if tokenizer is None:
        raise ValueError(
            "[quantize] a loaded model with a CalibrationConfig needs tokenizer=...; or pass pre-tokenized calibration"
        )
    tok = tokenize_calibration(
        CalibrationDataset.from_source(config.dataset),
        tokenizer,
        config,
        max_positions=model_max_positions(model.config),
    )
    return tok.input_ids, tok.attention_mask, tokenized_meta(tok), config.resolved_batch_size(tok.sequence_length)


# ---------------------------------------------------------------------------------------- the verb


def on_failure(ck, e) -> None:
    """Out of memory, an interrupt or another rank's failure keeps the finished layers for --resume; other
    errors (bad data, a solver failure) would recur on resume, so their checkpoints are removed."""
    from calibra.calib.runner import CalibrationOOMError
    from calibra.jobs.distributed import SharedCheckpoints, peer_failed

    if isinstance(ck, SharedCheckpoints):  # a distributed job: rank 0 holds the files
        ck = ck.local
        if ck is None:
            return
    oom = isinstance(e, (CalibrationOOMError, MemoryError, KeyboardInterrupt)) or type(e).__name__ == "OutOfMemoryError"
    if (oom or peer_failed(e)) and any(ck.folder.glob("layer-*.json")):
        ck.release()
        e.args = (
            (e.args[0] if e.args else str(e)) + f" The finished layers are checkpointed in {ck.folder}: "
            f"fix the cause and rerun the same command with --resume to continue from there.",
        ) + e.args[1:]
    else:
        ck.finish()


# ---------------------------------------------------------------------------------------- streaming
_FIT = 0.85  # the whole-model job is chosen while its predicted peak stays under this share of free memory


def choose_streaming(stream, model, plan, say, component: str) -> bool:
    """Stream when asked to, or (``stream=None``) when the whole-model plan does not fit the host memory
    available now. A model passed in loaded is in memory already: it is never streamed."""
    if not isinstance(model, (str, Path)):
        if stream:
            raise ValueError(f"[{component}] stream=True needs a model folder or name; this model is already loaded")
        return False
    if stream is not None:
        return bool(stream)
    avail = plan.host_available
    if avail is None or plan.host_needed - plan.host.get("process before loading", 0) <= _FIT * avail:
        return False
    say(
        f"[plan] the whole model would need about {plan.host_needed / 2**30:.1f} GiB of host memory, more than "
        f"{_FIT:.0%} of the {avail / 2**30:.1f} GiB available: streaming it one layer at a time"
    )
    return True


def refuse_for_streaming(component: str, *, output, unsupported) -> None:
    """What a streamed job cannot do (yet), refused before any weight is read, each with the way out.
    ``unsupported``: ``(asked for, why and what to do)`` pairs."""
    why = None
    if output is None:
        why = "it writes its result layer by layer and keeps none in memory: give output=DIR (--output DIR)"
    else:
        why = next((msg for asked, msg in unsupported if asked), None)
    if why:
        raise ValueError(
            f"[{component}] this job streams the model from disk (stream=True, or the model does not fit in "
            f"memory); {why}, or pass stream=False (--no-stream) if it fits"
        )


def open_streamed_job(model, model_config, dtype, read: dict, source: str, component: str, tokenizer=None):
    """``(StreamedModel, tokenizer)`` of a model folder/name for a streamed job (see ``calibra.io.streamed``);
    sets the allocator so that freed layers go back to the system."""
    from calibra.io import inspect_model
    from calibra.io.streamed import limit_heap_growth, open_streamed

    limit_heap_growth()
    folder = inspect_model(model, component=component, **read)
    weights, why = open_streamed(
        folder, model_config, torch_dtype(dtype, model_config), trust_remote_code=read["trust_remote_code"]
    )
    if weights is None:
        raise ValueError(f"[{component}] {source} cannot be streamed: {why}; pass stream=False (--no-stream)")
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder.path, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
    return weights, tokenizer


def layer_loop(
    adapter, on_layer, after_layer, *, progress: bool, desc: str, start: int = 0, weights=None, device=None, on_bar=None
) -> None:
    """A data-free job's loop (RTN, magnitude pruning, a statistics file): ``on_layer(i, layer, None)`` for
    each layer from ``start`` (a resumed job's first unfinished one), then ``after_layer(i)`` (write /
    commit it; may be None). With ``weights`` (a StreamedModel) each layer is loaded first, the next one
    read ahead while this one is written, then released. ``on_bar(bar)`` receives the progress bar. Jobs with
    calibration data run the same steps inside ``LayerRunner``."""
    from tqdm.auto import tqdm

    layers = adapter.layers
    with torch.no_grad():
        bar = tqdm(
            range(start, len(layers)), desc=desc, unit="layer", disable=not progress, initial=start, total=len(layers)
        )
        if on_bar is not None:
            on_bar(bar)
        for i in bar:
            if weights is not None:
                weights.load(layers[i], device)
            on_layer(i, layers[i], None)
            if weights is not None and i + 1 < len(layers):
                weights.prefetch([layers[i + 1]])
            if after_layer is not None:
                after_layer(i)
            if weights is not None:
                weights.release(layers[i])
        bar.close()


# ---------------------------------------------------------------------------------- streamed checkpoints
def streamed_after_layer(sink, adapter, compressor, ck=None, runner=lambda: None):
    """``after_layer(i, hidden=None)`` of a streamed job: write layer ``i`` (``StreamedOutput.layer_done``;
    ``compressor`` is the LayerQuantizer / LayerPruner, whose ``layers`` keep slim records) and, with
    checkpoints ``ck``, commit it: the shard's record, the slim results, the modules kept dense, the
    layer's MoE routing statistics (``runner()``: the job's LayerRunner, if any) and the next layer's
    inputs ``hidden`` (``calibra.io.checkpoint``). A kill after the commit loses nothing."""
    from calibra.quant.resume import moe_state

    dense_seen = [len(compressor.dense)]

    def after(i, hidden=None):
        record = sink.layer_done(adapter.layers[i], adapter.layer_name(i), compressor.layers)
        if ck is None:
            return
        dense = compressor.dense[dense_seen[0] :]
        dense_seen[0] = len(compressor.dense)
        seconds = compressor.layer_seconds[-1] if compressor.layer_seconds else 0.0
        extra = dict(moe_state(runner(), adapter.layer_name(i) + "."), streamed=record, seconds=seconds)
        ck.save_layer(i, {}, dense, hidden=hidden, extra=extra)

    return after


def restore_streamed(ck, sink, compressor, runner=None) -> int:
    """A resumed streamed job: the finished layers' shards back into ``sink``, their slim results into
    ``compressor.layers`` (their MoE routing statistics into ``runner``); returns the number of finished
    layers (the job continues with the next)."""
    from calibra.quant.resume import restore_moe

    for i in range(ck.resumed_from):
        _, dense, extra = ck.load_layer(i)
        if "streamed" not in extra:
            raise ValueError(
                f"[{ck.component}] the checkpoints in {ck.folder} are not a streamed job's; pass --overwrite to "
                f"start over"
            )
        sink.restore(extra["streamed"], compressor.layers)
        restore_moe(runner, extra)
        compressor.dense.extend(dense)
        compressor.layer_seconds.append(extra.get("seconds", 0.0))
    return ck.resumed_from


class _LayerLoop:
    """The layer loop of a job, the same for both placements: :meth:`resume` checks the calibration data
    against the checkpoints (a resume on other data is refused before any layer runs) and takes the
    finished layers back; then :meth:`run_data_free` (RTN, magnitude, a statistics file) or
    :meth:`run_calibrated` (a ``LayerRunner``) runs the rest, ``compressor`` (a LayerQuantizer /
    LayerPruner: ``compressor(i, layer, stats)``, ``layers``, ``dense``, ``layer_seconds``) solving each
    layer and ``after_layer(i, hidden=None)`` writing / committing it."""

    weights = None  # the StreamedModel the layers are read from (None: the model is in memory)

    def __init__(self, adapter, compressor, ck=None):
        self.adapter, self.compressor, self.ck = adapter, compressor, ck
        self.after_layer = None
        self.done = 0

    def run_data_free(self, on_layer, *, progress: bool, desc: str, device=None, on_bar=None) -> None:
        layer_loop(
            self.adapter,
            on_layer,
            self.after_layer,
            progress=progress,
            desc=desc,
            start=self.done,
            weights=self.weights,
            device=device,
            on_bar=on_bar,
        )

    def run_calibrated(self, runner, ids, mask, run_meta: dict, batch_size: int):
        """``runner.run`` from the first unfinished layer (its inputs from the checkpoint); the statistics."""
        return runner.run(
            ids,
            mask,
            batch_size=batch_size,
            extra_metadata={"runs": [run_meta]},
            start_layer=self.done,
            start_hidden=self.ck.load_hidden(self.done - 1) if self.done else None,
            after_layer=self.after_layer,
        )


class InMemoryLayers(_LayerLoop):
    """A whole-model job's loop: the layers are in memory and the result is written at the end; with
    checkpoints ``ck`` each finished layer's tensors are committed (``saver``: the verb's ``LayerSaver``)
    and a resume puts them back (``restore``: the verb's ``restore``)."""

    def __init__(self, adapter, compressor, ck=None, *, restore=None, saver=None):
        super().__init__(adapter, compressor, ck)
        self._restore, self._saver = restore, saver

    def resume(self, data_fingerprint, runner=None) -> int:
        """Record (or compare) the data's fingerprint, put the finished layers back (with the ``runner``'s
        MoE routing state when calibrating); returns the number of finished layers."""
        if self.ck is not None:
            self.ck.check_data(data_fingerprint)
            self.done = self._restore(self.ck, self.compressor, self.adapter, runner)
            self.after_layer = self._saver(self.ck, self.compressor, self.adapter, runner)
        return self.done


class StreamedLayers(_LayerLoop):
    """A streamed job's loop: each layer read from ``weights`` (a StreamedModel) when it is processed and
    written by ``sink`` (``StreamedOutput``) when finished; with checkpoints ``ck`` committed too."""

    def __init__(self, weights, adapter, compressor, sink, ck=None):
        super().__init__(adapter, compressor, ck)
        self.weights, self.sink = weights, sink
        self.runner = None
        self.after_layer = streamed_after_layer(sink, adapter, compressor, ck, runner=lambda: self.runner)

    def resume(self, data_fingerprint, runner=None) -> int:
        """Record (or, resuming, compare) the data's fingerprint and take the finished layers' shards back
        (with the ``runner``'s MoE routing state when calibrating); call it after the calibration tokens
        exist, as the whole-model job does (a checkpoint restores its layer's RNG state). Returns the
        number of finished layers."""
        self.runner = runner
        if self.ck is not None:
            self.ck.check_data(data_fingerprint)
            self.done = restore_streamed(self.ck, self.sink, self.compressor, runner)
        return self.done


def report_moe_coverage(report: dict, final_stats, say) -> None:
    """An MoE model's routing coverage (how many calibration tokens each expert of each layer saw) into
    the report's ``moe_coverage``, and its table printed; nothing for a dense model or a data-free job."""
    if final_stats is None or "moe" not in final_stats.metadata:
        return
    from calibra.calib import coverage_table, refresh_coverage

    refresh_coverage(final_stats)
    report["moe_coverage"] = final_stats.metadata["moe"].get("coverage")
    say(coverage_table(final_stats))


def data_fingerprint(ids, mask, run_meta: dict) -> str:
    """The calibration tokens' fingerprint for the checkpoints (the tokenizer's, or one of the ids)."""
    from calibra.data.tokenize import fingerprint

    return run_meta.get("fingerprint") or fingerprint(ids, mask)
