"""Evaluation of a model larger than memory: layer by layer over all the eval windows at once.

The whole-model path (:func:`calibra.eval._forward.iter_scored`) runs every batch of windows through
the whole model. A model streamed from its shards (:class:`calibra.io.streamed.StreamedModel`) turns
the loops around: the embeddings run over every window, then each decoder layer is read, run over
every window and released (the ``LayerRunner`` the compressing verbs use, with no observers), and
finally the norm and the output head turn the scored positions' hidden states into log-probs. Host
memory holds one layer plus two copies of the windows' hidden states (``windows x seq_len x hidden``
float32 each), never the model.

:class:`StreamedLM` yields exactly what ``iter_scored`` yields -- ``(logprobs, targets)`` per batch of
windows, the same batches in the same order -- so perplexity, the KL (reference top-k and comparison)
and report blocks take it where they take a loaded model. Values agree with the whole-model pass to
float32 rounding, not bit for bit: the windows are padded to one length (a padding mask instead of the
causal fast path) and the head sees only the scored rows.
"""

from __future__ import annotations

import torch

from calibra.eval._forward import batch_groups, vocab_size


class StreamedLM:
    """A causal LM evaluated layer by layer from a :class:`~calibra.io.streamed.StreamedModel`.

    Args:
        streamed: the weightless model and its tensor source (a plain checkpoint's ``WeightStore`` or a
            quantized folder's dequantizing store).
        device: where each layer runs (default CPU).
        label: what the streamed model is, for progress bars and errors.
    """

    def __init__(self, streamed, device=None, *, label: str = "model"):
        from calibra.models import get_adapter

        self.streamed = streamed
        self.model = streamed.model
        self.config = streamed.model.config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.adapter = get_adapter(self.model)
        self.adapter.final_norm()  # a family whose head is not "norm then head" is refused before any read
        self.label = label

    @property
    def bytes_read(self) -> int:
        return self.streamed.bytes_read

    def iter_scored(self, ids, plan, *, batch_size: int | None = None, progress: bool | None = None, desc="eval"):
        """``(logprobs [T, V] float32, targets [T])`` per batch of windows, as ``iter_scored`` yields them."""
        import sys

        from calibra.calib.runner import LayerRunner

        if progress is None:
            progress = sys.stderr.isatty()
        groups = list(batch_groups(plan, batch_size, vocab_size(self)))
        windows = [w for g in groups for w in g]
        width = max(w.length for w in windows)
        ids = ids.reshape(-1).cpu()
        x = torch.zeros(len(windows), width, dtype=torch.long)
        mask = torch.zeros(len(windows), width, dtype=torch.bool)
        for r, w in enumerate(windows):
            x[r, : w.length] = ids[w.begin : w.end]
            mask[r, : w.length] = True
        last = len(self.adapter.layers) - 1
        final: list[torch.Tensor] = []

        def keep_last(index, hidden):
            if index == last:
                final.extend(hidden)

        runner = LayerRunner(
            self.model,
            self.adapter,
            device=self.device,
            observers=(),
            check_finite=False,  # the log-probs are checked below, as on the whole-model path
            progress=progress,
            desc=f"{desc} (streamed)",
            weights=self.streamed,
        )
        with torch.no_grad():
            runner.run(x, mask, batch_size=max(len(g) for g in groups), after_layer=keep_last)
        del x, mask
        hidden = torch.cat(final)
        final.clear()
        yield from self._scored(hidden, ids, groups)

    def _scored(self, hidden: torch.Tensor, ids: torch.Tensor, groups):
        norm = self.adapter.final_norm()
        head = self.model.get_output_embeddings()
        parts = [norm, head]
        for m in parts:
            self.streamed.load(m, self.device)
        try:
            r = 0
            for group in groups:
                rows = []
                for w in group:
                    # position p predicts token p + 1: the scored tokens' predictions end one before the window
                    rows.append(hidden[r, w.length - w.scored - 1 : w.length - 1])
                    r += 1
                with torch.no_grad():
                    h = torch.cat(rows).to(device=self.device, dtype=self.streamed.dtype)
                    lp = self._logits(head(norm(h))).float().log_softmax(-1)
                targets = torch.cat([ids[w.score_from : w.end] for w in group]).to(self.device)
                if not torch.isfinite(lp.gather(-1, targets[:, None])).all():
                    raise FloatingPointError(
                        f"[eval] non-finite logits in tokens {group[0].begin}..{group[-1].end} of the eval stream "
                        f"({self.label}, streamed); the model overflows in its dtype (evaluate in float32) or its "
                        f"weights hold NaN/Inf"
                    )
                yield lp, targets
        finally:
            for m in parts:
                self.streamed.release(m)

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family's ``forward`` does to the head's output (the families that scale or cap logits)."""
        scale = getattr(self.config, "logit_scale", None)
        if isinstance(scale, (int, float)) and scale != 1:
            logits = logits * scale
        divide = getattr(self.config, "logits_scaling", None)  # Granite divides the logits
        if isinstance(divide, (int, float)) and divide != 1:
            logits = logits / divide
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


__all__ = ["StreamedLM"]
