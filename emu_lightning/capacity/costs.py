"""What one sample costs each part: analytic FLOPs and the bytes autograd keeps, per component family.

FLOPs count matrix products only (what `torch.utils.flop_counter.FlopCounterMode` counts): 2 per multiply-add of
every linear layer times the rows it sees, plus attention's two products (Q·Kᵀ and A·V, 4·T_q·T_k·D, the whole
square as the kernels compute it). Backward is 2× forward where both the input and the weight need gradients,
1× where only the weight does (a part whose input comes from a frozen part), 0 for a frozen part run under
`no_grad` (the Emu stage-2 encoder).

Bytes are those autograd saves in forward, as the op sequence of each family saves them with a fused attention
kernel (flash / memory-efficient: the output and a float32 log-sum-exp, no T² matrix). `a` is the activation
element size (2 under bf16, 4 under fp32); RMSNorm and LayerNorm statistics stay in float32 whatever `a` is.
Each family states, per sample:
- `saved`: bytes kept from forward to backward when no block is checkpointed;
- `boundary`: bytes kept instead when every block is checkpointed (each block's input) plus what lies outside
  the blocks; `block`: one block's `saved` bytes, recomputed in backward;
- `locals`: bytes referenced during the part's forward but not saved (freed when the step's forward returns);
- `transient`: the largest set of live intermediates of a `no_grad` forward (one block's working set);
- `grad_rows`: the activation gradients live while a recomputed block runs backward.
The coefficients are checked against measured peak memory at debug size (tests/test_capacity.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from components.adapters.cformer import CFormer
from components.adapters.meanpool import MeanPoolProjector
from components.encoders.eva import EVAEncoder
from components.heads.base import ProjectionHead
from components.llm.llama import LlamaLM

NORM = 4   # float32 statistics and upcast inputs of RMSNorm (transformers' Llama and T5 norms upcast to float32)


@dataclass
class PartCost:
    """One sample's cost in one part (FLOPs; bytes at activation size `a`). See the module docstring."""

    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    saved: float = 0.0
    boundary: float = 0.0
    block: float = 0.0
    locals: float = 0.0
    transient: float = 0.0
    grad_rows: float = 0.0


def linear_numel(module: nn.Module) -> int:
    """Multiply-adds of one row through every `nn.Linear` in `module` (their weights' element count)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def backward_factor(trains: bool, grad_in: bool) -> float:
    """Backward FLOPs / forward FLOPs: the weight gradient when the part trains, the input gradient when an
    upstream part needs it (docstring)."""
    return float(trains) + float(grad_in)


def llama(llm: LlamaLM, T: int, a: int, trains: bool, grad_in: bool) -> tuple[PartCost, PartCost]:
    """(decoder layers, what lies outside them: final norm, `lm_head`, cross-entropy) for T tokens.

    Per token and layer, saved (transformers' LlamaDecoderLayer): each RMSNorm its float32 input (4D), the
    float32 rsqrt (4), the normalised row (aD) and the weighted row the next linears read (aD); attention q, k, v
    and the output (a(2D + 2D_kv)) and the float32 log-sum-exp (4H); the SwiGLU gate, up, SiLU(gate) and the
    product down reads (4aF). RoPE saves only cos / sin, once per step. A recomputed layer's backward adds the
    gradients of its output and of the MLP's hidden row (a(D + F)).
    Outside the layers, per token: the final norm (4D + 4 + 2aD), the float32 log-softmax of the cross-entropy
    (4V, `token_ce` upcasts the logits), the scatter mask of the visual rows (1 byte). In the loss forward the
    logits (aV) and their float32 copy (4V when a < 4) are live; its backward holds two more float32 V rows.
    """
    cfg = llm.model.config
    D, F, H, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers
    V = llm.vocab_size
    D_kv = cfg.num_key_value_heads * (D // H)
    layers = llm.model.model.layers
    fwd = 2 * T * linear_numel(layers) + L * 4 * T * T * D
    per_token = 2 * (NORM * D + NORM + 2 * a * D) + a * (2 * D + 2 * D_kv) + 4 * H + 4 * a * F
    factor = backward_factor(trains, grad_in)
    body = PartCost(fwd_flops=fwd, bwd_flops=factor * fwd, saved=L * T * per_token, boundary=L * T * a * D,
                    block=T * per_token, grad_rows=T * a * (D + F))
    head_fwd = 2 * T * V * D
    rope = 2 * T * (D // H) * a
    root_saved = T * (NORM * D + NORM + 2 * a * D + 4 * V + 1) + rope
    root = PartCost(fwd_flops=head_fwd, bwd_flops=backward_factor(trains, True) * head_fwd, saved=root_saved,
                    boundary=root_saved, transient=T * (a * V + (4 * V if a < 4 else 0)))
    return body, root


def cross_entropy_backward(llm: LlamaLM, T: int) -> float:
    """Bytes live on top of the saved ones while the cross-entropy backward runs: the gradient of the float32
    log-probabilities and of the logits (2 × 4V per token)."""
    return T * 8 * llm.vocab_size


def eva(encoder: EVAEncoder, images: int, a: int) -> PartCost:
    """The frozen EVA encoder under `no_grad` (stage 2) for `images` images: forward FLOPs, its output (a local
    the adapter and the targets read) and a `no_grad` block's working set (input, normalised row, the MLP's hidden
    and activated rows: (2D + 2F)·a per token)."""
    trunk = encoder.trunk
    L_all = encoder.grid**2 + encoder.num_prefix_tokens
    D = encoder.embed_dim
    blocks = trunk.blocks
    F = max(m.out_features for m in blocks[0].modules() if isinstance(m, nn.Linear) and m.out_features != 3 * D)
    conv = sum(m.weight.numel() for m in trunk.patch_embed.modules() if isinstance(m, nn.Conv2d))
    fwd = images * (2 * L_all * linear_numel(blocks) + 2 * encoder.grid**2 * conv + len(blocks) * 4 * L_all**2 * D)
    return PartCost(fwd_flops=fwd, locals=images * encoder.num_tokens * D * a,
                    transient=images * L_all * (2 * D + 2 * F) * a)


def meanpool(adapter: MeanPoolProjector, images: int, a: int, trains: bool) -> PartCost:
    """Emu2's pool + `project_up` for `images` images: the pooled rows are saved (the linear's input); the
    output rows are a local until they are scattered."""
    N = adapter.num_tokens
    fwd = images * 2 * N * adapter.in_dim * adapter.out_dim
    saved = images * N * adapter.in_dim * a
    return PartCost(fwd_flops=fwd, bwd_flops=backward_factor(trains, False) * fwd, saved=saved, boundary=saved,
                    locals=images * N * adapter.out_dim * a)


def cformer(adapter: CFormer, images: int, L_enc: int, a: int, trains: bool) -> PartCost:
    """Emu1's C-Former (T5 decoder blocks: causal self-attention over N queries, cross-attention to the L_enc
    encoder tokens, ReLU FFN) for `images` images.

    Per query and block, saved: three RMSNorms (4d + 4 + 2ad each), self-attention q, k, v copies, the
    softmax (a·H·N, T5's eager path with the relative bias) and the output (4ad), cross-attention q and output
    (2ad) and log-sum-exp (4H), the ReLU output (a·d_ff); per block, the cross-attention keys and values
    (2·a·d·L_enc). Outside the blocks: the encoder tokens and their LayerNorm (2·a·D_enc·L_enc + 8·L_enc), the
    final norm and the projection input (per query 4d + 4 + 2ad).
    """
    cfg = adapter.cformer.config
    N, d, H, d_ff, n_layers = adapter.num_tokens, cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.num_layers
    D_enc = adapter.in_dim
    blocks = adapter.cformer.block
    cross_kv = sum(b.layer[1].EncDecAttention.k.weight.numel() + b.layer[1].EncDecAttention.v.weight.numel()
                   for b in blocks)
    rows = linear_numel(blocks) - cross_kv + adapter.projection.weight.numel()
    attn = n_layers * (4 * N * N * d + 4 * N * L_enc * d)
    fwd = images * (2 * N * rows + 2 * L_enc * cross_kv + attn)
    block = N * (3 * (NORM * d + NORM + 2 * a * d) + 6 * a * d + a * H * N + 4 * H + a * d_ff) + 2 * a * d * L_enc
    outside = 2 * a * D_enc * L_enc + 8 * L_enc + N * (NORM * d + NORM + 2 * a * d)
    return PartCost(fwd_flops=fwd, bwd_flops=backward_factor(trains, trains) * fwd,
                    saved=images * (n_layers * block + outside),
                    boundary=images * (n_layers * N * d * a + outside), block=images * block,
                    locals=images * N * adapter.out_dim * a, grad_rows=images * N * a * (d + d_ff))


def head(regression_head: ProjectionHead, P: int, a: int, trains: bool) -> PartCost:
    """The regression head over P regressed positions: its gathered input rows (aD) and the float32 difference
    the squared error saves (4·D_tgt); the targets are a local. A flow sampler adds its MLP over `repeat` noisy
    copies of each row (about 6 width-wide activations per block, 4 more outside)."""
    fwd = 2 * P * regression_head.in_dim * regression_head.out_dim
    saved = P * (a * regression_head.in_dim + 4 * regression_head.out_dim)
    flow = getattr(regression_head, "flow", None)
    if flow is not None:   # a flow sampler runs its MLP on `repeat` noisy copies of every regressed row
        rows = P * flow.repeat
        fwd += 2 * rows * linear_numel(flow)
        saved += rows * (a * (6 * len(flow.blocks) + 4) * flow.width + 4 * flow.dim)
    return PartCost(fwd_flops=fwd, bwd_flops=backward_factor(trains, True) * fwd, saved=saved, boundary=saved,
                    locals=P * regression_head.out_dim * a)
