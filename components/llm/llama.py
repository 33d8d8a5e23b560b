"""LLaMA language model (transformers `LlamaForCausalLM`) behind the `CausalLM` protocol.

Follows docs/design.md §1: LLaMA-13B for Emu1 and LLaMA-33B for Emu2, with the multimodal specials appended to
the vocabulary (new rows = mean of the old rows, docs/design.md §2). Built from a config, or loaded from a local
Hugging Face directory. `forward` returns the last hidden state **after** the final RMSNorm, which is
what the regression head reads (docs/design.md §8).

Contract: embeds (B,T,D_llm), mask (B,T_past+T) 1 = token / 0 = pad -> hidden (B,T,D_llm), cache.
Position ids come from the mask (cumsum - 1) exactly as HF `generate` builds them, so a training forward
and generation see identical inputs (RoPE makes a constant left-padding shift irrelevant anyway).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from components.llm.llama_decode import StaticDecoder, unsupported

ATTN_IMPLEMENTATION = "sdpa"  # works on CPU and GPU in transformers 5; flash-attn is not a dependency


class LlamaLM(nn.Module):
    """LLaMA decoder with separate embed / forward / logits steps for multimodal inputs.

    Args:
        hidden_size: Model width D_llm.
        num_layers: Number of decoder layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (GQA); None = num_heads (LLaMA-1).
        intermediate_size: SwiGLU hidden width.
        vocab_size: Vocabulary size V at construction (resize later with `resize_vocab`).
        max_position_embeddings: Longest sequence (LLaMA-1: 2048).
        pretrained_path: Local Hugging Face model directory; when given, the shape arguments are ignored.
        gradient_checkpointing: Recompute decoder layers in the backward pass.
        lean_decoding: let the visual-embedding loop step through `start_decoding` (static K/V buffers, direct
            layer math, `llama_decode`); False keeps transformers' forward with a `DynamicCache` for every step.
    """

    def __init__(
        self,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        intermediate_size: int = 688,
        vocab_size: int = 512,
        max_position_embeddings: int = 2048,
        pretrained_path: str | None = None,
        gradient_checkpointing: bool = False,
        lean_decoding: bool = True,
    ) -> None:
        super().__init__()
        if pretrained_path is not None:
            if not (Path(pretrained_path) / "config.json").is_file():
                raise FileNotFoundError(f"no Hugging Face model (config.json) in pretrained_path={pretrained_path}")
            self.model, info = LlamaForCausalLM.from_pretrained(
                pretrained_path, local_files_only=True, attn_implementation=ATTN_IMPLEMENTATION,
                output_loading_info=True)
            # transformers would initialise missing weights at random with a warning: a wrong folder is an error.
            bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                                   "mismatched_keys") and v}
            if bad:
                raise RuntimeError(f"pretrained_path={pretrained_path} does not match LlamaForCausalLM: " + "; ".join(
                    f"{k.replace('_', ' ')} {v[:20]} ({len(v)})" for k, v in bad.items()))
        else:
            config = LlamaConfig(
                hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads or num_heads, intermediate_size=intermediate_size,
                vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                tie_word_embeddings=False, attn_implementation=ATTN_IMPLEMENTATION,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
            self.model = LlamaForCausalLM(config)
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.hidden_dim: int = self.model.config.hidden_size
        self.block_cls: type[nn.Module] = LlamaDecoderLayer
        self.lean_decoding = lean_decoding

    @property
    def vocab_size(self) -> int:
        """Current number of embedding rows V."""
        return self.model.get_input_embeddings().weight.shape[0]

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B,T) -> (B,T,D_llm)."""
        return self.model.get_input_embeddings()(input_ids)

    def new_cache(self) -> DynamicCache:
        """An empty KV cache; pass it to `forward` to start incremental decoding."""
        return DynamicCache(config=self.model.config)

    def start_decoding(self, embeds: Tensor, mask: Tensor, max_steps: int) -> StaticDecoder | None:
        """Prefill `embeds` (B,T,D_llm) / `mask` (B,T) for a lean one-position-per-step loop (`llama_decode`).

        Returns a `StaticDecoder` (`.hidden` the prompt's hidden state, `.step(x)` (B,D_llm) → (B,D_llm)) with
        room for `max_steps` new positions, or None when `lean_decoding` is off or its direct layer math would not
        reproduce this model (`llama_decode.unsupported`: hooks of sharding or offloading, a length-dependent RoPE,
        subclassed layers); the caller then decodes with `new_cache` and `forward`.
        """
        if not self.lean_decoding or unsupported(self) is not None:
            return None
        return StaticDecoder(self, embeds, mask, max_steps)

    def forward(self, embeds: Tensor, mask: Tensor, cache: Any | None = None) -> tuple[Tensor, Any]:
        """Run the decoder; with a cache, `mask` covers past and new tokens (B,T_past+T).

        Without a cache, `mask` may instead number packed documents 1, 2, ... per row (0 = padding): each then
        attends only within itself, with positions restarting at 0 (`_forward_packed`).

        Returns the final-norm hidden state (B,T,D_llm) and the updated cache (None when none given).
        """
        T = embeds.shape[1]
        if cache is None and bool((mask > 1).any()):
            return self._forward_packed(embeds, mask), None
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]   # (B,T): left padding keeps 0..n-1
        out = self.model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                               past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state, out.past_key_values

    def _forward_packed(self, embeds: Tensor, segments: Tensor) -> Tensor:
        """Several documents per row: `segments` (B,T) numbers them 1, 2, ... (0 = trailing padding).

        Positions restart at 0 with each document (and with the padding run); without an attention mask,
        transformers reads those restarts as packed sequences and attends block-diagonally (causal within a
        document, never across), for sdpa, eager and flash attention alike.
        """
        T = segments.shape[1]
        idx = torch.arange(T, device=segments.device).expand_as(segments)                    # (B,T)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]                                  # (B,T) a run begins
        positions = idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values  # (B,T) 0.. per run
        return self.model.model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        """(B,T,D_llm) -> (B,T,V)."""
        return self.model.lm_head(hidden)

    @torch.no_grad()
    def resize_vocab(self, size: int) -> None:
        """Resize embeddings and lm_head to `size` rows; added rows are the exact mean of the old rows.

        transformers' own `mean_resizing=True` samples from N(mean, 1e-9·cov) with the global RNG; we
        write the mean itself so resizing is deterministic and draws no random numbers that matter.
        """
        old = self.vocab_size
        emb_mean = self.model.get_input_embeddings().weight[:old].mean(0)   # (D_llm,)
        head_mean = self.model.lm_head.weight[:old].mean(0)                 # (D_llm,)
        self.model.resize_token_embeddings(size, mean_resizing=False)
        if size > old:
            self.model.get_input_embeddings().weight[old:] = emb_mean
            self.model.lm_head.weight[old:] = head_mean

    @torch.no_grad()
    def generate(self, embeds: Tensor, mask: Tensor, max_new_tokens: int = 20, num_beams: int = 1,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **kwargs: Any) -> Tensor:
        """Decode from prompt embeddings (B,T,D_llm), mask (B,T) -> new ids (B,T_new).

        Greedy when num_beams == 1, beam search otherwise; extra kwargs go to HF `generate`.
        """
        return self.model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
            do_sample=kwargs.pop("do_sample", False), eos_token_id=eos_token_id,
            pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id, **kwargs)

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaLM:
        """Test size: D 64, 2 layers, 2 heads, FFN 128, vocab 128."""
        args: dict[str, Any] = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                                    vocab_size=128, max_position_embeddings=256)
        return cls(**{**args, **overrides})


