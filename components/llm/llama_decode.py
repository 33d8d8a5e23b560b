"""A lean one-position-per-step decoder for `LlamaLM` (docs/design.md §5): static K/V buffers, direct layer math.

Generating N visual embeddings feeds one new position per step. Through transformers' `LlamaModel.forward` each
such step pays for the model's bookkeeping (output capturing, causal-mask construction, the rotary embedding of
the new position, a `DynamicCache` that concatenates every layer's keys and values into new tensors) around a
few small matmuls; at the debug width that bookkeeping is most of the step. `StaticDecoder` runs the prompt once
through the ordinary forward (`LlamaLM.forward` with a `DynamicCache`), copies its keys and values into buffers
sized for the whole generation, and then computes each step's decoder layers itself, with the operations of
transformers' `LlamaDecoderLayer` in the same order (RMSNorm, q/k/v projections, rotary embedding,
scaled-dot-product attention, SwiGLU MLP, the two residual adds):

- the rotary cos / sin of every generated position (from the model's own `rotary_emb`) and the key-padding mask
  are computed once;
- each step writes its key and value into the buffers in place and attends to their filled prefix;
- the new position is a (B,D) row throughout; a plain `nn.Linear` is one BLAS call W·xᵀ (with a handful of rows
  the weight is then read along its rows: ~1.5× faster than `F.linear`'s x·Wᵀ on the CPU), RMSNorm is
  transformers' op for op, RoPE rotates q and k in one pass;
- grouped-query attention reads each key/value head once, its H/H_kv query heads as rows of one query block.

The result equals the cached forward within float rounding (the W·xᵀ products sum in another order: in float32
~3e-6 max abs diff on the benchmark's embeddings, as between the cached forward and the full recompute;
tests/components/test_llama_decode.py). Models whose layers it would not
reproduce are refused (`unsupported`: hooks, FSDP / DTensor, subclassed layers, length-dependent RoPE),
and the caller keeps the generic loop.

What limits it on the CPU: with batch 4 a step is 28 matrix-vector-like products that read every weight once
(12.6 MB at the debug size, D 256 × 4 layers), so a step costs about the memory traffic of the weights; the
other ~25 small ops per layer (norms, RoPE, the K/V writes, SiLU, residual adds) are most of the rest.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rotary variants whose inverse frequencies do not depend on the sequence length: their cos / sin come from the
# model's own `rotary_emb`, tabulated once for the generated positions. transformers' "dynamic" and "longrope"
# rescale the frequencies as the sequence grows (`dynamic_rope_update`), so a table made once would be wrong.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported(lm: Any) -> str | None:
    """Why `StaticDecoder` cannot reproduce `lm`'s (a `LlamaLM`) cached forward, or None when it can.

    The step re-implements `LlamaDecoderLayer` / `LlamaAttention` / `LlamaMLP` / `LlamaRMSNorm` and calls only the
    projections as modules, so anything that changes what those modules compute is refused: subclasses or other
    layer types, forward hooks anywhere in the decoder (FSDP gathers shards in them, accelerate offloads, probes
    record), FSDP1 wrappers, DTensor (sharded) parameters, dropout in training mode and length-dependent RoPE.
    Projections that are not plain `nn.Linear` (peft's LoRA layers) are called as modules, and mixed precision
    casts the step's ops as it casts the forward's, so neither needs a refusal.
    """
    from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaMLP,
                                                          LlamaRMSNorm, LlamaRotaryEmbedding)

    model = getattr(getattr(lm, "model", None), "model", None)
    if model is None or not hasattr(model, "layers"):
        return f"{type(lm).__name__}.model.model is not a transformers LlamaModel"
    cfg = model.config
    exact = [(model.norm, LlamaRMSNorm), (model.rotary_emb, LlamaRotaryEmbedding)]
    for layer in model.layers:
        exact.append((layer, LlamaDecoderLayer))
        if type(layer) is LlamaDecoderLayer:
            exact += [(layer.self_attn, LlamaAttention), (layer.mlp, LlamaMLP), (layer.input_layernorm, LlamaRMSNorm),
                      (layer.post_attention_layernorm, LlamaRMSNorm)]
    for m, cls in exact:
        if type(m) is not cls:   # a subclass, FSDP1's wrapper or another model's layer may compute otherwise
            return f"{type(m).__name__} is not transformers' {cls.__name__}"
    rope = getattr(model.rotary_emb, "rope_type", None) or "default"
    if rope not in STATIC_ROPE:
        return f"rope_type {rope!r} rescales with the sequence length"
    if lm.training and cfg.attention_dropout > 0:
        return "attention dropout in training mode"
    if getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global module forward hooks"
    for name, m in model.named_modules():
        if m is model.embed_tokens:   # the step is fed embeddings: the table is never read
            continue
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return f"{name or 'model'} ({type(m).__name__}) has forward hooks (sharding, offloading or a probe)"
    if _any_dtensor(list(model.parameters())):
        return "sharded (DTensor) parameters"
    return None


def _any_dtensor(params: list[Tensor]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # torch built without distributed
        return False
    return any(isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor) for p in params)


def _linear(m: nn.Module) -> Callable[[Tensor], Tensor]:
    """(B,in) → (B,out): a plain `nn.Linear` as one BLAS call W·xᵀ, transposed back as a view. With a few rows
    that reads the weight along its rows; on the CPU (MKL) it is ~1.5× faster than `F.linear`'s x·Wᵀ, and
    rounds differently (float rounding: ~1e-6 relative). Any other module (peft's LoRA layers, quantised
    linears) is called as it is."""
    if type(m) is not nn.Linear:
        return m
    w, b = m.weight, m.bias
    if b is None:
        return lambda x: torch.mm(w, x.t()).t()
    b = b[:, None]                                                                          # (out,1)
    return lambda x: torch.addmm(b, w, x.t()).t()


def _act(act: nn.Module) -> Callable[[Tensor], Tensor]:
    return F.silu if type(act) is nn.SiLU or type(act).__name__ == "SiLUActivation" else act


class _Layer:
    """One decoder layer's modules, looked up once per generation."""

    def __init__(self, layer: nn.Module) -> None:
        a, mlp = layer.self_attn, layer.mlp
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.q, self.k, self.v, self.o = (_linear(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        self.gate, self.up, self.down = (_linear(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.act = _act(mlp.act_fn)
        self.scale = a.scaling


def _rms(norm: nn.Module, x: Tensor) -> Tensor:
    """transformers' `LlamaRMSNorm`, op for op (bitwise): normalise in float32, cast back, then scale. (On the
    CPU `F.rms_norm` is no faster: it decomposes into the same reductions, and rounds differently.)"""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


class StaticDecoder:
    """Prefill a prompt, then decode one position per `step` against preallocated K/V buffers.

    Args:
        lm: the `LlamaLM` (eval mode; see `unsupported`).
        embeds: (B,T,D) prompt embeddings (left-padded).
        mask: (B,T) 1 = token / 0 = padding.
        max_steps: how many positions `step` may add.

    After construction `hidden` is the prompt's final-norm hidden state (B,T,D), exactly `lm(embeds, mask)[0]`.
    """

    def __init__(self, lm: Any, embeds: Tensor, mask: Tensor, max_steps: int) -> None:
        model = lm.model.model
        cfg = model.config
        self.hidden, cache = lm(embeds, mask, lm.new_cache())                # (B,T,D): transformers' own prefill
        B, T = mask.shape
        self.prompt_len, self.t, self.end = T, T, T + max_steps
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.layers = [_Layer(layer) for layer in model.layers]
        self.norm = model.norm
        # K/V buffers (B,H_kv,T+max_steps,Dh) per layer, the prompt's part copied from the prefill cache.
        self.keys, self.values = [], []
        for i in range(len(self.layers)):
            for buffers, past in ((self.keys, cache.layers[i].keys), (self.values, cache.layers[i].values)):
                buf = past.new_empty(B, self.kv_heads, self.end, self.head_dim)
                buf[:, :, :T] = past                                             # (B,H_kv,T,Dh)
                buffers.append(buf)
        # Rotary cos / sin of the generated positions: each row continues its own count of real tokens, as the
        # cached forward numbers them (mask cumsum - 1). rotate_half(x)·sin = roll(x, Dh/2)·[-sin₁, sin₂].
        pos = mask.long().sum(-1, keepdim=True) + torch.arange(max_steps, device=mask.device)   # (B,S)
        cos, sin = model.rotary_emb(self.hidden, pos)                                           # (B,S,Dh)
        half = self.head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        self.cos, self.sin = cos[:, :, None].unbind(1), sin[:, :, None].unbind(1)              # S × (B,1,Dh)
        # Additive key-padding mask (B,1,1,T+S), 0 / -inf; None when no row is padded (a new position sees
        # every earlier one).
        if bool(mask.all()):
            self.mask = None
        else:
            pad = torch.cat([mask == 0, mask.new_zeros(B, max_steps, dtype=torch.bool)], 1)
            self.mask = torch.zeros(pad.shape, dtype=self.hidden.dtype, device=pad.device).masked_fill(
                pad, float("-inf"))[:, None, None]

    def step(self, x: Tensor) -> Tensor:
        """Feed one new position: (B,D) input embedding → (B,D) its final-norm hidden state."""
        t, j = self.t, self.t - self.prompt_len
        if t >= self.end:
            raise RuntimeError(f"StaticDecoder was sized for {self.end - self.prompt_len} steps; all are used")
        cos, sin = self.cos[j], self.sin[j]                                            # (B,1,Dh)
        mask = None if self.mask is None else self.mask[..., :t + 1]                   # (B,1,1,t+1)
        B, H, Dh, half = x.shape[0], self.heads, self.head_dim, self.head_dim // 2
        for layer, K, V in zip(self.layers, self.keys, self.values):
            h = _rms(layer.norm1, x)                                                   # (B,D)
            qk = torch.cat([layer.q(h), layer.k(h)], -1).unflatten(-1, (-1, Dh))    # (B,H+H_kv,Dh)
            qk = qk * cos + qk.roll(half, -1) * sin                                    # RoPE on q and k at once
            K[:, :, t] = qk[:, H:]
            V[:, :, t] = layer.v(h).unflatten(-1, (-1, Dh))
            # One query per row: its H heads as H/H_kv rows for each shared key/value head (grouped-query
            # attention without repeating K and V; the plain multi-head case is H/H_kv = 1).
            o = F.scaled_dot_product_attention(qk[:, :H].view(B, self.kv_heads, -1, Dh), K[:, :, :t + 1],
                                               V[:, :, :t + 1], attn_mask=mask, scale=layer.scale)
            x = x + layer.o(o.view(B, H * Dh))
            h = _rms(layer.norm2, x)
            x = x + layer.down(layer.act(layer.gate(h)) * layer.up(h))
        self.t = t + 1
        return _rms(self.norm, x)
