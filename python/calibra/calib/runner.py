"""The layer-sequential runner: calibrate a decoder model one layer at a time on the compute device.

How it works:

1. **Capture.** Every decoder layer is temporarily replaced by a stub, and the base model is run on
   each batch with only its pre-layer modules (embedding, rotary embedding) on the device. Each stub
   records the keyword arguments the model passes to its layer (causal/sliding-window mask,
   ``position_embeddings``, ``position_ids``) -- so per-layer mask types (Qwen2/Qwen3 ``layer_types``)
   come out right without re-implementing mask creation -- and the first stub records the layer-0
   hidden states. The last stub raises a private exception, so the final norm and ``lm_head`` never run.
2. **Per layer.** The layer moves to the device; every batch runs through it with observer hooks
   attached (observers see only unpadded tokens: rows where the attention mask is True). Then
   ``on_layer(index, layer, stats)`` runs -- the place where a quantizer or pruner compresses the
   layer in place from the statistics just collected -- and the layer's outputs for the next layer are
   produced: from the compressed layer when ``feed_compressed=True`` (true-sequential: later layers
   calibrate on what the compressed model really computes), else from the first pass. The layer moves
   back to where it was.
3. **On demand** (``collect_on_demand=True``, true-sequential quantization): step 2's first pass is
   skipped and ``on_layer`` asks for statistics with :meth:`LayerRunner.collect` -- one group of modules
   at a time, hooks on that group only, the forward stopped as soon as the last of them has seen its
   input -- and may :meth:`LayerRunner.freeze` a finished block (the attention) so later passes replay
   its recorded output instead of recomputing it.

Modules that read the very same input tensor (q/k/v, gate/up) share one Hessian
(``HessianObserver.linear_shared``): it is accumulated once and aliased.

Memory. Peak device memory is one decoder layer, one batch of activations and the layer's statistics
(moved to host memory after the layer); it does not grow with the depth of the model. Host memory
holds the inputs and outputs of the current layer for all samples: ``2 x S x L x hidden x bytes(dtype)``
(128 samples x 512 tokens x 4096 hidden in bf16 = 1 GiB), plus the per-layer attention masks and
rotary tables recorded at capture (shared between layers of one mask type), and, while a frozen
module is replayed, its recorded outputs (one more ``S x L x hidden`` for the attention block).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from calibra.calib.moe import DEFAULT_TAU, MoERecorder
from calibra.calib.observers import CrossObserver, Observer, check_activations_finite, make_observers
from calibra.calib.stats import CalibrationStats, model_identity
from calibra.compat.transformers import drop_cache_kwargs, experts_call_routing


class _StopCapture(Exception):
    """Raised by the last layer stub: everything after the decoder layers is not needed."""


class _StopLayer(Exception):
    """Raised by a hook of a restricted collection (``LayerRunner.collect``) once every module it asked
    for has seen its input: the rest of the layer's forward would be wasted work."""


class CalibrationOOMError(RuntimeError):
    """Out of memory while calibrating a layer. ``partial_stats`` holds the finished layers."""

    def __init__(self, msg: str, partial_stats: CalibrationStats | None, layers_done: int):
        super().__init__(msg)
        self.partial_stats = partial_stats
        self.layers_done = layers_done


class _LayerStub(nn.Module):
    """Stands in for decoder layer ``index`` during the capture: records how the model calls it -- the
    hidden states (first positional argument, or the ``hidden_states`` keyword), every other positional
    argument and every keyword (masks, position embeddings, position ids, a hybrid's extra state) -- and
    passes the hidden states on unchanged."""

    def __init__(self, index: int, sink: dict, last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last
        self.form: int | None = None  # what to return: the hidden states, or a tuple of that length

    def __getattr__(self, name: str):
        # the model may read attributes of its layers while it calls them (a hybrid's block type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None:
                raise
            return getattr(original[0], name)

    def forward(self, *args, **kwargs):
        if args:
            hidden_states, rest, by_name = args[0], args[1:], False
        elif "hidden_states" in kwargs:
            hidden_states, rest, by_name = kwargs.pop("hidden_states"), (), True
        else:
            raise TypeError(
                f"[calibrate] decoder layer {self.index} was called without hidden states (no positional "
                f"argument, no hidden_states keyword: {', '.join(sorted(kwargs))}); this family is not supported"
            )
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        elif hidden_states is not self.sink.get("out"):
            # the model changed the hidden states between two layers (or unpacked our output differently
            # than we guessed): replaying the layers one after another would compute something else
            self.sink.setdefault("broken", self.index)
        self.sink[self.index] = LayerCall(rest, kwargs, by_name)
        if self.last:
            raise _StopCapture
        self.sink["out"] = hidden_states
        if self.form is None:
            return hidden_states
        return (hidden_states,) + (None,) * (self.form - 1)


# What a capture stub returns, tried in turn on the first batch: most families take the layer's output
# as the hidden states; some unpack a tuple (``hidden, attn_weights = layer(...)``).
_OUTPUT_FORMS = (None, 2, 3)


class LayerCall:
    """How the model calls one decoder layer, minus the hidden states: ``layer(x, *args, **kwargs)`` (or
    ``layer(hidden_states=x, *args, **kwargs)`` when ``by_name``). KV caches are dropped: replayed calls
    never cache."""

    __slots__ = ("args", "kwargs", "by_name")

    def __init__(self, args: tuple, kwargs: dict, by_name: bool):
        self.args, self.kwargs, self.by_name = args, kwargs, by_name

    def without_cache(self) -> LayerCall:
        kw = {k: (None if _is_cache(v) else v) for k, v in drop_cache_kwargs(self.kwargs).items()}
        if "use_cache" in kw:  # only where the model passes it: a strict signature may not take it
            kw["use_cache"] = False
        return LayerCall(tuple(None if _is_cache(a) else a for a in self.args), kw, self.by_name)

    def mapped(self, fn, memo: dict) -> LayerCall:
        return LayerCall(_map_tensors(self.args, fn, memo), _map_tensors(self.kwargs, fn, memo), self.by_name)

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run ``layer`` on ``x``; the new hidden states (a tuple output's first element)."""
        out = layer(*self.args, hidden_states=x, **self.kwargs) if self.by_name else layer(x, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _no_cache_kwargs(base: nn.Module) -> dict:
    """``{"use_cache": False}`` when the base model's forward takes that keyword (most do)."""
    import inspect

    params = inspect.signature(base.forward).parameters
    takes = "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if takes else {}


def _is_cache(obj) -> bool:
    from calibra.compat.transformers import cache_classes

    return isinstance(obj, cache_classes()[0])


class _Replay:
    """A module declared final for the rest of a layer (``LayerRunner.freeze``): its output for each
    batch is recorded on the next pass that runs it and replayed, not recomputed, on later passes."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.outputs: dict[int, object] = {}
        self.handle = None


def _map_tensors(obj, fn, memo: dict):
    """Apply ``fn`` to every tensor in nested tuples/lists/dicts, once per distinct tensor object."""
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, fn(obj))  # keep obj alive so its id is not reused
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn, memo) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, memo) for k, v in obj.items()}
    return obj


def _module_device(mod: nn.Module) -> torch.device:
    for p in mod.parameters():
        return p.device
    return torch.device("cpu")


class LayerRunner:
    """Run calibration text through a model layer by layer and collect statistics.

    Args:
        model: a Hugging Face ``*ForCausalLM`` of a supported architecture (anywhere: CPU by default).
        adapter: its ``ModelAdapter`` (default: from the registry).
        device: the compute device for one layer at a time (default: CUDA if available, else CPU).
        observers: observer kinds (``"hessian"``, ``"norms"``, ``"ranges"``, ``"kv"``) or instances.
        hessian_dtype: float32 (default) or float64 Hessian sums.
        moe: a ``MoERecorder`` (default: a new one when the model has MoE blocks).
        on_layer: ``on_layer(index, layer, stats)`` called after a layer's statistics are complete,
            with the layer still on the device; it may modify the layer in place (compression).
        feed_compressed: produce each layer's outputs from the layer after ``on_layer`` (true-sequential).
        collect_on_demand: skip the pass that collects a layer's statistics before ``on_layer``; the
            callback asks for what it needs with :meth:`collect` (a true-sequential quantizer collects
            q/k/v, then o, then gate/up, then down, each from the layer as compressed so far). Needs
            ``feed_compressed``.
        check_finite: raise on NaN/Inf activations (FAULTS row 17); on by default.
        progress: show a tqdm bar over layers.
        keep_layer_stats: keep every layer's observer tensors (Hessians...) for the returned statistics. A
            quantizer that consumes them in ``on_layer`` passes False: host memory then holds one layer's
            Hessians instead of the whole model's (token counts and MoE routing are always kept).
        weights: a ``calibra.io.streamed.StreamedModel`` when ``model`` is its weightless model: each layer
            (and the embeddings, for the capture) is loaded just before it runs, the next layer is read
            ahead while ``after_layer`` writes this one (not during its solves, the job's memory peak), and
            the layer is emptied again afterwards.
        gptaq: also propagate the full-precision model's hidden states beside the compressed ones (GPTAQ's
            asymmetric calibration, ``calibra.quant.gptaq``): before ``on_layer`` each layer runs once,
            uncompressed, on them, recording every Linear's input, and the statistics gain
            ``gptaq/cross/<m>`` (:class:`~calibra.calib.observers.CrossObserver`) wherever a Hessian is
            collected. Host memory: one more ``S x L x hidden`` stream, and the layer's Linear inputs (one per
            distinct input: ``S x L x (3 hidden + intermediate)`` for a Llama layer). Not with ``weights``
            (streaming) or a resumed run.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter=None,
        *,
        device=None,
        observers=("hessian",),
        hessian_dtype: torch.dtype = torch.float32,
        moe: MoERecorder | None = None,
        on_layer: Callable | None = None,
        feed_compressed: bool = False,
        check_finite: bool = True,
        progress: bool = True,
        desc: str = "calibrating",
        keep_layer_stats: bool = True,
        collect_on_demand: bool = False,
        weights=None,
        combine: Callable | None = None,
        gptaq: bool = False,
    ):
        if adapter is None:
            from calibra.models import get_adapter

            adapter = get_adapter(model)
        self.model, self.adapter = model, adapter
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        obs = list(observers)
        self.observers: list[Observer] = [o for o in obs if isinstance(o, Observer)] + make_observers(
            [o for o in obs if not isinstance(o, Observer)], hessian_dtype
        )
        self.hessian_dtype = hessian_dtype
        self.cross: CrossObserver | None = None
        if gptaq:
            if weights is not None:
                raise ValueError(
                    "[calibrate] gptaq (the full-precision stream) is not implemented for a streamed model yet"
                )
            if not feed_compressed:
                raise ValueError(
                    "[calibrate] gptaq pairs full-precision and compressed inputs: it needs feed_compressed"
                )
            self.cross = CrossObserver(hessian_dtype)
            self.cross.fp_rows = self._fp_rows_of
            self.observers.append(self.cross)
        self._fp_hidden: list[torch.Tensor] | None = None  # the full-precision stream (gptaq)
        self._fp_inputs: dict[str, list[torch.Tensor]] = {}  # key -> per batch, this layer's fp input rows
        has_moe = any(adapter.moe_blocks(layer) for layer in adapter.layers)
        self.moe = moe if moe is not None else (MoERecorder() if has_moe else None)
        self.on_layer, self.feed_compressed = on_layer, feed_compressed
        if collect_on_demand and not (feed_compressed and on_layer is not None):
            raise ValueError("[calibrate] collect_on_demand needs an on_layer callback and feed_compressed=True")
        self.collect_on_demand = collect_on_demand
        self.check, self.progress, self.desc = check_finite, progress, desc
        self.keep_layer_stats = keep_layer_stats
        self.weights = weights
        # data parallelism: combine(holders, select) merges the statistics a pass collected with the
        # other ranks' before anything reads them (calibra.calib.distributed.all_reduce_statistics)
        self.combine = combine
        self.seconds = 0.0
        # per-batch context read by the hooks
        self._mask: torch.Tensor | None = None
        self._all_real = True
        self._last_checked: torch.Tensor | None = None  # the tensor _guard saw last (shared inputs)
        self._last_input = None  # (input tensor, stats key, selected rows) of the last Linear hook
        self._pending: set[str] | None = None  # hooked keys a pass still waits for before it stops early
        self._rows: torch.Tensor | None = None
        self._samples: list[int] = []
        self._ctx = None  # the current layer's inputs while on_layer runs (for recollect)
        self._frozen: list[_Replay] = []  # modules replayed until the layer's outputs are produced
        self._batch = 0  # index of the batch being run (for the replays)

    # -- capture -----------------------------------------------------------------------------------
    def _capture(self, batches) -> tuple[list[torch.Tensor], list[list[dict]]]:
        layers = self.adapter.layers
        n = len(layers)
        originals = list(layers)
        pre = self.adapter.pre_layer_modules()
        pre_dev = [_module_device(m) for m in pre]
        hidden, kwargs = [], []
        try:
            for m in pre:
                if self.weights is not None:
                    self.weights.load(m, self.device)
                else:
                    m.to(self.device)
            for i in range(n):
                layers[i] = _LayerStub(i, {}, i == n - 1)
                layers[i].__dict__["original"] = (originals[i],)  # not a submodule: no parameters move
            sink = {}
            for i in range(n):
                layers[i].sink = sink
            no_cache = _no_cache_kwargs(self.adapter.base)
            for b, (ids, mask) in enumerate(batches):
                # the first batch finds the output shape the model expects of its layers (see _OUTPUT_FORMS)
                for form in _OUTPUT_FORMS if b == 0 else (layers[0].form,):
                    for stub in layers:
                        stub.form = form
                    sink.clear()
                    try:
                        self.adapter.base(
                            input_ids=ids.to(self.device), attention_mask=mask.to(self.device).long(), **no_cache
                        )
                    except _StopCapture:
                        if "broken" not in sink:
                            break
                        if form == _OUTPUT_FORMS[-1] or b > 0:
                            raise TypeError(
                                f"[calibrate] {type(self.model).__name__} does not pass each decoder layer's output "
                                f"unchanged to the next (layer {sink['broken']} received other hidden states): "
                                f"a layer-by-layer pass cannot reproduce it; this family is not supported"
                            ) from None
                    except (TypeError, ValueError, AttributeError, IndexError):
                        if form == _OUTPUT_FORMS[-1] or b > 0:
                            raise
                    else:  # pragma: no cover - the last stub always raises
                        raise RuntimeError("[calibrate] the model did not call its last decoder layer")
                memo: dict = {}
                to_cpu = lambda t: t.detach().to("cpu")  # noqa: E731
                hidden.append(to_cpu(sink["hidden"]))
                per_layer = []
                for i in range(n):
                    per_layer.append(sink[i].without_cache().mapped(to_cpu, memo))
                kwargs.append(per_layer)
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            for m, d in zip(pre, pre_dev):
                if self.weights is not None:
                    self.weights.release(m)
                else:
                    m.to(d)
        return hidden, kwargs

    # -- hooks -------------------------------------------------------------------------------------
    def _select(self, x: torch.Tensor) -> torch.Tensor:
        m = self._mask
        if m is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape):
            # x[m] keeps the trailing dims; without padding the same rows come from a free reshape
            return x.reshape(-1, *x.shape[2:]) if self._all_real else x[m]
        return x.reshape(-1, x.shape[-1])

    def _select_routed(self, key: str, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The real tokens of an experts call's flattened ``x [batch*seq, H]`` and their ``index [., k]``."""
        m = self._mask
        if m is None or self._all_real:
            return x, index
        if x.shape[0] != m.numel():
            raise RuntimeError(
                f"[calibrate] the experts of {key} were called with {x.shape[0]} tokens for a batch of {m.numel()}; "
                f"their padding cannot be told apart"
            )
        keep = m.reshape(-1)
        return x[keep], index[keep]

    def _guard(self, x: torch.Tensor, where: str) -> None:
        # q/k/v (and gate/up) receive the very same input tensor: check it once, not once per Linear
        if self.check and x is not self._last_checked:
            check_activations_finite(x, self._mask, self._samples, where)
            self._last_checked = x

    def _seen(self, key: str) -> None:
        """A hooked module saw its input; once every hooked module has, a pass whose outputs are not kept
        stops the layer's forward here (``_pending`` is None in passes that run to the end)."""
        if self._pending is not None:
            self._pending.discard(key)
            if not self._pending:
                raise _StopLayer

    def _hooked_keys(self, index: int, layer: nn.Module, only: set[str] | None) -> tuple[list, list]:
        """The (key, Linear) pairs and (key, MoE block) pairs to hook, restricted to ``only`` (statistics
        keys such as ``model.layers.3.mlp.down_proj``; an expert key selects its whole MoE block)."""
        lname = self.adapter.layer_name(index)
        linears = [(f"{lname}.{n}", m) for n, m in self.adapter.linear_modules(layer).items()]
        blocks = [(f"{lname}.{b.name}", b) for b in self.adapter.moe_blocks(layer)] if self.moe is not None else []
        if only is not None:
            linears = [(k, m) for k, m in linears if k in only]
            blocks = [(k, b) for k, b in blocks if k in only or any(o.startswith(k + ".experts.") for o in only)]
        return linears, blocks

    def _attach(self, index: int, layer: nn.Module, only: set[str] | None = None) -> tuple[list, set[str]]:
        """Attach the observer hooks to layer ``index`` (to the modules in ``only``, when given); returns
        the hook handles and the keys the hooks report to :meth:`_seen`."""
        handles = []
        linears, blocks = self._hooked_keys(index, layer, only)
        lname = self.adapter.layer_name(index)
        linear_obs = [o for o in self.observers if o.kind != "kv"]
        if linear_obs:
            for key, mod in linears:

                def pre_hook(module, args, key=key):
                    x = args[0]
                    last = self._last_input
                    if last is not None and x is last[0]:
                        # q/k/v (gate/up) read the very same tensor: the observers may share one statistic
                        for o in linear_obs:
                            o.linear_shared(key, last[1], last[2])
                    else:
                        self._guard(x, f"input of {key}")
                        xs = self._select(x)
                        for o in linear_obs:
                            o.linear(key, xs)
                        self._last_input = (x, key, xs)
                    self._seen(key)

                handles.append(mod.register_forward_pre_hook(pre_hook))
        for key, block in blocks:

            def moe_hook(module, args, kwargs, key=key, block=block):
                if block.routed_at_experts:  # the experts' call: the tokens and the experts the model chose
                    x, index = self._select_routed(key, *experts_call_routing(args, kwargs))
                    self._guard(x, f"input of {key}")
                else:
                    self._guard(args[0], f"input of {key}")
                    x, index = self._select(args[0]), None
                self.moe.observe(key, block, x, self._rows, self._samples, linear_obs, index=index)
                self._seen(key)

            handles.append(block.hook_module.register_forward_pre_hook(moe_hook, with_kwargs=True))
        kv_obs = [o for o in self.observers if o.kind == "kv"]
        if kv_obs and only is None:
            k_src, v_src = self.adapter.key_value_sources(layer)
            heads = self.adapter.num_kv_heads
            for which, src in (("k", k_src), ("v", v_src)):

                def kv_hook(module, args, out, which=which):
                    xs = self._select(out)
                    xs = xs.reshape(xs.shape[0], -1)
                    for o in kv_obs:
                        o.kv(lname, which, xs, heads)

                handles.append(src.register_forward_hook(kv_hook))
        keys = {k for k, _ in blocks}
        if linear_obs:
            keys |= {k for k, _ in linears}
        return handles, keys

    def _set_batch(self, mask: torch.Tensor, samples: list[int]) -> None:
        self._mask = mask.to(self.device, torch.bool)
        self._last_checked = None
        self._last_input = None
        self._all_real = bool(self._mask.all())  # concat packing never pads: skip the boolean gathers
        self._rows = self._mask.nonzero()[:, 0]
        self._samples = samples

    # -- stats -------------------------------------------------------------------------------------
    @property
    def token_mask(self) -> torch.Tensor | None:
        """The batch being run's token mask ``[batch, seq]`` on the device (True = a real token): for hooks
        outside the observers (``calibra.quant.kv_fp8.KVRecorder``) that must skip padding too."""
        return self._mask

    def stats(self, token_count: int = 0, extra: dict | None = None) -> CalibrationStats:
        """The statistics collected so far as a ``CalibrationStats`` (tensors are not copied)."""
        import calibra

        tensors, counts = {}, {}
        for o in self.observers:
            tensors.update(o.tensors)
            counts.update(o.counts)
        meta = {
            "format": "calibra-stats",
            "format_version": 1,
            "calibra_version": calibra.__version__,
            "model": {
                "id": self._model_id,
                "model_type": getattr(self.model.config, "model_type", None),
                "num_layers": len(self.adapter.layers),
            },
            "observers": sorted(o.kind for o in self.observers),
            "hessian_dtype": str(self.hessian_dtype).replace("torch.", ""),
            "token_count": int(token_count),
        }
        if self.moe is not None:
            tensors.update(self.moe.tensors)
            counts.update(self.moe.counts)
            meta["moe"] = {"blocks": dict(self.moe.blocks), "quota": None, "tau": DEFAULT_TAU}
        meta.update(extra or {})
        return CalibrationStats(tensors=tensors, counts=counts, metadata=meta)

    # -- main loop ---------------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        batch_size: int = 1,
        sample_ids: list[int] | None = None,
        extra_metadata: dict | None = None,
        start_layer: int = 0,
        start_hidden: list[torch.Tensor] | None = None,
        after_layer: Callable | None = None,
    ) -> CalibrationStats:
        """Calibrate on ``input_ids [S, L]`` (int64, right-padded) with ``attention_mask [S, L]`` (bool,
        False at padding) and return the statistics. ``sample_ids`` name the rows in error messages.

        Resuming (``calibra.io.checkpoint``): ``start_layer`` skips the finished layers, whose outputs
        ``start_hidden`` (one tensor per batch) become the inputs of ``start_layer``; ``after_layer(i, outs)``
        is called after each layer with the next layer's inputs, to checkpoint them."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        if input_ids.dim() != 2:
            raise ValueError(f"[calibrate] input_ids must be [samples, seq_len], got {list(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        S, L = input_ids.shape
        if batch_size < 1:
            raise ValueError(f"[calibrate] batch_size must be >= 1, got {batch_size}")
        sample_ids = list(range(S)) if sample_ids is None else list(sample_ids)
        self._model_id = model_identity(self.model, self.weights.first_values if self.weights else None)
        was_training = self.model.training
        self.model.eval()
        starts = list(range(0, S, batch_size))
        batches = [(input_ids[s : s + batch_size], attention_mask[s : s + batch_size]) for s in starts]
        masks = [m for _, m in batches]
        ids_of = [sample_ids[s : s + batch_size] for s in starts]
        tokens = int(attention_mask.sum())
        try:
            hidden, kwargs = self._capture(batches)
            if self.cross is not None:
                if start_hidden is not None or start_layer:
                    raise ValueError("[calibrate] gptaq cannot resume: the full-precision stream is not checkpointed")
                self._fp_hidden = list(hidden)
            if start_hidden is not None:
                if len(start_hidden) != len(hidden) or any(a.shape != b.shape for a, b in zip(start_hidden, hidden)):
                    raise ValueError("[calibrate] resumed hidden states do not match the calibration batches")
                hidden = list(start_hidden)
            layers = self.adapter.layers
            bar = tqdm(
                range(start_layer, len(layers)),
                desc=self.desc,
                unit="layer",
                disable=not self.progress,
                initial=start_layer,
                total=len(layers),
            )
            for i in bar:
                layer = layers[i]
                if self.weights is not None:
                    self.weights.load(layer)
                home = _module_device(layer)
                try:
                    hidden = self._run_layer(i, layer, hidden, kwargs, masks, ids_of, tokens, extra_metadata)
                except torch.OutOfMemoryError as e:
                    layer.to(home)
                    partial = self.stats(tokens, extra_metadata)
                    raise CalibrationOOMError(
                        f"[calibrate] out of memory on {self.device} at layer {i} ({self.adapter.layer_name(i)}) "
                        f"with seq_len {L}, batch size {batch_size}: lower --batch-size (1 is the minimum) or "
                        f"--seq-len, use --hessian-dtype float32, or run on --device cpu (layers wait in host "
                        f"memory; only one is on the device). Statistics of the {i} finished layers are kept in "
                        f"the exception's partial_stats.",
                        partial,
                        i,
                    ) from e
                layer.to(home)
                if self.weights is not None and i + 1 < len(layers):
                    # read the next layer while this one is written: not during the solves, whose
                    # workspace is the job's peak (the read-ahead would add a layer to it)
                    self.weights.prefetch([layers[i + 1]])
                if after_layer is not None:
                    after_layer(i, hidden)
                if self.weights is not None:
                    self.weights.release(layer)
        finally:
            self.model.train(was_training)
            self._mask = self._rows = self._last_checked = self._last_input = None
            self._fp_hidden, self._fp_inputs = None, {}
        self.seconds = time.perf_counter() - t0
        return self.stats(tokens, extra_metadata)

    def recollect(self, index: int, layer: nn.Module) -> CalibrationStats:
        """Collect all statistics of layer ``index`` again, from the same inputs, with the layer as it is
        now (``collect(index, layer)``). Only valid inside ``on_layer``."""
        return self.collect(index, layer)

    def collect(self, index: int, layer: nn.Module, modules=None) -> CalibrationStats:
        """Collect statistics of layer ``index`` from the layer's inputs, with the layer as it is now --
        for ``on_layer`` callbacks that compress a layer in steps (AutoGPTQ's true-sequential: quantize
        q/k/v, then collect o_proj's Hessian from the quantized attention, and so on).

        ``modules``: the statistics keys to collect (``model.layers.3.self_attn.o_proj``; an MoE expert
        key collects its whole block), default all of the layer's. Their earlier statistics are replaced;
        the others are untouched. With ``modules`` given, each batch's forward stops as soon as the last of
        them has seen its input, so collecting q/k/v costs an input norm, not a layer. Only valid inside
        ``on_layer`` (the layer's inputs are kept for the duration of the callback)."""
        ctx = self._ctx
        if ctx is None or ctx[0] != index:
            raise RuntimeError(
                f"[calibrate] collect({index}) / recollect({index}) called outside on_layer of that layer"
            )
        _, hidden, kwargs, masks, ids_of, tokens, extra = ctx
        only = None if modules is None else set(modules)
        stale = self._selector(index, layer, only)
        for o in list(self.observers) + ([self.moe] if self.moe is not None else []):
            for k in [k for k in o.tensors if stale(k)]:
                del o.tensors[k]
            for k in [k for k in o.counts if stale(k)]:
                del o.counts[k]
        if self.moe is not None:  # per-sample routing of a block observed again is counted again
            for k in [k for k in self.moe.sample_counts if stale("moe/" + k)]:
                del self.moe.sample_counts[k]
        self._forward_layer(index, layer, hidden, kwargs, masks, ids_of, keep=False, only=only)
        return self.stats(tokens, extra)

    def _selector(self, index: int, layer: nn.Module, only: set[str] | None) -> Callable[[str], bool]:
        """Which statistics names (``kind/field/key``, counts ``kind/key``) a pass over layer ``index``
        writes: all of the layer's, or ``only``'s modules' (an MoE block's: its experts' too)."""
        if only is None:
            name = self.adapter.layer_name(index)
            prefix = name + "."
            # a module's statistics (``kind/field/<layer>.<module>``) or the layer's own (K/V: ``kv/field/<layer>``)
            return lambda k: prefix in k or k.endswith("/" + name)
        _, blocks = self._hooked_keys(index, layer, only)
        block_keys = [k for k, _ in blocks]
        return lambda k: (
            k.split("/")[-1] in only or any(k.split("/")[-1] == b or b + ".experts." in k for b in block_keys)
        )

    def input_groups(self, index: int, layer: nn.Module) -> list[list[str]]:
        """Inside ``on_layer`` of layer ``index``: the statistics keys of the layer's Linear-like modules in
        the order the layer calls them on its first batch, consecutive modules that read the very same
        input tensor grouped (q/k/v, gate/up -- whatever the family names them). A module called twice
        counts at its first call; modules not called on that batch are left out."""
        ctx = self._ctx
        if ctx is None or ctx[0] != index:
            raise RuntimeError(f"[calibrate] input_groups({index}) called outside on_layer of that layer")
        _, hidden, kwargs, masks, ids_of, _, _ = ctx
        lname = self.adapter.layer_name(index)
        groups: list[list[str]] = []
        seen: set[str] = set()
        last: list = [None]

        def hook(module, args, key):
            if key in seen or not args:
                return
            seen.add(key)
            if groups and args[0] is last[0]:
                groups[-1].append(key)
            else:
                groups.append([key])
            last[0] = args[0]

        handles = [
            m.register_forward_pre_hook(lambda mod, args, key=f"{lname}.{n}": hook(mod, args, key))
            for n, m in self.adapter.linear_modules(layer).items()
        ]
        try:
            self._set_batch(masks[0], ids_of[0])
            self._replay(0)
            kwargs[0][index].mapped(lambda t: t.to(self.device), {})(layer, hidden[0].to(self.device))
        finally:
            for h in handles:
                h.remove()
            last[0] = None
        return groups

    def release(self, index: int, modules) -> None:
        """Inside ``on_layer`` of layer ``index``: the statistics of ``modules`` (keys as in :meth:`collect`)
        are consumed and will not be read again; drop them now rather than at the end of the layer, so the
        next group's solve does not carry them (only for a runner made with ``keep_layer_stats=False``)."""
        if self.keep_layer_stats:
            return
        keys = set(modules)
        for o in self.observers:
            for k in [k for k in o.tensors if k.split("/")[-1] in keys]:
                del o.tensors[k]

    def freeze(self, index: int, module: nn.Module) -> None:
        """Declare, inside ``on_layer`` of layer ``index``, that ``module`` (the attention block once o_proj
        is quantized) and everything before it in the layer are final: the module's input and weights do
        not change again. Its output for each batch is then recorded on the next pass and replayed on the
        later ones (the remaining collections and the pass that produces the layer's outputs) instead of
        recomputed. Costs host memory for one more activation per token (as large as a layer's inputs)."""
        if self._ctx is None or self._ctx[0] != index:
            raise RuntimeError(f"[calibrate] freeze({index}) called outside on_layer of that layer")
        if any(r.module is module for r in self._frozen):
            return
        rep = _Replay(module)

        def record(mod, args, out, rep=rep):
            if self._batch not in rep.outputs:
                # a copy, also on the CPU: the layer may update the returned tensor in place
                rep.outputs[self._batch] = _map_tensors(out, lambda t: t.detach().to("cpu", copy=True), {})

        rep.handle = module.register_forward_hook(record)
        self._frozen.append(rep)

    def _replay(self, b: int) -> None:
        """Before batch ``b``: frozen modules with a recorded output return it instead of computing."""
        self._batch = b
        for rep in self._frozen:
            if b in rep.outputs:
                out = _map_tensors(rep.outputs[b], lambda t: t.to(self.device, copy=True), {})
                rep.module.forward = lambda *args, _out=out, **kw: _out  # instance attribute: nn.Module calls it
            else:
                rep.module.__dict__.pop("forward", None)

    def _unfreeze(self) -> None:
        for rep in self._frozen:
            rep.handle.remove()
            rep.module.__dict__.pop("forward", None)
        self._frozen = []

    def _forward_layer(self, i, layer, hidden, kwargs, masks, ids_of, keep: bool, only: set[str] | None = None) -> list:
        """One pass of every batch through ``layer`` with the observer hooks attached (to ``only``'s
        modules, when given). A pass whose outputs are not kept stops as soon as every hooked module has
        seen its input (the K/V observers' output hooks need the attention to finish: no stop with them)."""
        dev = self.device
        handles, keys = self._attach(i, layer, only)
        kv_hooked = only is None and any(o.kind == "kv" for o in self.observers)
        stop_early = not keep and bool(keys) and not kv_hooked
        outs = []
        try:
            for b, x in enumerate(hidden):
                self._set_batch(masks[b], ids_of[b])
                self._replay(b)
                self._pending = set(keys) if stop_early else None
                call = kwargs[b][i].mapped(lambda t: t.to(dev), {})
                try:
                    out = call(layer, x.to(dev))
                except _StopLayer:
                    continue
                if keep:
                    self._guard(out, f"output of {self.adapter.layer_name(i)}")
                    outs.append(out.to("cpu"))
            if self.combine is not None and (keys or kv_hooked or self.moe is not None):
                holders = list(self.observers) + ([self.moe] if self.moe is not None else [])
                self.combine(holders, self._selector(i, layer, only))
        finally:
            self._pending = None
            self._last_input = self._last_checked = None  # a batch's input can be 235 MB (8B's down_proj)
            for h in handles:
                h.remove()
        return outs

    def _run_layer(self, i, layer, hidden, kwargs, masks, ids_of, tokens, extra):
        layer.to(self.device)
        try:
            return self._compress_layer(i, layer, hidden, kwargs, masks, ids_of, tokens, extra)
        finally:
            self._unfreeze()
            self._fp_inputs = {}  # this layer's full-precision inputs are not read again

    def _fp_rows_of(self, key: str) -> torch.Tensor | None:
        """The full-precision input rows of ``key`` for the batch being run (CrossObserver.fp_rows)."""
        rows = self._fp_inputs.get(key)
        row = None if rows is None else rows[self._batch]
        return None if row is None else row.to(self.device)

    def _full_precision_pass(self, i, layer, kwargs, masks, ids_of) -> None:
        """GPTAQ: run the still uncompressed layer ``i`` on the full-precision stream; record each Linear's
        input rows per batch (one copy per distinct input tensor: q/k/v share theirs) and advance the stream
        to the layer's full-precision outputs. No observer sees this pass."""
        dev = self.device
        linears, _ = self._hooked_keys(i, layer, None)
        records: dict[str, list[torch.Tensor]] = {k: [] for k, _ in linears}
        last: list = [None, None]  # (input tensor, its rows on the host) of the batch's last hook

        def hook(module, args, key):
            x = args[0]
            if x is not last[0]:
                last[0], last[1] = x, self._select(x).to("cpu")
            records[key].append(last[1])

        handles = [m.register_forward_pre_hook(lambda mod, args, key=k: hook(mod, args, key)) for k, m in linears]
        outs = []
        try:
            for b, x in enumerate(self._fp_hidden):
                self._set_batch(masks[b], ids_of[b])
                last[0] = last[1] = None
                before = {k: len(v) for k, v in records.items()}
                out = kwargs[b][i].mapped(lambda t: t.to(dev), {})(layer, x.to(dev))
                self._guard(out, f"output of {self.adapter.layer_name(i)} (full precision)")
                outs.append(out.to("cpu"))
                for k, v in records.items():  # a Linear not called on this batch (or called twice): no pairing
                    if len(v) != before[k] + 1:
                        del v[before[k] :]
                        v.append(None)
        finally:
            for h in handles:
                h.remove()
            last[0] = last[1] = None
            self._last_checked = None
        self._fp_inputs = {k: v for k, v in records.items() if any(r is not None for r in v)}
        self._fp_hidden = outs

    def _compress_layer(self, i, layer, hidden, kwargs, masks, ids_of, tokens, extra):
        dev = self.device
        if self.cross is not None:  # before anything compresses the layer
            self._full_precision_pass(i, layer, kwargs, masks, ids_of)
        keep_first = not (self.feed_compressed and self.on_layer is not None)
        # on demand, on_layer collects what it needs itself (collect()): no pass before it
        outs = (
            []
            if self.collect_on_demand
            else self._forward_layer(i, layer, hidden, kwargs, masks, ids_of, keep=keep_first)
        )
        if self.on_layer is not None:
            self._ctx = (i, hidden, kwargs, masks, ids_of, tokens, extra)
            try:
                self.on_layer(i, layer, self.stats(tokens, extra))
            finally:
                self._ctx = None
        lname = self.adapter.layer_name(i) + "."
        for o in self.observers:
            o.to_cpu(lname)
            if not self.keep_layer_stats:
                for k in [k for k in o.tensors if lname in k]:
                    del o.tensors[k]
        if not keep_first:
            for b, x in enumerate(hidden):
                self._set_batch(masks[b], ids_of[b])
                self._replay(b)
                out = kwargs[b][i].mapped(lambda t: t.to(dev), {})(layer, x.to(dev))
                self._guard(out, f"output of {self.adapter.layer_name(i)} (compressed)")
                outs.append(out.to("cpu"))
        return outs
