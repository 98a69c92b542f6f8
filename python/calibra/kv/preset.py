"""KV presets: a JSON file naming the model, targets, ranks per layer, calibration data and measured
quality, with the PCA bases in a safetensors file beside it (same stem, ``.safetensors``).

Both files are written atomically (temp file + ``os.replace``), tensors first, JSON last; the JSON
records the tensors file's sha256, so a pair from two different runs (a crash between the two
renames, a hand-copied file) is refused at load instead of silently mixing bases and ranks.
Loading checks everything it can without the model (format, version, tensors, shapes, ranks);
:meth:`KVPreset.check_model` then checks the model (layers, KV heads, head_dim, attention kind) before
any work -- a preset for another model is a :class:`~calibra.kv.plan.PresetMismatchError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from calibra.export.writer import check_target, sha256_file
from calibra.kv.basis import HeadBases
from calibra.kv.plan import KVPlan

FORMAT = "calibra-kv-preset"
FORMAT_VERSION = 1
_FIELDS = ("vectors", "values", "mean")


class PresetError(ValueError):
    """A preset file pair that cannot be read: missing, corrupt, of another format, or inconsistent."""


def tensors_path(path) -> Path:
    return Path(path).with_suffix(".safetensors")


def check_output(path, overwrite: bool) -> Path:
    """Validate a preset output path before any work (suffix, existing files)."""
    path = Path(path).expanduser()
    if path.suffix != ".json":
        raise ValueError(
            f"[kv] the preset path must end in .json (the bases go beside it as .safetensors), got "
            f"{str(path)!r}; e.g. kv_preset_tiny-llama.json"
        )
    for p in (path, tensors_path(path)):
        check_target(p, overwrite, tag="kv", folder=False)
    return path


@dataclass
class KVPreset:
    plan: KVPlan
    model: dict
    calibration: dict = field(default_factory=dict)
    quality: dict | None = None
    autotune: dict | None = None
    path: Path | None = None

    @property
    def targets(self) -> str:
        return self.plan.targets

    @property
    def ranks(self) -> dict[str, list[int]]:
        return self.plan.ranks

    def check_model(self, model) -> None:
        """Raise before any work when ``model`` (a loaded model or its adapter) is not the preset's kind."""
        import warnings

        from calibra.calib.stats import model_identity
        from calibra.models import get_adapter

        adapter = model if hasattr(model, "layers") and hasattr(model, "attention_kind") else get_adapter(model)
        self.plan.check_model(adapter)
        mt = getattr(adapter.config, "model_type", None)
        if self.model.get("model_type") and mt != self.model["model_type"]:
            raise PresetError(
                f"[kv] the preset was calibrated on a {self.model['model_type']!r} model, this one is "
                f"{mt!r}; calibrate a preset for it"
            )
        ident = self.model.get("identity")
        if ident and ident != model_identity(adapter.model):
            warnings.warn(
                f"[kv] the preset was calibrated on {self.model.get('source')!r} (identity "
                f"{ident[:12]}); this model has the same shapes but other weights: the bases apply, "
                f"the preset's measured quality does not",
                stacklevel=2,
            )

    def to_json(self, tensors_name: str, tensors_sha256: str) -> dict:
        import calibra

        bases = self.plan.bases
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "calibra_version": calibra.__version__,
            "model": self.model,
            "targets": self.targets,
            "ranks": {w: list(self.plan.ranks[w]) for w in ("k", "v") if w in bases},
            "head_dim": self.plan.head_dim,
            "num_kv_heads": self.plan.num_kv_heads,
            "num_layers": self.plan.num_layers,
            "basis": {
                "kind": "PCA per layer and KV head, centered (the mean is stored)",
                "key_space": "pre-RoPE (keys are un-rotated, projected, re-rotated on read)",
                "tokens": {w: [b.tokens for b in bases[w]] for w in bases},
            },
            "calibration": self.calibration,
            "quality": self.quality,
            "autotune": self.autotune,
            "tensors": tensors_name,
            "tensors_sha256": tensors_sha256,
        }

    def save(self, path, *, overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        from calibra.export.writer import atomic_file, write_json

        path = check_output(path, overwrite)
        tpath = tensors_path(path)
        tensors = {}
        for which, bl in self.plan.bases.items():
            for i, b in enumerate(bl):
                for f in _FIELDS:
                    tensors[f"{which}.{f}.{i}"] = getattr(b, f).detach().float().cpu().contiguous()
        with atomic_file(tpath) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        with atomic_file(path) as tmp:
            write_json(tmp, self.to_json(tpath.name, sha256_file(tpath)))
        self.path = path
        return path

    @classmethod
    def load(cls, path) -> KVPreset:
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"[kv] no preset at {path}; write one with `calibra kv calibrate --output {path}`")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PresetError(f"[kv] {path} is not valid JSON ({e}); it is not a calibra KV preset") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise PresetError(
                f"[kv] {path} is not a calibra KV preset (format "
                f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise PresetError(
                f"[kv] {path} has preset format_version {meta.get('format_version')!r}; this calibra "
                f"reads version {FORMAT_VERSION}"
            )
        for key in ("targets", "ranks", "num_layers", "head_dim", "num_kv_heads", "tensors", "tensors_sha256"):
            if key not in meta:
                raise PresetError(f"[kv] {path} lacks the field {key!r}; the file is incomplete or edited")
        tpath = path.parent / meta["tensors"]
        if Path(meta["tensors"]).name != meta["tensors"]:
            raise PresetError(f"[kv] {path} names tensors {meta['tensors']!r} outside its folder; refused")
        if not tpath.is_file():
            raise PresetError(f"[kv] the preset's bases file {tpath} is missing (it belongs beside {path.name})")
        if sha256_file(tpath) != meta["tensors_sha256"]:
            raise PresetError(
                f"[kv] {tpath} does not match {path.name} (sha256 differs): the two files come from "
                f"different runs; recalibrate or restore the matching pair"
            )
        which = ("k", "v") if meta["targets"] == "kv" else ("v",)
        if meta["targets"] not in ("v", "kv"):
            raise PresetError(f"[kv] {path}: targets must be 'v' or 'kv', got {meta['targets']!r}")
        n, d, h = int(meta["num_layers"]), int(meta["head_dim"]), int(meta["num_kv_heads"])
        tokens = (meta.get("basis") or {}).get("tokens") or {}
        shapes = {"vectors": (h, d, d), "values": (h, d), "mean": (h, d)}
        bases: dict[str, list[HeadBases]] = {}
        try:
            with safe_open(str(tpath), framework="pt") as f:
                names = set(f.keys())
                for w in which:
                    bl = []
                    for i in range(n):
                        got = {}
                        for fld in _FIELDS:
                            name = f"{w}.{fld}.{i}"
                            if name not in names:
                                raise PresetError(
                                    f"[kv] {tpath} lacks tensor {name!r} (preset says {n} layers, "
                                    f"targets {meta['targets']!r})"
                                )
                            t = f.get_tensor(name)
                            if tuple(t.shape) != shapes[fld]:
                                raise PresetError(
                                    f"[kv] {tpath}: tensor {name!r} has shape {list(t.shape)}, "
                                    f"expected {list(shapes[fld])}"
                                )
                            got[fld] = t
                        tok = tokens.get(w, [0] * n)
                        bl.append(HeadBases(tokens=int(tok[i]) if i < len(tok) else 0, **got))
                    bases[w] = bl
        except PresetError:
            raise
        except Exception as e:  # a corrupt/truncated safetensors header
            raise PresetError(f"[kv] cannot read {tpath}: {e} (corrupt or truncated)") from e
        try:
            plan = KVPlan(bases=bases, ranks={w: list(meta["ranks"][w]) for w in which})
        except (KeyError, TypeError, ValueError) as e:
            raise PresetError(f"[kv] {path}: bad ranks {meta.get('ranks')!r}: {e}") from e
        return cls(
            plan=plan,
            model=meta.get("model") or {},
            calibration=meta.get("calibration") or {},
            quality=meta.get("quality"),
            autotune=meta.get("autotune"),
            path=path,
        )


def load_preset(path) -> KVPreset:
    return KVPreset.load(path)
