"""A causal LM whose every forward pass writes its keys and values through a compressed cache.

``KVCompressedLM(model, plan)`` is what the evaluation code (``calibra.eval``: perplexity, KL, the
EvalSession) runs to measure a preset's quality: each forward builds a fresh :class:`PCACache` and passes
it as the model's cache (``cache=`` or ``past_key_values=``, whichever the installed transformers takes:
:func:`calibra.compat.transformers.with_cache`) with ``use_cache=True``, so the attention reads K/V back
from the compressed cache in the prefill exactly as it does during generation. The wrapped model's
weights are shared, not copied. A cache given by the caller under either keyword is used instead.
"""

from __future__ import annotations

from torch import nn

from calibra.compat.transformers import given_cache, with_cache
from calibra.kv.cache import PCACache


class KVCompressedLM(nn.Module):
    def __init__(self, model: nn.Module, plan, *, project_full_rank: bool = False):
        super().__init__()
        self.model = model
        self.project_full_rank = project_full_rank
        self.plan = plan.plan if hasattr(plan, "plan") and not hasattr(plan, "bases") else plan
        self.new_cache()  # check the plan against the model now, not at the first forward

    @property
    def config(self):
        return self.model.config

    def new_cache(self) -> PCACache:
        return PCACache(self.model, self.plan, project_full_rank=self.project_full_rank)

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = given_cache(kwargs)
        kwargs = with_cache(self.model, cache if cache is not None else self.new_cache(), kwargs)
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=logits_to_keep, **kwargs
        )

    def generate(self, *args, **kwargs):
        """``model.generate`` with a fresh compressed cache (unless one is given as ``cache`` or
        ``past_key_values``)."""
        cache = given_cache(kwargs)
        kwargs = with_cache(self.model, cache if cache is not None else self.new_cache(), kwargs)
        return self.model.generate(*args, **kwargs)
