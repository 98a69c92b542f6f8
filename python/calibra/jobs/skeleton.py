"""The steps every compression job (quantize, prune) takes around its solver, written once.

A job is: open (the model's config read and checked without weights) -> plan (the memory plan, which
chooses between the whole model and streaming it layer by layer) -> checkpoints -> the evaluation
reference -> the layers (each loaded, observed, solved by the verb's solver, written, committed, freed) ->
finish (evaluate, report, write). :class:`Job` holds what those steps share (the user's options, the
timer, the memory meter, the plan) and does the steps that are the same for every verb; the verb's
module (``jobs/quantize.py``, ``jobs/prune.py``) supplies its checks, its solver (``LayerQuantizer`` /
``LayerPruner``: ``solver(i, layer, stats)`` with ``layers``, ``dense`` and ``layer_seconds``, the
protocol ``jobs.common.StreamedLayers`` and the checkpoint savers drive) and its report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from calibra.eval.session import REPORT_EVAL_TOKENS
from calibra.rss import PhasePeaks


@dataclass(frozen=True)
class EvalOptions:
    """The held-out evaluation a job runs after compressing (``eval_*`` arguments of the verbs)."""

    dataset: object = "builtin"
    seq_len: int | None = None
    stride: int | None = None
    max_tokens: int | None = REPORT_EVAL_TOKENS
    top_k: int = 64


class Job:
    """One run of a verb: its options, timer and memory meter, and the shared steps.

    ``component`` names the verb in messages (``"quantize"``); ``label`` the compressed model in the
    evaluation (``"quantized"``); ``reference_name`` the model before compression (``"the unquantized
    model"``)."""

    def __init__(
        self,
        component: str,
        model,
        *,
        label: str,
        reference_name: str,
        output=None,
        overwrite: bool = False,
        device=None,
        dtype="float32",
        progress: bool = True,
        echo=print,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        evaluation: EvalOptions | None = None,
    ):
        self.t_start = time.perf_counter()
        self.component, self.label, self.reference_name = component, label, reference_name
        self.model, self.output, self.overwrite = model, output, overwrite
        self.device, self.dtype, self.progress = device, dtype, progress
        self.say = echo or (lambda *a, **k: None)
        self.read = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
        self.evaluation = evaluation or EvalOptions()
        self.from_disk = isinstance(model, (str, Path))
        self.source = str(model) if self.from_disk else getattr(model.config, "_name_or_path", "") or "<model>"
        self.model_config = None
        self.plan = None
        self.streaming = False
        self.meter = PhasePeaks()  # measured peak host memory by phase, beside the plan's in the report
        from calibra.jobs.distributed import current_world

        self.world = current_world(component)  # one process, or this rank of a torch.distributed job
        if not self.world.writer:
            self.say = lambda *a, **k: None  # one rank speaks

    @classmethod
    def for_call(cls, component: str, arguments: dict, *, label: str, reference_name: str) -> Job:
        """The job of a verb called with ``arguments`` (the verb's ``locals()`` on entry): the options every
        verb takes under the same names (model, output, overwrite, device, dtype, progress, echo, the read
        permissions and the ``eval_*`` protocol)."""
        shared = ("output", "overwrite", "device", "dtype", "progress", "echo", "allow_pickle", "trust_remote_code")
        evaluation = EvalOptions(
            *(arguments[k] for k in ("eval_dataset", "eval_seq_len", "eval_stride", "eval_max_tokens", "eval_top_k"))
        )
        return cls(
            component,
            arguments["model"],
            label=label,
            reference_name=reference_name,
            evaluation=evaluation,
            **{k: arguments[k] for k in shared},
        )

    @property
    def bars(self) -> bool:
        """Whether this process draws progress bars (asked for, and one rank of a distributed job)."""
        return self.progress and self.world.writer

    def hessian_dtype(self, asked) -> torch.dtype:
        """The dtype of the Hessian sums: ``asked`` (``"float32"`` / ``"float64"``), float64 on several ranks
        (summed in float64, the total does not depend on how the samples were split)."""
        name = str(asked).replace("torch.", "")
        if name not in ("float32", "float64"):
            raise ValueError(f"[{self.component}] hessian_dtype must be float32 or float64, got {asked!r}")
        return torch.float64 if self.world.distributed or name == "float64" else torch.float32

    def record_run(self, report: dict, compressor, hessian_dtype: torch.dtype | None) -> None:
        """Into the report's settings: the Hessian sums' dtype and, on several ranks, the world (size,
        backend), how many solves each rank did (``compressor.solved_by``) and each rank's seconds so far,
        seconds in its layers and peak RSS (a collective: every rank calls it)."""
        from calibra.rss import peak_rss

        if hessian_dtype is not None:
            report["settings"]["hessian_dtype"] = str(hessian_dtype).replace("torch.", "")
        if self.world.distributed:
            mine = {"seconds": self.seconds(), "layer_seconds": sum(compressor.layer_seconds), "peak_rss": peak_rss()}
            ranks = self.world.gather(mine)
            solves = self.world.solves(compressor.solved_by)
            report["settings"]["distributed"] = dict(self.world.to_dict(), solves_per_rank=solves, per_rank=ranks)

    # -- open ------------------------------------------------------------------------------------------
    def open_config(self, quantized_hint: str = ""):
        """The model's config, read and checked without a weight (FAULTS rows 1-10), the evaluation
        protocol checked against it, a quantized model refused."""
        from calibra.eval import check_protocol
        from calibra.jobs.common import model_config_of, refuse_quantized

        self.model_config = model_config_of(self.model, component=self.component, **self.read)
        check_protocol(self.model_config, self.evaluation.seq_len, self.evaluation.stride, flag="--eval-seq-len")
        refuse_quantized(self.model_config, self.source, self.component, quantized_hint)
        return self.model_config

    # -- plan ------------------------------------------------------------------------------------------
    def choose_plan(self, *, stream, unsupported=(), check_streamed=None, **plan_kw):
        """The memory plan (``calibra.jobs.plan.plan_job`` with ``plan_kw``), whole model or streamed
        (``stream``: True, False or None = when the whole model does not fit); a streamed job's
        ``unsupported`` options (``(asked, why)`` pairs) and ``check_streamed()`` refuse before any weight
        is read. Prints the plan; returns it."""
        from calibra.jobs.common import choose_streaming, refuse_for_streaming
        from calibra.jobs.plan import plan_job, weight_files_bytes

        if self.world.distributed:
            plan_kw = dict(plan_kw, **self.world.plan_args(plan_kw.get("calibration")))

        def plan(streaming: bool):
            return plan_job(
                self.model_config,
                job=self.component,
                dtype=self.dtype,
                device=self.device,
                weight_files_bytes=weight_files_bytes(self.model),
                output=self.output,
                streaming=streaming,
                **plan_kw,
            )

        self.plan = plan(False)
        self.streaming = choose_streaming(stream, self.model, self.plan, self.say, self.component)
        if self.streaming:
            refuse_for_streaming(self.component, output=self.output, unsupported=unsupported)
            if check_streamed is not None:
                check_streamed()
            self.plan = plan(True)
        self.say(str(self.plan))
        return self.plan

    def calibration_tokens(self, calibration, tokenizer, model):
        """``(input_ids, attention_mask, run metadata, batch size, fingerprint)`` of the calibration data;
        in a distributed job the ids and mask are this rank's share (the fingerprint is the whole set's)."""
        from calibra.jobs.common import calibration_tokens, data_fingerprint

        ids, mask, meta, bs = calibration_tokens(calibration, tokenizer, model, self.say)
        fp = data_fingerprint(ids, mask, meta)
        if self.world.distributed:
            ids, mask, _ = self.world.shard(ids, mask, self.component)
        return ids, mask, meta, bs, fp

    def streamed_output(self, output, **kw):
        """The streamed job's writer (``export.streamed.StreamedOutput``), or on a distributed job's
        other ranks one that keeps the slim results and writes nothing."""
        from calibra.export.streamed import DiscardedOutput, StreamedOutput

        return StreamedOutput(output, **kw) if self.world.writer else DiscardedOutput()

    def compute_device(self) -> torch.device:
        """Where the layers run: the ``device`` asked for, else CUDA when there is one, else the CPU."""
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- run -------------------------------------------------------------------------------------------
    def guarded(self, ck, work):
        """``work()``, with the checkpoint policy on failure (``jobs.common.on_failure``: out of memory or an
        interrupt keeps the finished layers for --resume, other errors drop them)."""
        from calibra.jobs.common import on_failure

        try:
            return work()
        except BaseException as e:
            if ck is not None:
                on_failure(ck, e)
            raise

    # -- evaluate --------------------------------------------------------------------------------------
    def reference(self, model, tokenizer, *, streamed_weights=None):
        """The evaluation's reference, collected before the layers are compressed: from ``model`` in
        memory, or layer by layer from a second reader of the streamed job's checkpoint."""
        from calibra.eval.session import EvalSession

        lm = model
        how = ""
        if streamed_weights is not None:
            from calibra.eval.streamed import StreamedLM
            from calibra.io.streamed import reopen

            lm = StreamedLM(reopen(streamed_weights), self.compute_device(), label=self.reference_name)
            how = " (layer by layer)"
        self.say(f"[{self.component}] evaluation: collecting {self.reference_name}'s reference{how}")
        ev = EvalSession(
            lm,
            tokenizer,
            dataset=self.evaluation.dataset,
            seq_len=self.evaluation.seq_len,
            stride=self.evaluation.stride,
            max_tokens=self.evaluation.max_tokens,
            top_k=self.evaluation.top_k,
            progress=self.progress,
            label=self.label,
            component=self.component,
        )
        if streamed_weights is not None:
            self.meter.mark("evaluation reference")
        return ev

    def evaluate_written(self, ev, folder, open_streamed_output) -> dict:
        """The evaluation of a streamed job's written ``folder`` (complete but for its report), read back
        layer by layer: ``open_streamed_output(ModelFolder)`` gives its StreamedModel."""
        from calibra.eval.streamed import StreamedLM
        from calibra.io import inspect_model

        self.say(f"[{self.component}] evaluation: the {self.label} model (layer by layer)")
        info = inspect_model(folder, allow_quantized=True, check_tensors=False, component=self.component)
        lm = StreamedLM(open_streamed_output(info), self.compute_device(), label=f"the {self.label} model")
        return ev.finish(lm)

    def seconds(self) -> float:
        """Since the job started."""
        return time.perf_counter() - self.t_start
