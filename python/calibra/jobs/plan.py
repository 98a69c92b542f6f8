"""The memory planner: before a job loads a weight, predict its peak device memory, peak host memory
(RSS) and disk, print the plan, and choose where the model lives.

Inputs are the model config (sizes come from a weightless meta-device copy of the model, so every
architecture's parameter count is exact), the weight files on disk, the calibration settings and the
job. The per-layer device working set (one layer, one batch of activations, that layer's Hessians, the
solver's workspace) comes from :func:`calibra.data.memory.estimate_memory`.

Host memory is the largest of the job's phases, each a sum of what is resident at once:

* **load** -- the process as it is now (measured RSS: Python, torch, transformers), the model in the
  compute dtype, and the weight files, which transformers memory-maps and reads (resident while loading);
* **layers** -- the model; all samples' hidden states (inputs and outputs of the current layer) and the
  per-batch attention arguments; the quantized results of the finished layers (codes, scales and the
  dequantized weight each ``QuantizedLayer`` keeps); true-sequential quantization also keeps the
  attention block's outputs of the current layer (replayed instead of recomputed: ``LayerRunner.freeze``),
  as large as the layer's inputs; when the compute device is the CPU also the layer's working set; when
  checkpointing, a serialized copy of one layer's outputs (safetensors serializes to
  bytes before writing);
* **save** -- the model, the quantized results, and a serialized copy of the output file.

Placement: when the whole model plus one layer's working set fits in the device's free memory (90%), the
model moves to the device once (no per-layer transfers); otherwise layers move one at a time and the rest
stays in host memory ("CPU offload"). On the CPU both are the same.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from calibra.data.memory import format_bytes
from calibra.jobs.common import torch_dtype
from calibra.rss import current_rss, proc_kib

JOBS = ("calibrate", "quantize", "prune")
_DEVICE_HEADROOM = 0.9  # the caching allocator and fragmentation need some room


def host_available() -> int | None:
    return proc_kib("/proc/meminfo", "MemAvailable")


def device_free(device: torch.device) -> int | None:
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    return None


@dataclass
class MemoryPlan:
    job: str
    device: str
    placement: str
    """``"whole model on <device>"``, ``"layer by layer, rest offloaded to host memory"`` or ``"host memory
    (CPU)"``."""
    model_bytes: int
    quantized_weights: int
    peak_device: int
    peak_host: int
    host_phase: str
    host: dict
    """component -> bytes at the host peak."""
    phases: dict
    """phase -> host bytes."""
    disk_output: int
    disk_checkpoints: int
    device_free: int | None = None
    host_available: int | None = None
    disk_free: int | None = None
    warnings: list = field(default_factory=list)
    ranks: int = 1
    """ranks of a torch.distributed job (the figures above are one rank's: its share of the samples)"""
    ranks_on_host: int = 1
    """of them on this host (their host memory adds up; each has its own device)"""

    @property
    def host_needed(self) -> int:
        """Host memory all of this host's ranks need at their peaks."""
        return self.peak_host * self.ranks_on_host

    @property
    def offload(self) -> bool:
        return self.placement.startswith("layer by layer")

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        f = format_bytes
        rows = [
            ("placement", self.placement),
            (
                f"peak device memory ({self.device}{', inside host memory' if self.device == 'cpu' else ''})",
                f(self.peak_device) + (f" of {f(self.device_free)} free" if self.device_free else ""),
            ),
            (
                f"peak host memory ({self.host_phase})",
                f(self.peak_host) + (f" of {f(self.host_available)} available" if self.host_available else ""),
            ),
            ("  " + ", ".join(f"{k} {f(v)}" for k, v in self.host.items() if v), ""),
        ]
        if self.ranks > 1:
            rows.append(
                (
                    f"host memory of this host's {self.ranks_on_host} rank(s)",
                    f(self.host_needed) + (f" of {f(self.host_available)} available" if self.host_available else ""),
                )
            )
        rows += [
            ("disk: output", f(self.disk_output)),
            ("disk: layer checkpoints (peak)", f(self.disk_checkpoints)),
            ("disk free at the output", f(self.disk_free) if self.disk_free is not None else "?"),
        ]
        w = max(len(k) for k, v in rows if v)
        where = "streamed from disk" if self.placement.startswith("streamed") else "in host memory"
        per_rank = f"; per rank of {self.ranks}, each with its share of the samples" if self.ranks > 1 else ""
        lines = [f"[plan] {self.job}: memory and disk plan (model {f(self.model_bytes)} {where}{per_rank})"]
        lines += [f"  {k:<{w}}  {v}" if v else f"  {k}" for k, v in rows]
        lines += [f"  warning: {m}" for m in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Sizes:
    params: int
    """parameters + buffers"""
    shapes: list
    """[(out, in)] of every compressible weight"""
    layers: int
    largest_layer: int
    """parameters of the largest decoder layer"""
    largest_outside: int
    """the largest parameter outside the decoder layers (embeddings or output head)"""


def _meta_sizes(model_config) -> _Sizes:
    """Exact sizes from a weightless meta-device copy of the model."""
    from calibra.jobs.common import all_targets, meta_model
    from calibra.models import get_adapter

    meta = meta_model(model_config)
    n = sum(p.numel() for p in meta.parameters()) + sum(b.numel() for b in meta.buffers())
    adapter = get_adapter(meta)
    in_layers = {id(p) for p in adapter.layers.parameters()}
    outside = [p.numel() for p in meta.parameters() if id(p) not in in_layers]
    return _Sizes(
        params=n,
        shapes=[(t.out_features, t.in_features) for t in all_targets(meta, adapter)],
        layers=len(adapter.layers),
        largest_layer=max((sum(p.numel() for p in layer.parameters()) for layer in adapter.layers), default=0),
        largest_outside=max(outside, default=0),
    )


def solver_workspace(shapes, solver: str | None, hessian_bytes: int = 4) -> int:
    """Bytes a solver allocates for its largest module, beyond the module's Hessian itself.

    GPTQ / SparseGPT (``calibra.quant.gptq.factor_inverse_hessian``): the scaled Hessian copy, the factor
    (built and factored in place) and U (solved in place over the identity) -- 3 x in^2 at the solve --, the
    float32 working copy of W and the quantized W (2 x out x in x 4) and the uint8 codes. RTN/magnitude/
    Wanda: W's working copy and result."""
    if not shapes or solver is None:
        return 0
    if solver == "gptq":
        return max(3 * i * i * hessian_bytes + 2 * o * i * 4 + o * i for o, i in shapes)
    return max(2 * o * i * 4 + o * i for o, i in shapes)


def _streamed_work(shapes, solver: str | None, est, hessian_bytes: int) -> int:
    """A streamed job's per-layer working set on the CPU. Its statistics die with the layer, so GPTQ
    consumes them (``LayerQuantizer(consume=True)``): a group's Hessians are freed once it is solved, the
    largest solve holds its Hessian (scaled in place), the factor and U (3 x in^2) and the codes, and the
    weight is worked on in place. The forward passes hold their activations and the Hessian being summed."""
    if not shapes or solver is None:
        return est.activations + est.hessians if est is not None else 0
    largest_h = max(i * i * hessian_bytes for _, i in shapes)
    if solver == "gptq":
        solve = max(3 * i * i * hessian_bytes + o * i for o, i in shapes)
    else:
        solve = max(2 * o * i * 4 + o * i for o, i in shapes)
    forward = (est.activations + largest_h + est.observer_state) if est is not None else 0
    return max(forward, solve)


def weight_files_bytes(model) -> int:
    """Bytes of the weight files of a model given by name/folder (0 for a loaded model)."""
    if not isinstance(model, (str, Path)):
        return 0
    from calibra.io import inspect_model

    return inspect_model(
        model, check_tensors=False, allow_quantized=True, allow_pickle=True, trust_remote_code=True
    ).weight_bytes


def plan_job(
    model_config,
    *,
    job: str,
    calibration=None,
    dtype=torch.float32,
    device=None,
    observers=("hessian",),
    hessian_dtype=torch.float32,
    group_size: int | None = None,
    bits: int | None = None,
    weight_files_bytes: int | None = None,
    checkpoint: bool = False,
    output=None,
    needs_data: bool = True,
    solver: str | None = None,
    baseline_rss: int | None = None,
    replay: bool = False,
    streaming: bool = False,
    sensitivity: bool = False,
    ranges: bool = False,
    ranks: int = 1,
    ranks_on_host: int = 1,
) -> MemoryPlan:
    """Predict a job's memory and disk (see the module docstring). ``calibration`` is a resolved
    ``CalibrationConfig`` (concrete sequence length) or None for data-free jobs. ``solver``: ``"gptq"``
    (GPTQ, MR-GPTQ, SparseGPT), ``"rtn"`` (RTN, magnitude, Wanda) or None (calibration only). ``replay``:
    true-sequential quantization (one more copy of a layer's activations, the replayed attention outputs).
    ``streaming``: the model is streamed from its shards (``calibra.io.streamed``) and the result written
    layer by layer (``calibra.export.streamed``): the phases are the capture (embeddings loaded), the layers
    (one layer loaded; then either its solves, with the statistics consumed as they are solved, or the next
    layer read ahead at its stored size while this one's output is written) and the rest of the output (the
    largest tensor outside the layers, read and written straight from its memory). ``ranks``,
    ``ranks_on_host``: a torch.distributed job's world (``calibration`` is then one rank's share); the host
    checks count every rank on this host. ``sensitivity``: mixed precision's sensitivity pass (a calibration
    pass before the layers are quantized, ``calibra.quant.mixed``): the whole-model job keeps every layer's
    Hessians from it until the end; a streamed job runs it as a phase of its own, one layer loaded and its
    statistics scored and dropped, and reads the weights twice. ``ranges``: RTN's activation-ranges pass
    (``--act-ranges``), likewise a phase of its own when streamed (one layer and its ranges)."""
    from calibra.data.memory import _dtype_bytes, estimate_memory

    if job not in JOBS:
        raise ValueError(f"[plan] job must be one of {', '.join(JOBS)}, got {job!r}")
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = torch_dtype(dtype, model_config)
    db = _dtype_bytes(dtype)
    weight_files_bytes = weight_files_bytes or 0
    sizes = _meta_sizes(model_config)
    params, shapes, n_layers = sizes.params, sizes.shapes, sizes.layers
    n_q = sum(o * i for o, i in shapes)
    ws = solver_workspace(shapes, solver, _dtype_bytes(hessian_dtype) if solver == "gptq" else 4)
    model_bytes = params * db
    H = model_config.get_text_config().hidden_size
    base = current_rss() if baseline_rss is None else baseline_rss

    est = None
    hidden = kwargs = work = 0
    if needs_data and calibration is not None:
        obs = list(observers) + (
            ["routing"] if getattr(model_config, "model_type", "") in ("mixtral", "qwen2_moe", "qwen3_moe") else []
        )
        est = estimate_memory(model_config, calibration, dtype=dtype, observers=obs, hessian_dtype=hessian_dtype)
        S, L, b = est.num_samples, est.sequence_length, est.batch_size
        n_batches = -(-S // b)
        text = model_config.get_text_config()  # a vision-language config holds the sizes in text_config
        from calibra.data.memory import config_value

        heads = config_value(text, "num_attention_heads") or 1  # a state-space model has no attention heads
        head_dim = config_value(text, "head_dim") or H // heads
        hidden = est.host_activations
        kwargs = n_batches * (2 * b * L * head_dim * db + b * L * L) + 2 * S * L * 8
        # forward (activations) and solve (workspace) do not overlap; the layer's statistics live through both
        work = max(est.activations, ws) + est.hessians + est.observer_state
    else:
        work = ws
    # what the job keeps per compressed weight, on the host, until the save
    g = 0
    consumed = job == "quantize" and solver == "gptq" and needs_data and est is not None
    if job == "quantize":
        g = n_q // max(1, group_size) if group_size and group_size > 0 else 0
        # GPTQ through the runner solves in the weights' memory: each result's dequantized weight is the
        # model's parameter itself, so only the codes and scales are extra (LayerQuantizer(consume=True))
        results = n_q * (1 if consumed else db + 1) + 8 * max(g, 1)
        out_bytes = n_q * 1 + 8 * max(g, 1) + (params - n_q) * db  # calibra's folder: one uint8 code per weight
    elif job == "prune":
        results = n_q  # one bool mask byte per pruned weight
        out_bytes = params * db
    else:
        results = 0
        out_bytes = est.hessians * n_layers if est is not None else 0
    kept_stats = out_bytes if job == "calibrate" else 0  # calibrate returns every layer's statistics
    if sensitivity and est is not None and not streaming:  # the sensitivity pass's statistics, every layer's
        kept_stats += est.hessians * n_layers
    on_cpu = device.type == "cpu"
    if consumed and on_cpu:
        work = _streamed_work(shapes, solver, est, hessian_bytes=_dtype_bytes(hessian_dtype))
    layer_work_host = work if on_cpu else (est.hessians if est is not None else 0)
    ckpt_transient = (hidden // 2 + n_q // max(1, n_layers)) if checkpoint else 0
    phases = {
        "load": {"process before loading": base, "model": model_bytes, "weight files (mapped)": weight_files_bytes},
        "layers": {
            "process before loading": base,
            "model": model_bytes,
            "hidden states": hidden,
            "attention arguments": kwargs,
            "replayed attention outputs": hidden // 2 if replay else 0,
            "compressed results": results,
            "statistics": kept_stats,
            "layer working set": layer_work_host,
            "checkpoint write": ckpt_transient,
        },
        "save": {
            "process before loading": base,
            "model": model_bytes,
            "compressed results": results,
            "serialized output": out_bytes,
        },
    }
    if streaming:
        stored = weight_files_bytes / max(1, params) if weight_files_bytes else db  # bytes per stored value
        layer_q = n_q // max(1, n_layers)
        # safetensors serializes a file's tensors into one bytes object before writing: x2 while writing
        layer_out = layer_q + 8 * max(g if job == "quantize" else 0, 1) // max(1, n_layers)
        phases = {
            "capture": {
                "process before loading": base,
                "embeddings": sizes.largest_outside * db,
                "hidden states": hidden // 2,
                "attention arguments": kwargs,
            },
            "layers": {
                "process before loading": base,
                "one layer": sizes.largest_layer * db,
                "hidden states": hidden,
                "attention arguments": kwargs,
                "replayed attention outputs": hidden // 2 if replay else 0,
                # the next layer is read while this one is written, not during its solves
                "solve, or read-ahead + output": max(
                    _streamed_work(shapes, solver, est, hessian_bytes=_dtype_bytes(hessian_dtype)) if on_cpu else 0,
                    int(sizes.largest_layer * stored) + layer_out,
                ),
            },
            **(
                {
                    "sensitivity": {
                        "process before loading": base,
                        "one layer": sizes.largest_layer * db,
                        "hidden states": hidden,
                        "attention arguments": kwargs,
                        # the layer's statistics, then one module's RTN error (W's working copy + result)
                        "layer statistics and scoring": (
                            est.activations + est.hessians + est.observer_state if est is not None else 0
                        )
                        + solver_workspace(shapes, "rtn"),
                    }
                }
                if sensitivity
                else {}
            ),
            **(
                {
                    "activation ranges": {
                        "process before loading": base,
                        "one layer": sizes.largest_layer * db,
                        "hidden states": hidden,
                        "attention arguments": kwargs,
                        "layer activations": est.activations if est is not None else 0,
                    }
                }
                if ranges
                else {}
            ),
            "rest of the output": {
                "process before loading": base,
                "largest tensor outside the layers": int(sizes.largest_outside * stored),
            },
        }
    totals = {k: sum(v.values()) for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    layer_dev = (est.layer_weights if est is not None else model_bytes // max(1, n_layers)) + work
    free = device_free(device)
    if streaming:
        placement = f"streamed from disk one layer at a time, computed on {device}"
        peak_dev = sizes.largest_layer * db + _streamed_work(shapes, solver, est, _dtype_bytes(hessian_dtype))
    elif on_cpu:
        placement, peak_dev = "host memory (the device is the CPU)", layer_dev
    elif device.type == "mps":  # Apple Silicon: host and device are one memory; offloading frees nothing
        placement, peak_dev = (
            "whole model on mps (unified memory: host and device share one pool)",
            model_bytes + layer_dev,
        )
    elif free is not None and model_bytes + layer_dev <= _DEVICE_HEADROOM * free:
        placement, peak_dev = f"whole model on {device}", model_bytes + layer_dev
    else:
        placement, peak_dev = "layer by layer, rest offloaded to host memory", layer_dev
    out_dir = Path(output).expanduser().absolute().parent if output is not None else Path.cwd()
    while not out_dir.exists() and out_dir != out_dir.parent:
        out_dir = out_dir.parent
    disk_free = shutil.disk_usage(out_dir).free if out_dir.exists() else None
    ckpt_disk = (n_q + hidden // 2 * 2) if checkpoint else 0  # all codes + two generations of layer outputs
    plan = MemoryPlan(
        job=job,
        device=str(device),
        placement=placement,
        model_bytes=model_bytes,
        quantized_weights=n_q,
        peak_device=peak_dev,
        peak_host=totals[peak_phase],
        host_phase=peak_phase,
        host=phases[peak_phase],
        phases=totals,
        disk_output=out_bytes,
        disk_checkpoints=ckpt_disk,
        device_free=free,
        host_available=host_available(),
        disk_free=disk_free,
        ranks=ranks,
        ranks_on_host=ranks_on_host,
    )
    base *= ranks_on_host  # every rank on this host has its own process before loading
    if free is not None and peak_dev > free:
        plan.warnings.append(
            f"one layer's working set ({format_bytes(layer_dev)}) exceeds the free device memory: "
            f"lower --batch-size or --seq-len, or use --device cpu"
        )
    avail = plan.host_available
    if device.type == "mps" and avail is not None and plan.host_needed - base + peak_dev > avail:
        plan.warnings.append(
            f"host and device peaks together ({format_bytes(plan.host_needed - base + peak_dev)}) exceed the "
            f"available unified memory ({format_bytes(avail)}): lower --samples or --seq-len, or use --stream"
        )
    if avail is not None and plan.host_needed - base > avail:
        plan.warnings.append(
            f"the host peak exceeds the available memory ({format_bytes(avail)}): lower "
            f"--samples or --seq-len, or use a machine with more memory"
        )
    if disk_free is not None and out_bytes + ckpt_disk > disk_free:
        plan.warnings.append(
            f"output + checkpoints ({format_bytes(out_bytes + ckpt_disk)}) exceed the free disk "
            f"space at {out_dir} ({format_bytes(disk_free)})"
        )
    return plan


__all__ = ["MemoryPlan", "plan_job", "current_rss", "JOBS"]
