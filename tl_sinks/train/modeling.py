"""Attention variants for training: baseline softmax, head-wise RMSNorm, gated attention, a
learned sink logit (gpt-oss) and softmax-off-by-one.

Every variant is a ``transformers.LlamaForCausalLM`` with one attention detail changed, saved with
``"tl_sinks_attention": "<variant>"`` in its ``config.json`` (model type and architecture stay
Llama). :func:`tl_sinks.load_model` rebuilds the variant with :func:`build_variant` and hands it
to TransformerLens (``boot_transformers(..., hf_model=...)``), whose Llama attention bridge then
runs it with every hook working:

* ``headnorm`` (Li et al.): each head's attention output is RMS-normalised, times a learnable
  per-head, per-dim gain, before ``o_proj``. Implemented inside ``o_proj``
  (:class:`HeadNormLinear`), so ``hook_z`` is the *pre-norm* output (the value aggregation the
  paper studies) and the norm applies on the way into ``W_O``. The gain is initialised from each
  head's first-token output spread, as in the paper's code.
* ``sink_logit`` (gpt-oss): a learned logit per head joins the softmax as an extra key and is
  dropped after it (``self_attn.sinks``; the TransformerLens bridge reads the same attribute).
* ``softmax1`` (softmax-off-by-one): the same with the logit fixed at 0, i.e. ``exp(x_i) /
  (1 + sum_j exp(x_j))``.
* ``gated`` (Qiu et al., as in Qwen3-Next): ``q_proj`` also produces a per-head, per-dim gate;
  the attention output is multiplied by ``sigmoid(gate)`` before ``o_proj`` (the bridge's
  ``gated_q_proj`` path; ``hook_z`` is after the gate).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("softmax", "headnorm", "gated", "sink_logit", "softmax1")
CONFIG_KEY = "tl_sinks_attention"
_SINK_ATTN = "tl_sinks_sink_attention"


class HeadNormLinear(nn.Linear):
    """``o_proj`` with head-wise RMSNorm in front: ``W_O (g_h * z_h / rms(z_h))``."""

    def __init__(self, in_features: int, out_features: int, n_heads: int, *, bias: bool = False, eps: float = 1e-6) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if in_features % n_heads:
            raise ValueError(f"in_features={in_features} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim, self.eps = n_heads, in_features // n_heads, eps
        self.head_norm_weight = nn.Parameter(torch.ones(n_heads, self.head_dim))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(*x.shape[:-1], self.n_heads, self.head_dim)
        h = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self.eps).to(h.dtype)
        return (h * self.head_norm_weight.to(h.dtype)).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.normalize(x), self.weight, self.bias)


def _sink_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with a per-head sink logit in the softmax (gpt-oss), for training."""
    from transformers.models.llama.modeling_llama import repeat_kv

    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    q_len, k_len = scores.shape[-2], scores.shape[-1]
    if attention_mask is None:
        # transformers passes no mask to custom attention functions when causal masking alone
        # suffices (as for SDPA's is_causal), so apply it here.
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[:, :, :, :k_len], torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[:, :, :, :k_len]
    sink = module.sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1).to(scores.dtype)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=torch.float32).to(query.dtype)[..., :-1]
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _register_sink_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_SINK_ATTN, _sink_attention)


class _GatedAttentionForward:
    """Forward of a Llama attention whose ``q_proj`` emits ``[q_h | gate_h]`` per head."""

    @staticmethod
    def forward(self: Any, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        input_shape = hidden_states.shape[:-1]
        hd = self.head_dim
        qg = self.q_proj(hidden_states).view(*input_shape, -1, hd * 2)
        query, gate = torch.chunk(qg, 2, dim=-1)
        gate = gate.reshape(*input_shape, -1)
        query = query.transpose(1, 2)
        key = self.k_proj(hidden_states).view(*input_shape, -1, hd).transpose(1, 2)
        value = self.v_proj(hidden_states).view(*input_shape, -1, hd).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        out, weights = eager_attention_forward(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous() * torch.sigmoid(gate)
        return self.o_proj(out), weights


def build_variant(hf_config: Any, variant: str | None = None) -> nn.Module:
    """A ``LlamaForCausalLM`` with the attention variant of ``hf_config`` (or ``variant``).

    Raises:
        ValueError: Unknown variant.
    """
    from transformers import LlamaForCausalLM

    variant = variant or getattr(hf_config, CONFIG_KEY, "softmax")
    if variant not in VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; choose from {VARIANTS}")
    setattr(hf_config, CONFIG_KEY, variant)
    if variant in ("sink_logit", "softmax1"):
        _register_sink_attention()
        hf_config._attn_implementation = _SINK_ATTN
    elif variant == "gated":
        hf_config._attn_implementation = "eager"
    model = LlamaForCausalLM(hf_config)
    n_heads = hf_config.num_attention_heads
    for layer in model.model.layers:
        attn = layer.self_attn
        if variant == "headnorm":
            old = attn.o_proj
            new = HeadNormLinear(old.in_features, old.out_features, n_heads, bias=old.bias is not None)
            new.weight.data.copy_(old.weight.data)
            attn.o_proj = new
        elif variant == "sink_logit":
            attn.sinks = nn.Parameter(torch.zeros(n_heads))
        elif variant == "softmax1":
            attn.register_buffer("sinks", torch.zeros(n_heads))
        elif variant == "gated":
            old = attn.q_proj
            attn.q_proj = nn.Linear(old.in_features, 2 * old.out_features, bias=old.bias is not None)
            nn.init.normal_(attn.q_proj.weight, std=hf_config.initializer_range)
            attn.forward = _GatedAttentionForward.forward.__get__(attn)
    return model


@torch.no_grad()
def init_headnorm_from_first_token(model: nn.Module, *, seed: int = 0, seq_len: int = 64) -> None:
    """The paper's initialisation: each head's gain = its first-token output std on a random input."""
    layers = model.model.layers
    if not isinstance(layers[0].self_attn.o_proj, HeadNormLinear):
        raise ValueError("the model has no head-wise RMSNorm")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=g)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(layers)
    ]
    try:
        was = model.training
        model.eval()
        model(tokens)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    for i, layer in enumerate(layers):
        o = layer.self_attn.o_proj
        first = seen[i][0, 0].view(o.n_heads, o.head_dim)
        o.head_norm_weight.copy_(first.std(-1, unbiased=False)[:, None].expand_as(o.head_norm_weight))


def variant_of(config_dict: dict[str, Any]) -> str:
    """The variant recorded in a ``config.json`` (``"softmax"`` for plain checkpoints)."""
    return str(config_dict.get(CONFIG_KEY, "softmax"))
