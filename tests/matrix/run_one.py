"""One cell of the model matrix: a tiny random model of one ``model_type`` through calibra.

``run_type(model_type, workdir)`` decides one of

* ``refused`` -- calibra refused the family from its config (``calibra.models.refusal``) or from its
  weightless module tree, before any weight was read; the reason is calibra's message;
* ``untested`` -- the generator's shrunk config does not build or run in transformers itself (a
  limitation of ``tiny_configs``, not a verdict on calibra);
* ``pass`` -- every check below held;
* ``fail`` -- anything else, with the error.

The checks: the tiny model is saved with ``save_pretrained`` (plus a small tokenizer) and quantized from
that folder by ``calibra.quantize`` (GPTQ W4 per channel, 2 x 16 calibration tokens, true-sequential);
the saved folder is rebuilt (``calibra.quant.save.load``); at least one Linear of every decoder layer was
quantized and the rebuilt model holds exactly the dequantized codes; the rebuilt model's logits are finite
and close to the original's (relative error below ``REL_TOL``, or below ``RTN_FACTOR`` times what plain
round-to-nearest of the same modules does: W4 of random weights moves logits, a solve on wrong
activations or a mis-stored weight moves them by far more); and the layer-by-layer replay the runner does (the
captured layer calls, then the final norm and the head) reproduces the model's own logits (``REPLAY_TOL``);
a model with quantized MoE experts has a coverage row per expert (:func:`coverage_issue`); and the
quantized model exported to compressed-tensors and reloaded by transformers (+ compressed-tensors)
gives calibra's simulated model's logits within ``EXPORT_TOL``, and a model with quantized MoE experts
does the same through a GPTQ export (:func:`export_checks`).
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

REL_TOL = 0.5
RTN_FACTOR = 1.5  # GPTQ may not move the logits much more than round-to-nearest of the same modules
REPLAY_TOL = 1e-3
EXPORT_TOL = 1e-3  # max |logits| difference of a reloaded export from calibra's simulated model
CAL = {"num_samples": 2, "sequence_length": 16}


@dataclass
class Cell:
    model_type: str
    status: str  # pass | refused | untested | fail
    detail: str = ""
    quantized: int = 0
    adapter: str = ""
    export: str = ""  # the export step: "ok: ..." or "refused: <calibra's reason>" (a pass either way)


def _tokenizer(vocab: int):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from calibra.assets import builtin_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        builtin_texts("code")[:40],
        trainers.BpeTrainer(
            vocab_size=min(vocab, 300),
            special_tokens=["<eos>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def replay_logits(model, adapter, ids) -> torch.Tensor | None:
    """The logits the layer-by-layer path computes (the runner's captured calls, then final norm + head);
    None when the adapter has no final norm (that family is evaluated whole)."""
    from calibra.calib.runner import LayerRunner

    try:
        norm = adapter.final_norm()
    except NotImplementedError:
        return None
    last: list = []
    n = len(adapter.layers)
    runner = LayerRunner(model, adapter, device="cpu", observers=(), check_finite=False, progress=False)
    runner.run(ids, after_layer=lambda i, h: last.extend(h) if i == n - 1 else None)
    with torch.no_grad():
        out = model.get_output_embeddings()(norm(torch.cat(last)))
    from calibra.eval.streamed import StreamedLM

    return StreamedLM._logits(type("C", (), {"config": model.config})(), out).float()


def _rtn_error(model, names: list[str], ids, ref) -> float:
    """The relative logit change when the same modules are rounded to nearest (W4 per channel)."""
    import copy

    from calibra.models.linear import store_weight, weight_view
    from calibra.quant import RTNConfig
    from calibra.quant.rtn import rtn_quantize

    m = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            if ".experts." in name:  # fused expert slices: left out of the comparison
                continue
            mod = m.get_submodule(name)
            store_weight(mod, rtn_quantize(weight_view(mod).clone(), RTNConfig(bits=4, group_size=-1)).weight)
    got = _logits(m, ids)
    return float((got - ref).norm() / ref.norm().clamp_min(1e-6))


def coverage_issue(qm, report) -> str | None:
    """For a model with quantized MoE experts: the report's coverage table must hold a row per expert of
    every block whose experts were quantized, and each block must have seen every calibration token routed
    at least once (per-expert counts from the family's own routing). None when it does."""
    import re

    blocks: dict[str, set[int]] = {}
    for name in qm.layers:
        m = re.match(r"^(.+)\.experts\.(\d+)\.(gate_up_proj|down_proj)$", name)
        if m:
            blocks.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not blocks:
        return None
    rows = report.get("moe_coverage") or []
    have = {(r["block"], r["expert"]) for r in rows}
    want = {(b, e) for b, es in blocks.items() for e in es}
    if not want <= have:
        return f"MoE coverage rows missing for {sorted(want - have)[:3]}"
    n_tokens = CAL["num_samples"] * CAL["sequence_length"]
    for b in blocks:
        routed = sum(r["tokens"] for r in rows if r["block"] == b)
        if routed < n_tokens:
            return f"MoE coverage of {b}: {routed} routed tokens for {n_tokens} calibration tokens"
    return None


class _Dropped(RuntimeError):
    """transformers loaded the checkpoint but initialized some of its parameters anew (a load report's MISSING)."""


def _load(model_cls, folder: Path, **kw):
    model, info = model_cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **kw)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise _Dropped(f"{len(missing)} parameter(s) missing from the load, e.g. {missing[0]}")
    return model


def _reloaded_logits(model_cls, folder: Path, ids, compressed: bool = False) -> tuple[torch.Tensor, str]:
    """The logits of ``folder`` loaded by transformers, and how it loaded. A compressed-tensors checkpoint
    loads compressed first (transformers swaps each ``nn.Linear``'s forward for compressed-tensors' own);
    a family whose Linear subclass computes from ``.weight`` itself (Falcon's ``FalconLinear``) fails that
    way and is loaded again decompressed (``CompressedTensorsConfig(run_compressed=False)``).

    transformers' compressed-tensors loader prepends its dequantize step to every conversion of the family's
    mapping, and that step keeps only packed tensors: a dense tensor the mapping merges (Nemotron-H's
    unquantized experts, OLMo-hybrid / Kimi-Linear's ``q/k/v_conv1d`` -> ``conv1d``) is dropped -- an error,
    or parameters left MISSING and initialized anew. Such a checkpoint is read with compressed-tensors' own
    decompressor instead (:func:`ct_as_dense`) and loaded dense, every name as written."""
    if not compressed:
        return _logits(_load(model_cls, folder), ids), ""
    try:
        return _logits(_load(model_cls, folder), ids), ""
    except (AttributeError, RuntimeError, TypeError) as e:
        from transformers import CompressedTensorsConfig

        qc = CompressedTensorsConfig(run_compressed=False)
        try:
            loaded = _load(model_cls, folder, quantization_config=qc)
        except RuntimeError as e2:
            if not (isinstance(e2, _Dropped) or "conversion of the weights" in str(e2)):
                raise
            dense = ct_as_dense(folder, folder.parent / f"{folder.name}-dense")
            how = " (transformers' compressed-tensors load drops dense tensors its conversion merges: decompressed by"
            how += " compressed-tensors and loaded dense)"
            return _logits(_load(model_cls, dense), ids), how
        return _logits(loaded, ids), f" (decompressed on load: the compressed load failed with {_short(e)[:80]})"


def ct_as_dense(folder: Path, out_dir: Path) -> Path:
    """A dense checkpoint of a compressed-tensors export: every packed weight decompressed by
    compressed-tensors' own compressor for the checkpoint's scheme, every other tensor and name as written."""
    import json

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file, save_file

    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme(**group)
    compressor = BaseCompressor.get_value_from_registry(group.get("format") or qc["format"])
    t: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        t.update(load_file(str(f)))
    dense = {}
    for k, v in t.items():
        mod, _, local = k.rpartition(".")
        if local != "weight_packed":
            if not local.startswith("weight_") or f"{mod}.weight_packed" not in t:
                dense[k] = v
            continue
        local_sd = {n[len(mod) + 1 :]: x for n, x in t.items() if n.startswith(f"{mod}.weight")}
        dense[f"{mod}.weight"] = compressor.decompress(local_sd, scheme)["weight"].float().contiguous()
    out_dir.mkdir()
    save_file(dense, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


def export_checks(qm, workdir: Path, ids) -> tuple[bool, str]:
    """Export ``qm`` to compressed-tensors and reload it with transformers (+ compressed-tensors): the
    logits must equal calibra's simulated quantized model within ``EXPORT_TOL``. A model with quantized MoE
    experts also exports GPTQ, read back by ``tests/export/_gptq.py`` (transformers' GPTQ loader needs
    optimum + gptqmodel) into a dense checkpoint that transformers loads, re-fusing the experts: its logits
    must equal calibra's with GPTQ's float16 scales. An export calibra refuses before writing (an
    ``ExportError`` naming why: GPT-2's Conv1D layers, widths GPTQ's kernels cannot take) is recorded as
    refused. Returns ``(held, what)``."""
    import json

    import calibra.export as E
    from calibra.export.writer import ExportError
    from tests.export import _gptq as G

    model_cls = type(qm.model)
    simulated = _logits(qm.model, ids)
    try:
        ct = E.export(qm, workdir / "ct", "compressed-tensors")[0]
    except ExportError as e:
        return True, f"compressed-tensors refused: {_short(e)}"
    got, how = _reloaded_logits(model_cls, ct, ids, compressed=True)
    diff = float((got - simulated).abs().max())
    if not diff <= EXPORT_TOL:
        return False, f"compressed-tensors reload{how} differs from calibra's simulated model by {diff:.2e}"
    done = f"ok: compressed-tensors reload max diff {diff:.0e}{how}"
    if not any(".experts." in n for n in qm.layers):
        return True, done
    try:
        gp = E.export(qm, workdir / "gptq", "gptq")[0]
    except ExportError as e:
        return True, f"{done}; GPTQ refused: {_short(e)}"
    qc = json.loads((gp / "config.json").read_text())["quantization_config"]
    dense = G.gptq_as_dense(gp, workdir / "gptq-dense", qc["bits"], qc.get("checkpoint_format") == "gptq")
    diff = float((_reloaded_logits(model_cls, dense, ids)[0] - _logits(G.with_half_scales(qm), ids)).abs().max())
    if not diff <= EXPORT_TOL:
        return False, f"GPTQ export (experts re-fused by transformers) differs from calibra by {diff:.2e}"
    return True, f"{done}; MoE GPTQ reload max diff {diff:.0e}"


def run_type(model_type: str, workdir: Path) -> Cell:
    import calibra
    from calibra.data import CalibrationConfig
    from calibra.models import get_adapter, refusal
    from calibra.quant import GPTQConfig
    from calibra.quant.save import load
    from tests.matrix.tiny_configs import tiny_model

    try:
        model = tiny_model(model_type)
    except Exception as e:  # noqa: BLE001 - the generator's limit, recorded
        reason = refusal(model_type, None)
        if reason is not None:
            return Cell(model_type, "refused", reason)
        return Cell(model_type, "untested", f"tiny config does not build: {_short(e)}")
    reason = refusal(model_type, model.config.to_dict())
    if reason is not None:
        return Cell(model_type, "refused", reason)
    torch.manual_seed(1)
    ids = torch.randint(3, min(int(model.get_input_embeddings().num_embeddings), 300), (2, 12))
    try:
        ref = _logits(model, ids)
    except Exception as e:  # noqa: BLE001
        return Cell(model_type, "untested", f"tiny model does not run: {_short(e)}")
    try:
        adapter = get_adapter(model)
    except (TypeError, ValueError) as e:
        return Cell(model_type, "refused", _short(e))
    kind = type(adapter).__name__
    folder, out = workdir / model_type, workdir / f"{model_type}-q"
    try:
        model.save_pretrained(folder)
        _tokenizer(model.config.get_text_config().vocab_size).save_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - transformers cannot save the shrunk config
        return Cell(model_type, "untested", f"tiny model does not save: {_short(e)}", 0, kind)
    try:
        replay = replay_logits(model, adapter, ids)
        if replay is not None:
            err = float((replay - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            if not err < REPLAY_TOL:
                why = f"layer-by-layer replay differs from the model (rel {err:.2e})"
                return Cell(model_type, "fail", why, 0, kind)
        qm, report = calibra.quantize(
            str(folder),
            GPTQConfig(bits=4, group_size=-1),
            CalibrationConfig(**CAL),
            output=str(out),
            evaluate=False,
            progress=False,
            echo=None,
        )
        n_layers = len(adapter.layers)
        prefix = adapter.layers_prefix
        per_layer = {name[len(prefix) + 1 :].split(".", 1)[0] for name in qm.layers}
        if len(per_layer) != n_layers:
            return Cell(model_type, "fail", f"quantized Linears in {len(per_layer)} of {n_layers} layers", 0, kind)
        why = coverage_issue(qm, report)
        if why:
            return Cell(model_type, "fail", why, len(qm.layers), kind)
        rebuilt, man = load(out)
        from safetensors.torch import load_file

        from calibra.models.linear import weight_view
        from calibra.quant.save import dequantize_module

        tensors = {}
        for f in sorted(out.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        for name, info in man["modules"].items():
            if ".experts." in name:  # a slice of a fused expert tensor (explicit MoE adapters), not a module
                continue
            w = weight_view(rebuilt.get_submodule(name))
            if not torch.equal(w, dequantize_module(tensors, name, info).to(w.dtype)):
                return Cell(model_type, "fail", f"rebuilt {name} is not its dequantized codes", len(qm.layers), kind)
            if torch.equal(w, weight_view(model.get_submodule(name))):
                return Cell(model_type, "fail", f"{name} was not changed by quantization", len(qm.layers), kind)
        got = _logits(rebuilt, ids)
        if not bool(torch.isfinite(got).all()):
            return Cell(model_type, "fail", "non-finite logits after quantization", len(qm.layers), kind)
        rel = float((got - ref).norm() / ref.norm().clamp_min(1e-6))
        rtn = _rtn_error(model, list(man["modules"]), ids, ref)
        if not rel < max(REL_TOL, RTN_FACTOR * rtn):
            why = f"logits moved by {rel:.2f} (relative; RTN of the same modules: {rtn:.2f})"
            return Cell(model_type, "fail", why, len(qm.layers), kind)
        held, exported = export_checks(qm, workdir, ids)
        if not held:
            return Cell(model_type, "fail", exported, len(qm.layers), kind, exported)
        note = "" if replay is not None else "no final-norm match: evaluated whole only"
        detail = (f"rel. logit change {rel:.3f} " + note).strip()
        return Cell(model_type, "pass", detail, len(qm.layers), kind, exported)
    except Exception as e:  # noqa: BLE001
        msg = _short(e)
        if "unsupported architecture" in msg or "[models]" in msg:
            return Cell(model_type, "refused", msg, 0, kind)
        where = traceback.format_exc().strip().splitlines()[-3].strip()
        where = re.sub(r'"[^"]*/site-packages/', '"', where)  # no machine-specific path in the table
        return Cell(model_type, "fail", msg + " @ " + where, 0, kind)
