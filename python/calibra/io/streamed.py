"""A model streamed from its safetensors shards: weightless until a module is needed.

:class:`WeightStore` reads single tensors of a checked model folder (``calibra.io.inspect_model`` has
parsed and bounds-checked every header) with plain positioned reads into a fresh buffer, at their stored
dtype. No file stays memory-mapped, so the resident memory is exactly the tensors alive in the process,
and a shard that was truncated after the check fails naming the tensor it cut.

:class:`StreamedModel` builds the ``*ForCausalLM`` from its config with every parameter on the meta
device (buffers such as rotary tables stay real: they are computed, not stored) and fills one module's
parameters when asked (``load``), cast to the compute dtype, and empties them again (``release``). The
next decoder layer's tensors can be read on a background thread (``prefetch``) while the current one is
solved, so disk reads and compute overlap; reads release the GIL.

A checkpoint whose tensor names are not the model's parameter names -- transformers 5 renames some
families' tensors at load time and fuses per-expert MoE Linears into 3-D parameters -- is read through
its :class:`~calibra.io.disk_layout.DiskLayout` (learned once per model from transformers' own save-time
conversion): a renamed parameter is read under its disk name, a fused one is assembled from its experts'
tensors at their rows. :func:`streamable` says why a checkpoint cannot be streamed (a tensor missing, of
another shape, or a layout that cannot be inverted tensor by tensor).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
from torch import nn

from calibra.finite import all_finite
from calibra.io.disk_layout import DiskLayout, Fused
from calibra.io.model_reader import ModelFolder, ModelReadError
from calibra.io.safetensors_header import CorruptShardError, TensorEntry

TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class WeightStore:
    """Tensors of a checked safetensors model folder, read one at a time by name."""

    def __init__(self, folder: ModelFolder):
        if folder.weight_format != "safetensors":
            raise ModelReadError(f"[model] {folder.path}: streaming needs safetensors weights, not pickle files")
        self.folder = folder
        self.entries: dict[str, tuple[Path, int, TensorEntry]] = {}
        for header in folder.headers.values():
            base = 8 + header.header_size
            for name, entry in header.tensors.items():
                self.entries[name] = (header.path, base, entry)
        self.bytes_read = 0
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def nbytes(self, name: str) -> int:
        return self.entries[name][2].nbytes

    def dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self.entries[name][2].dtype]

    def read(self, name: str, count: int | None = None) -> torch.Tensor:
        """Tensor ``name`` at its stored dtype and shape (``count``: only the first ``count`` elements, flat)."""
        path, base, e = self.entries[name]
        dtype = TORCH_DTYPES.get(e.dtype)
        if dtype is None:
            raise ModelReadError(f"[model] {path.name}: tensor {name} has dtype {e.dtype}, which calibra cannot load")
        esize = torch.empty((), dtype=dtype).element_size()
        nbytes = e.nbytes if count is None else min(e.nbytes, count * esize)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
        got = 0
        with open(path, "rb", buffering=0) as f:
            f.seek(base + e.begin)
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got < nbytes:
            raise CorruptShardError(
                f"[model] {path}: the file ends inside tensor {name} ({got} of its {nbytes} bytes are there); "
                f"it was truncated after the job started. Re-download or re-save it; nothing was written"
            )
        with self._lock:
            self.bytes_read += nbytes
        t = buf.view(dtype)
        return t if count is not None else t.reshape(e.shape)


@contextlib.contextmanager
def _parameters_on_meta():
    """While active, every registered parameter goes to the meta device at once, before the module's
    own initialization runs on it (no memory, no time); buffers are created as usual."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def weightless_model(model_config, trust_remote_code: bool = False):
    """The ``*ForCausalLM`` of ``model_config`` with parameters on the meta device and real buffers."""
    from transformers import AutoModelForCausalLM

    kw = {"trust_remote_code": True} if trust_remote_code else {}
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(model_config, **kw)
    return model.eval()


def streamable(model: nn.Module, store: WeightStore) -> str | None:
    """None when every parameter of ``model`` is in ``store`` -- under its own name or, converted as
    transformers saves it, renamed or split per expert (:class:`DiskLayout`) -- with its shape; else why not."""
    return DiskLayout(model, store, skip=_tied_names(model)).missing


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share another parameter's tensor and are absent from the checkpoint by design
    (the output head tied to the embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return set()
    head = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if mod is head and mod is not None:
            return {f"{name}.weight"}
    return set()


class StreamedModel:
    """A weightless model whose modules are loaded from ``store`` when needed (see the module docstring).

    Args:
        model: from :func:`weightless_model`.
        store: the folder's :class:`WeightStore`.
        dtype: the compute dtype parameters are cast to while loaded.
        check_finite: refuse a NaN/Inf weight, naming the tensor (FAULTS: the whole-model load checks
            the same at load time).
        layout: where the parameters the store does not hold under their own names are (learned from
            ``model`` when not given; :func:`reopen` passes the first reader's on).
    """

    def __init__(
        self,
        model: nn.Module,
        store: WeightStore,
        dtype: torch.dtype,
        *,
        check_finite: bool = True,
        layout: DiskLayout | None = None,
    ):
        self.model, self.store, self.dtype = model, store, dtype
        self.check_finite = check_finite
        self.layout = layout if layout is not None else DiskLayout(model, store, skip=_tied_names(model))
        self._prefetched: dict[str, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        tied = _tied_names(model)
        self._tied_to = {}
        if tied:
            embed = model.get_input_embeddings()
            src = next(f"{n}.weight" for n, m in model.named_modules() if m is embed)
            self._tied_to = {t: src for t in tied}

    # -- names ------------------------------------------------------------------------------------
    def _prefix(self, module: nn.Module) -> str:
        for name, mod in self.model.named_modules():
            if mod is module:
                return f"{name}." if name else ""
        raise ValueError("[model] the module is not part of the streamed model")

    def names(self, module: nn.Module) -> list[str]:
        """The model's names of ``module``'s parameters (and stored persistent buffers), a tied head under
        the embeddings' name (the tensor the checkpoint stores)."""
        pre = self._prefix(module)
        out = [pre + n for n, _ in module.named_parameters(remove_duplicate=False)]
        out += [pre + n for n, _ in module.named_buffers() if pre + n in self.store]
        return [self._tied_to.get(n, n) for n in out]

    def disk_names(self, names: list[str]) -> list[str]:
        """The checkpoint tensors that hold the model's tensors ``names`` (a renamed one under its disk name,
        a fused one as its experts' tensors); the same names for a checkpoint transformers does not convert."""
        out = []
        for n in names:
            out += self.layout.disk_tensors(self._tied_to.get(n, n))
        return out

    # -- reads ------------------------------------------------------------------------------------
    def prefetch(self, modules: list[nn.Module]) -> None:
        """Start reading ``modules``' tensors on a background thread (at their stored dtype)."""
        self.wait()
        names = self.disk_names([n for m in modules for n in self.names(m)])

        def work():
            try:
                for n in names:
                    if n not in self._prefetched:
                        self._prefetched[n] = self.store.read(n)
            except BaseException as e:  # re-raised in the job's thread by wait()
                self._error = e

        self._thread = threading.Thread(target=work, name="calibra-prefetch", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def _take(self, name: str) -> torch.Tensor:
        t = self._prefetched.pop(name, None)
        return self.store.read(name) if t is None else t

    def read_stored(self, name: str) -> torch.Tensor:
        """One tensor at its stored dtype (for writing it through unchanged): a checkpoint tensor by its
        disk name, or a model tensor by the model's name (a fused one assembled from its experts')."""
        self.wait()
        src = self.layout.sources.get(name)
        if src is None:
            return self._take(name)
        return self._take(src) if isinstance(src, str) else self._assemble(name, src)

    def _assemble(self, name: str, src: Fused) -> torch.Tensor:
        """A fused parameter at its stored dtype, each expert's tensors copied into its rows (and checked)."""
        out = None
        for piece in src.pieces:
            t = self._take(piece.tensor)
            self._refuse_nonfinite(t, piece.tensor)
            if out is None:
                out = torch.empty(src.shape, dtype=t.dtype)
            out[piece.expert, piece.r0 : piece.r1] = t
            del t
        return out

    def stored_tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s tensors as they are now (a job changed them in place: pruned weights), in the form the
        checkpoint stores them -- the inverse of :meth:`load`: a renamed parameter under its disk name, a
        fused one cut into its experts' tensors at their rows, each at its stored dtype. The module must be
        loaded."""
        pre = self._prefix(module)
        current = dict(module.named_parameters(prefix=pre[:-1], remove_duplicate=False))
        current.update((n, b) for n, b in module.named_buffers(prefix=pre[:-1]) if n in self.store)
        out = {}
        for full, t in current.items():
            if t.device.type == "meta":
                raise RuntimeError(f"[model] {full} is not loaded: there is nothing to write")
            name = self._tied_to.get(full, full)
            src = self.layout.sources.get(name, name)
            pieces = src.pieces if isinstance(src, Fused) else [None]
            for p in pieces:
                disk, part = (src, t) if p is None else (p.tensor, t[p.expert, p.r0 : p.r1])
                out[disk] = part.detach().to(self.store.dtype(disk)) if part.is_floating_point() else part.detach()
        return out

    def _refuse_nonfinite(self, t: torch.Tensor, name: str) -> None:
        if self.check_finite and not all_finite(t):
            raise ModelReadError(
                f"[model] tensor {name} of {self.store.folder.path} holds NaN or Inf values; the "
                f"checkpoint is damaged (re-download it) or was saved from a diverged run"
            )

    def first_values(self, name: str, count: int) -> torch.Tensor | None:
        """The first ``count`` values of a parameter, in the compute dtype (for the model identity hash;
        of a fused parameter, from its first experts' tensors only)."""
        name = self._tied_to.get(name, name)
        src = self.layout.sources.get(name, name)
        if isinstance(src, str):
            return self.store.read(src, count).to(self.dtype) if src in self.store else None
        parts, left = [], count
        for piece in src.pieces:  # in the flat order of the fused tensor
            if left <= 0:
                break
            parts.append(self.store.read(piece.tensor, left))
            left -= parts[-1].numel()
        return torch.cat(parts).to(self.dtype)

    # -- load / release ---------------------------------------------------------------------------
    def load(self, module: nn.Module, device=None) -> None:
        """Fill ``module``'s parameters (cast to the compute dtype, on ``device``)."""
        self.wait()
        pre = self._prefix(module)
        for owner_name, owner in module.named_modules():
            for pname, p in list(owner._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                full = f"{pre}{owner_name + '.' if owner_name else ''}{pname}"
                name = self._tied_to.get(full, full)
                src = self.layout.sources.get(name, name)
                if isinstance(src, Fused):
                    t = self._assemble(name, src)  # each expert's tensor checked by its own name
                else:
                    t = self._take(src)
                    self._refuse_nonfinite(t, full if src == name else src)
                if t.is_floating_point():
                    t = t.to(self.dtype)
                if device is not None:
                    t = t.to(device)
                owner._parameters[pname] = nn.Parameter(t, requires_grad=False)

    def release(self, module: nn.Module) -> None:
        """Empty ``module``'s parameters again (back to the meta device)."""
        for owner in module.modules():
            for pname, p in list(owner._parameters.items()):
                if p is not None and p.device.type != "meta":
                    owner._parameters[pname] = nn.Parameter(p.detach().to("meta"), requires_grad=False)

    @property
    def bytes_read(self) -> int:
        return self.store.bytes_read


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """Serve every allocation above ``threshold`` bytes with its own mmap (glibc ``mallopt``), so freeing a
    layer's tensors returns their memory to the system. glibc otherwise raises its mmap threshold after the
    first large free (up to 32 MiB) and carves later tensors from a heap that fragments and never shrinks:
    quantizing Llama-3-8B layer by layer grew RSS by about 70 MB per layer (2.7 -> 4.8 GiB over 32 layers);
    with a fixed threshold it stayed flat. Setting it also turns glibc's adjustment off. Returns whether it
    was set (False off glibc)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def reopen(streamed: StreamedModel) -> StreamedModel:
    """A second, independent streamed model of the same checkpoint (its own weightless model and read
    counter): an evaluation pass beside a job that streams the same folder."""
    store = WeightStore(streamed.store.folder)
    return StreamedModel(
        weightless_model(streamed.model.config),
        store,
        streamed.dtype,
        check_finite=streamed.check_finite,
        layout=streamed.layout,
    )


def open_streamed(folder: ModelFolder, model_config, dtype: torch.dtype, *, trust_remote_code: bool = False):
    """``(StreamedModel, None)`` or ``(None, why streaming is impossible for this checkpoint)``."""
    store = WeightStore(folder)
    model = weightless_model(model_config, trust_remote_code)
    layout = DiskLayout(model, store, skip=_tied_names(model))  # learned once, shared with reopen()
    if layout.missing is not None:
        return None, layout.missing
    return StreamedModel(model, store, dtype, layout=layout), None


__all__ = [
    "WeightStore",
    "StreamedModel",
    "limit_heap_growth",
    "weightless_model",
    "streamable",
    "open_streamed",
    "reopen",
    "TORCH_DTYPES",
]
