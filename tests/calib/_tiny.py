"""Small random-weight models of every supported architecture, built from configs (no files, no network)."""

from __future__ import annotations

import torch
from torch import nn

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attn_implementation="sdpa",
)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


def build(arch: str, seed: int = 0, dtype=torch.float32, **over):
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(COMMON)
    if arch == "llama":
        cfg = tf.LlamaConfig(**kw)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**kw, sliding_window=None)
    elif arch == "qwen2":  # one full and one sliding-window layer: per-layer masks must be right
        cfg = tf.Qwen2Config(
            **kw,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            layer_types=["full_attention", "sliding_attention"],
        )
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**kw, head_dim=16)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**kw, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **kw,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=64,
            decoder_sparse_step=1,
        )
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **kw, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1
        )
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    model = tf.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # a non-trivial router: default init leaves Qwen2-MoE's router at zero
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.abs().max() == 0:
                p.normal_(0, 0.5)
    return model


def batch(S=4, L=16, vocab=96, seed=1, lengths=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (S, L), generator=g)
    mask = torch.ones(S, L, dtype=torch.bool)
    if lengths is not None:
        for i, n in enumerate(lengths):
            mask[i, n:] = False
            ids[i, n:] = 0
    return ids, mask


class UnfusedExpert(nn.Module):
    """A transformers-4.x style expert MLP (Mixtral naming: w1 gate, w3 up, w2 down)."""

    def __init__(self, H, I):
        super().__init__()
        self.w1, self.w3 = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.w2 = nn.Linear(I, H, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class UnfusedMoE(nn.Module):
    """transformers-4.x style sparse MoE: ``gate`` is an nn.Linear router, ``experts`` a ModuleList."""

    def __init__(self, fused_block):
        super().__init__()
        ex = fused_block.experts
        E, I2, H = ex.gate_up_proj.shape
        self.top_k = fused_block.gate.top_k
        self.gate = nn.Linear(H, E, bias=False)
        self.gate.weight.data.copy_(fused_block.gate.weight.data)
        self.experts = nn.ModuleList(UnfusedExpert(H, I2 // 2) for _ in range(E))
        for e, m in enumerate(self.experts):
            g, u = ex.gate_up_proj.data[e].chunk(2, 0)
            m.w1.weight.data.copy_(g)
            m.w3.weight.data.copy_(u)
            m.w2.weight.data.copy_(ex.down_proj.data[e])

    def forward(self, h):
        B, L, H = h.shape
        x = h.reshape(-1, H)
        probs = torch.softmax(self.gate(x).float(), -1)
        w, idx = torch.topk(probs, self.top_k, -1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, mlp in enumerate(self.experts):
            tok, pos = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, mlp(x[tok]) * w[tok, pos, None])
        return out.reshape(B, L, H)
