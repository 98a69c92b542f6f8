"""The parts every export shares: the atomic output folder, safetensors shards with their index,
config.json / generation_config.json / tokenizer files, the README model card and the manifest.

Atomicity (FAULTS rows 23, 25, 26): everything is written into a temporary folder beside the
target (``.<name>.calibra-tmp-<pid>``, same filesystem, so the final step is one ``rename``). An
existing target is refused unless ``overwrite=True``, which replaces it whole: the old folder is
renamed aside, the new one renamed in, then the old one deleted (and restored if the swap fails).
Any exception (disk full, Ctrl-C) deletes the temporary folder; a killed process leaves it behind,
and the next export to the same target removes temp folders whose process is gone.

Determinism (FAULTS row 27): no timestamps, no temp names and no dict-order accidents reach the
files, so the same inputs give the same bytes; the manifest records sha256 per file, the settings,
the seed and the versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

MANIFEST = "calibra_manifest.json"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 2**30
_TMP = ".calibra-tmp-"
_OLD = ".calibra-old-"


class ExportError(ValueError):
    """A model or setting the requested format cannot express (raised before anything is written)."""


# ---------------------------------------------------------------------------------------------
# atomic folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Delete temp/old folders of earlier exports to ``target`` whose process no longer runs."""
    removed = []
    if not target.parent.is_dir():
        return removed
    pat = re.compile(re.escape("." + target.name) + r"(" + re.escape(_TMP) + "|" + re.escape(_OLD) + r")(\d+)$")
    for p in target.parent.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_target(target, overwrite: bool, *, tag: str = "export", folder: bool = True) -> Path:
    """Refuse an existing target without ``overwrite`` (FAULTS row 26); call before any work. Every verb
    that writes (export, quantize, prune, kv) checks its output here; ``tag`` names the verb in the
    message, ``folder=False`` is for an output that is one file."""
    target = Path(target).expanduser().absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"[{tag}] output {target} already exists; pass overwrite=True (--overwrite) to "
            f"replace it{' whole' if folder else ''}, or choose another path"
        )
    if target.exists() and target.is_dir() != folder:
        raise FileExistsError(
            f"[{tag}] output {target} exists and is not a {'folder' if folder else 'file'}; "
            f"remove it or choose another path"
        )
    return target


@contextlib.contextmanager
def atomic_folder(target, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it becomes ``target``."""
    target = check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.parent / f".{target.name}{_TMP}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, target, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, FileExistsError):
            hint = (
                ": the disk is full; free space or choose an output on another disk"
                if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else ""
            )
            raise OSError(
                e.errno,
                f"[export] writing {target} failed ({e.strerror or e}){hint}; the temporary "
                f"output was removed and any earlier {target.name} is intact",
            ) from e
        raise


def move_into_place(folder: Path, target, overwrite: bool) -> None:
    """Rename a finished ``folder`` (on target's filesystem) to ``target``, replacing it only with
    ``overwrite`` (what :func:`atomic_folder` does on success, for a folder made elsewhere)."""
    target = check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _swap_in(Path(folder), target, overwrite)


def _swap_in(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if not overwrite:  # appeared while we were writing
        raise FileExistsError(f"[export] output {target} appeared during the export; nothing was replaced")
    old = target.parent / f".{target.name}{_OLD}{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# files


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def save_shards(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    *,
    metadata: dict | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write ``model-0000k-of-0000N.safetensors`` (tensors in natural name order, a new shard when the
    next tensor would pass ``max_shard_bytes``) and ``model.safetensors.index.json``. Returns the
    file names."""
    from safetensors.torch import save_file

    if max_shard_bytes < 1:
        raise ValueError(f"[export] max_shard_bytes must be positive, got {max_shard_bytes}")
    names = sorted(tensors, key=_natural)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = tensors[n].numel() * tensors[n].element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    total = len(shards)
    files, weight_map, total_size = [], {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{total:05d}.safetensors"
        # clone: safetensors refuses tensors that share storage (tied weights, views of one buffer)
        part = {n: tensors[n].detach().to("cpu").contiguous().clone() for n in shard}
        save_file(part, str(folder / fname), metadata=dict(metadata or {"format": "pt"}))
        for n in shard:
            weight_map[n] = fname
            total_size += part[n].numel() * part[n].element_size()
        files.append(fname)
    write_json(folder / INDEX, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    return files + [INDEX]


def write_config(folder: Path, model, updates: dict | None = None, drop: tuple = ()) -> dict:
    """config.json from the model's config with ``updates`` merged in (e.g. quantization_config)."""
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]  # as save_pretrained sets it (None on a from_config model)
    for k in drop:
        cfg.pop(k, None)
    cfg.update(updates or {})
    write_json(folder / "config.json", cfg)
    return cfg


def write_generation_config(folder: Path, model) -> bool:
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return False
    write_json(folder / "generation_config.json", gen.to_diff_dict() if hasattr(gen, "to_diff_dict") else gen.to_dict())
    return True


def write_tokenizer(folder: Path, tokenizer) -> list[str]:
    """The tokenizer's own files (tokenizer.json, tokenizer_config.json, ...) via save_pretrained."""
    if tokenizer is None:
        return []
    before = set(os.listdir(folder))
    tokenizer.save_pretrained(str(folder))
    return sorted(set(os.listdir(folder)) - before)


# ---------------------------------------------------------------------------------------------
# settings, versions, model card, manifest


def settings_of(qmodel) -> dict:
    cfg = qmodel.config
    if dataclasses.is_dataclass(cfg):
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
        d["method"] = getattr(cfg, "method", type(cfg).__name__)
        return d
    return dict(cfg) if isinstance(cfg, dict) else {"config": repr(cfg)}


def seed_of(qmodel):
    rep = qmodel.report or {}
    if "seed" in rep:
        return rep["seed"]
    for key in ("settings", "calibration"):
        if isinstance(rep.get(key), dict) and "seed" in rep[key]:
            return rep[key]["seed"]
    return None


def versions(extra: dict | None = None) -> dict:
    import safetensors
    import transformers

    import calibra

    v = {
        "calibra": calibra.__version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    v.update(extra or {})
    return v


def producer() -> str:
    import calibra

    return f"calibra {calibra.__version__}"


def _yaml_scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid YAML scalar


def write_card(
    folder: Path, *, title: str, base_model: str, library_name: str, tags: list[str], settings: dict, body: str
) -> None:
    """README.md with YAML front matter (base_model, library_name, tags, the quantization settings)."""
    lines = [
        "---",
        f"base_model: {_yaml_scalar(base_model)}",
        f"library_name: {library_name}",
        "pipeline_tag: text-generation",
        "tags:",
    ]
    lines += [f"- {_yaml_scalar(t)}" for t in tags]
    lines.append("calibra:")
    for k in sorted(settings):
        v = settings[k]
        lines.append(f"  {k}: {_yaml_scalar(v) if not isinstance(v, (list, dict)) else json.dumps(v)}")
    lines += ["---", "", f"# {title}", "", body.strip(), ""]
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(
    folder: Path, *, format: str, qmodel, extra: dict | None = None, extra_versions: dict | None = None
) -> dict:
    """calibra_manifest.json: sha256 and size of every other file in ``folder`` (recursively), plus
    the producer, format, source, settings, seed and versions."""
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    man = {
        "producer": producer(),
        "format": format,
        "source": qmodel.source,
        "settings": settings_of(qmodel),
        "seed": seed_of(qmodel),
        "versions": versions(extra_versions),
        "files": files,
    }
    dense = ((getattr(qmodel, "report", None) or {}).get("summary") or {}).get("export_dense")
    if dense:  # the Linears quantize --export kept dense because a format cannot hold their widths
        man["kept_dense"] = dict(dense)
    man.update(extra or {})
    write_json(folder / MANIFEST, man)
    return man


def verify_manifest(folder) -> list[str]:
    """Problems found checking every file of the manifest (missing, size or sha256 differs); [] = ok."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return [f"no {MANIFEST} in {folder}"]
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        return [f"{MANIFEST} is not valid JSON: {e}"]
    problems = []
    for rel, entry in sorted(man.get("files", {}).items()):
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != entry.get("size"):
            problems.append(f"{rel}: size {p.stat().st_size} != {entry.get('size')} in the manifest")
        elif sha256_file(p) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest (file changed or corrupt)")
    return problems


@contextlib.contextmanager
def atomic_file(target) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (same folder, so the final step is one ``os.replace``);
    on success it replaces ``target``, on any exception it is deleted and an earlier ``target`` is intact."""
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}{_TMP}{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
