"""Layer checkpoints: a killed or failed run continues with ``--resume`` and writes the same bytes as an
uninterrupted run (FAULTS rows 22-24).

Where: a work folder beside the output, ``.<output name>.calibra-work/`` (same filesystem, never inside the
output, which appears only complete). It holds

* ``fingerprint.json`` -- what the run depends on: ``model`` (config.json and a sampled hash of every
  weight file), ``config`` (method settings, calibration settings, dtype), ``versions`` (calibra, torch,
  transformers), and, once tokenized, ``data`` (the fingerprint of the calibration token ids). A resume
  whose fingerprint differs in any of them is refused, naming the field;
* per finished layer ``k``: ``layer-0000k.safetensors`` (that layer's quantized tensors: codes, scales,
  zeros, g_idx, global scales, and the dequantized weight when it is not exactly ``dequantize()``) and
  ``layer-0000k.json`` (module metadata and logs, modules kept dense, MoE routing counts, the torch RNG
  state, sha256 of the tensor file). The JSON is written last: it is the commit mark;
* ``hidden-0000k.safetensors`` -- the inputs of layer ``k+1`` for every calibration batch, exactly as the
  uninterrupted run computed them (only the newest is kept). Replaying the finished layers instead
  would depend on the thread count and kernels being the same; storing the tensors makes the resumed run
  bit-identical by construction.

Every file is written to a temporary name and renamed, so a kill at any instant leaves either the old
or the new state. The folder is removed after the output is complete; after a failure (out of memory,
an error in a layer) it stays, and the error says ``--resume`` continues from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

WORK = ".calibra-work"
FINGERPRINT = "fingerprint.json"
OWNER = "owner.json"
FORMAT = "calibra-checkpoint"
FORMAT_VERSION = 1
_QL_FIELDS = ("codes", "scales", "zeros", "g_idx", "global_scale")


def work_dir(output) -> Path:
    output = Path(output).expanduser().absolute()
    return output.parent / f".{output.name}{WORK}"


# ---------------------------------------------------------------------------------------------- fingerprint
def _sampled_sha256(path: Path, chunks: int = 16, chunk: int = 1 << 16) -> str:
    """sha256 of a file's size, first 1 MiB (a safetensors header and the start of the data) and ``chunks``
    evenly spaced pieces: catches a different or re-saved checkpoint without reading 100+ GB on every run.
    Not a cryptographic commitment to every byte."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        for i in range(chunks):
            f.seek(max(0, (size - chunk) * i // max(1, chunks - 1)))
            h.update(f.read(chunk))
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """For a folder/builtin spec: config.json + sampled hash of every weight file. For a loaded model:
    calibra's model identity (config + a sample of every tensor)."""
    if not isinstance(model, (str, Path)):
        from calibra.calib.stats import model_identity

        return "identity:" + model_identity(model)
    from calibra.io import inspect_model

    mf = inspect_model(model, check_tensors=False, allow_quantized=True, allow_pickle=True, trust_remote_code=True)
    h = hashlib.sha256((mf.path / "config.json").read_bytes())
    for p in mf.weight_files:
        h.update(p.name.encode())
        h.update(_sampled_sha256(p).encode())
    return "files:" + h.hexdigest()


def versions() -> dict:
    """The versions a resume must match: the ones that change computed values. The full torch build string
    (``2.13.0+cpu`` vs ``+cu130``: other kernels), unlike the artifacts' ``calibra.export.writer.versions``."""
    import transformers

    import calibra

    return {"calibra": calibra.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


class ResumeError(ValueError):
    """The checkpoints cannot be used: they belong to a different run, or are damaged."""


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _flat(obj, prefix: str = "") -> dict:
    """Nested dicts as ``{"a.b": leaf}``, so a refusal names the one setting that differs."""
    if not isinstance(obj, dict):
        return {prefix or "value": obj}
    out = {}
    for k, v in obj.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors_atomic(path: Path, tensors: dict) -> str:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())})
    _write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _on_cpu(ql):
    import dataclasses

    return dataclasses.replace(
        ql, **{f: (getattr(ql, f).cpu() if getattr(ql, f) is not None else None) for f in _QL_FIELDS + ("weight",)}
    )


# ---------------------------------------------------------------------------------------------- the store
class LayerCheckpoints:
    """The work folder of one output (see the module docstring).

    Args:
        output: the final output folder.
        fingerprint: ``{"model", "config", "versions"}`` of this run (``data`` is checked later with
            :meth:`check_data`, once the calibration tokens exist).
        resume: continue from existing checkpoints (``--resume``); without it, existing checkpoints are
            refused unless ``overwrite`` (which discards them).
    """

    def __init__(
        self,
        output,
        fingerprint: dict,
        *,
        resume: bool = False,
        overwrite: bool = False,
        echo=print,
        component: str = "quantize",
    ):
        self.folder = work_dir(output)
        self.fingerprint = dict(fingerprint)
        self.component = component
        self.say = echo or (lambda *a, **k: None)
        self.resumed_from = 0
        self._check_owner()
        if self.folder.exists():
            old = self._read_fingerprint()
            done = self._count_done()
            if not resume:
                if not overwrite:
                    raise ResumeError(
                        f"[{component}] checkpoints of an earlier run of this output are in {self.folder} "
                        f"({done} layer(s) finished): pass --resume (resume=True) to continue it, or --overwrite "
                        f"to discard them and start over"
                    )
                self.say(f"[{component}] discarding checkpoints of an earlier run ({done} layer(s)) in {self.folder}")
                shutil.rmtree(self.folder)
            else:
                self._compare(old, ("model", "config", "versions"))
                self.resumed_from = done
        elif resume:
            self.say(f"[{component}] --resume: no checkpoints in {self.folder}; starting from the first layer")
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.folder / OWNER, _canon({"pid": os.getpid()}).encode())
        if not (self.folder / FINGERPRINT).is_file():
            self._write_fingerprint()

    # -- identity ----------------------------------------------------------------------------------
    def _check_owner(self) -> None:
        try:
            pid = json.loads((self.folder / OWNER).read_text())["pid"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if pid != os.getpid() and _pid_alive(int(pid)):
            raise ResumeError(
                f"[{self.component}] another calibra run (pid {pid}) is writing {self.folder}; wait for "
                f"it to finish or stop it"
            )

    def _read_fingerprint(self) -> dict:
        try:
            doc = json.loads((self.folder / FINGERPRINT).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else {}

    def _write_fingerprint(self) -> None:
        doc = dict(self.fingerprint, format=FORMAT, format_version=FORMAT_VERSION)
        _write_atomic(
            self.folder / FINGERPRINT, (json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n").encode()
        )

    def _compare(self, old: dict, fields) -> None:
        if not old:
            raise ResumeError(
                f"[{self.component}] {self.folder} has no readable {FINGERPRINT}; the checkpoints cannot "
                f"be matched to this run. Run with --overwrite to start over"
            )
        for field in fields:
            a, b = old.get(field), self.fingerprint.get(field)
            if _canon(a) != _canon(b):
                fa, fb = _flat(a), _flat(b)
                keys = sorted(k for k in set(fa) | set(fb) if _canon(fa.get(k)) != _canon(fb.get(k)))
                detail = ": " + "; ".join(f"{k} was {fa.get(k)!r}, now {fb.get(k)!r}" for k in keys[:6])
                verb = "differ" if field.endswith("s") else "differs"
                raise ResumeError(
                    f"[{self.component}] cannot resume: the {field} {verb} from the checkpointed "
                    f"run{detail}. Resume with the same {field}, or pass --overwrite to start over"
                )

    def check_data(self, data_fingerprint) -> None:
        """Compare (resume) or record the calibration data's fingerprint."""
        self.fingerprint["data"] = data_fingerprint
        old = self._read_fingerprint()
        if self.resumed_from and "data" in old:
            self._compare(old, ("data",))
        self._write_fingerprint()

    # -- layers ------------------------------------------------------------------------------------
    def _json(self, i: int) -> Path:
        return self.folder / f"layer-{i:05d}.json"

    def _count_done(self) -> int:
        i = 0
        while self._json(i).is_file():
            i += 1
        return i

    def save_layer(
        self, i: int, layers: dict, dense: list, *, hidden: list | None = None, extra: dict | None = None
    ) -> None:
        """Commit layer ``i``: its QuantizedLayers (``name -> QuantizedLayer``), the modules left dense,
        the next layer's inputs (``hidden``), small extras (JSON-able, tensors under ``extra["tensors"]``)."""
        tensors, mods = {}, {}
        extra = dict(extra or {})
        for name, ql in sorted(layers.items()):
            for f in _QL_FIELDS:
                t = getattr(ql, f)
                if t is not None:
                    tensors[f"{name}/{f}"] = t
            exact = torch.equal(_on_cpu(ql).dequantize(), ql.weight.cpu())  # as load_layer will rebuild it
            if not exact:  # the solver's weight differs in the last bits from codes*scales: keep it
                tensors[f"{name}/weight"] = ql.weight
            mods[name] = {
                "method": ql.method,
                "format": ql.format,
                "bits": ql.bits,
                "group_size": ql.group_size,
                "symmetric": ql.symmetric,
                "rotation": ql.rotation,
                "log": ql.log.to_dict(),
                "dtype": str(ql.weight.dtype).replace("torch.", ""),
                "weight_stored": not exact,
            }
        for k, t in (extra.pop("tensors", None) or {}).items():
            tensors[f"extra/{k}"] = t
        doc = {"layer": i, "modules": mods, "dense": list(dense), "extra": extra, "rng": torch.get_rng_state().tolist()}
        doc["layer_sha256"] = _save_tensors_atomic(self.folder / f"layer-{i:05d}.safetensors", tensors)
        if hidden is not None:
            doc["hidden_sha256"] = _save_tensors_atomic(
                self.folder / f"hidden-{i:05d}.safetensors", {f"{b:06d}": h for b, h in enumerate(hidden)}
            )
        _write_atomic(self._json(i), (json.dumps(doc, sort_keys=True) + "\n").encode())  # the commit mark
        old = self.folder / f"hidden-{i - 1:05d}.safetensors"
        if old.exists():
            old.unlink()

    def _read_checked(self, path: Path, sha: str) -> dict:
        from safetensors.torch import load

        data = path.read_bytes() if path.is_file() else b""
        if hashlib.sha256(data).hexdigest() != sha:
            raise ResumeError(
                f"[{self.component}] checkpoint file {path} is missing or damaged (sha256 differs); "
                f"pass --overwrite to start over"
            )
        return load(data)

    def load_layer(self, i: int):
        """``(name -> QuantizedLayer, dense names, extra)`` of committed layer ``i`` (RNG restored)."""
        from calibra.quant.result import ModuleLog, QuantizedLayer

        doc = json.loads(self._json(i).read_text(encoding="utf-8"))
        t = self._read_checked(self.folder / f"layer-{i:05d}.safetensors", doc["layer_sha256"])
        layers = {}
        for name, m in doc["modules"].items():
            get = lambda f, name=name: t.get(f"{name}/{f}")  # noqa: E731
            ql = QuantizedLayer(
                name=name,
                method=m["method"],
                format=m["format"],
                bits=m["bits"],
                group_size=m["group_size"],
                symmetric=m["symmetric"],
                codes=get("codes"),
                scales=get("scales"),
                zeros=get("zeros"),
                g_idx=get("g_idx"),
                global_scale=get("global_scale"),
                weight=torch.empty(0, dtype=getattr(torch, m["dtype"])),
                rotation=m["rotation"],
                log=ModuleLog(**m["log"]),
            )
            ql.weight = get("weight") if m["weight_stored"] else ql.dequantize()
            layers[name] = ql
        torch.set_rng_state(torch.tensor(doc["rng"], dtype=torch.uint8))
        extra = dict(doc.get("extra") or {})
        extra["tensors"] = {k[len("extra/") :]: v for k, v in t.items() if k.startswith("extra/")}
        return layers, list(doc["dense"]), extra

    def extra_of(self, i: int) -> dict:
        """The small extras committed with layer ``i`` (no tensor read)."""
        return dict(json.loads(self._json(i).read_text(encoding="utf-8")).get("extra") or {})

    def load_hidden(self, i: int) -> list:
        doc = json.loads(self._json(i).read_text(encoding="utf-8"))
        t = self._read_checked(self.folder / f"hidden-{i:05d}.safetensors", doc["hidden_sha256"])
        return [t[k] for k in sorted(t)]

    def finish(self) -> None:
        """The output is complete: the checkpoints are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def release(self) -> None:
        """The run failed: keep the checkpoints for --resume, drop the owner mark."""
        try:
            (self.folder / OWNER).unlink()
        except OSError:
            pass


__all__ = ["LayerCheckpoints", "ResumeError", "work_dir", "model_fingerprint", "versions"]
