"""Parity with the reference implementations on tiny random weights (HF T5, timm EVA, HF Llama)."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM
from transformers.models.t5.modeling_t5 import T5Stack

from components.adapters.cformer import CFormer, t5_decoder_config
from components.encoders.eva import EVAEncoder
from components.llm.llama import LlamaLM
from tests.components.test_contract import FRAGMENTS
from tests.helpers import build_fragment


def _fragment(name: str) -> torch.nn.Module:
    return build_fragment(FRAGMENTS / f"{name}.yaml")

TINY_EVA = dict(  # shrunk architecture; same for reference and encoder
    img_size=64, patch_size=8, depth=3, embed_dim=64, num_heads=2, num_classes=0)


# ---------------------------------------------------------------- C-Former vs HF T5 decoder stack

def cformer_key(ref_key: str) -> str:
    """HF T5Stack key -> CFormer key (the released Emu1 layout, minus its `cformer.` module prefix)."""
    return "cformer." + ref_key


def test_cformer_matches_hf_t5_decoder_stack() -> None:
    torch.manual_seed(0)
    ours = CFormer.tiny(in_dim=32, d_model=32, num_heads=4, num_layers=3).eval()  # in_dim == d_model
    config = t5_decoder_config(d_model=32, num_layers=3, num_heads=4, d_ff=64, dropout=0.0)
    config._attn_implementation = "eager"  # reference path: T5's own eager attention, not SDPA
    ref = T5Stack(config).eval()
    ref_state = {k: v for k, v in ref.state_dict().items() if not k.startswith("embed_tokens")}
    missing, unexpected = ours.load_state_dict({cformer_key(k): v for k, v in ref_state.items()}, strict=False)
    assert sorted(missing) == ["causal_tokens", "ln_visual.bias", "ln_visual.weight",
                               "projection.bias", "projection.weight"]
    assert not unexpected
    # Only block 0 owns a relative position bias (shared by all blocks, docs/design.md §8).
    assert [k for k in ours.state_dict() if "relative_attention_bias" in k] == [
        "cformer.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]

    feats = torch.randn(2, 17, 32)
    with torch.no_grad():
        got = ours.forward_hidden(feats)
        queries = ours.causal_tokens.unsqueeze(0).expand(2, -1, -1)
        want = ref(inputs_embeds=queries, encoder_hidden_states=ours.ln_visual(feats)).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(feats), ours.projection(want), rtol=1e-5, atol=1e-5)


def test_cformer_queries_are_causal_and_unscaled() -> None:
    """Query i never sees queries > i; T5 attention uses no 1/sqrt(d) scaling."""
    torch.manual_seed(0)
    model = CFormer.tiny().eval()
    feats = torch.randn(1, 65, 64)
    with torch.no_grad():
        base = model(feats)
        model.causal_tokens[-1] += 1.0  # perturb only the last query
        moved = model(feats)
    torch.testing.assert_close(moved[:, :-1], base[:, :-1])
    assert not torch.allclose(moved[:, -1], base[:, -1])
    assert type(model.cformer.block[1].layer[2].layer_norm).__name__ == "T5LayerNorm"  # RMS norm
    assert model.cformer.config.dense_act_fn == "relu"
    attn = model.cformer.block[0].layer[1].EncDecAttention
    assert attn.scaling == 1.0 and attn.k.in_features == 64 and attn.k.bias is None


def test_cformer_dropout_is_configurable() -> None:
    torch.manual_seed(0)
    model = CFormer.tiny(dropout=0.5).train()
    feats = torch.randn(1, 65, 64)
    assert not torch.equal(model(feats), model(feats))
    model.eval()
    assert torch.equal(model(feats), model(feats))
    with torch.device("meta"):
        emu1 = _fragment("adapter_cformer_emu1")
    assert emu1.cformer.config.dropout_rate == 0.1


# ---------------------------------------------------------------- EVA vs timm

ARCHS = ["eva02_tiny_patch14_224", "eva_giant_patch14_clip_224", "eva02_enormous_patch14_clip_224"]


def timm_reference(model_name: str = ARCHS[0]) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(model_name, pretrained=False, **TINY_EVA).eval()


def manual_blocks(ref: torch.nn.Module, pixels: torch.Tensor, upto: int) -> torch.Tensor:
    """Run timm's trunk by hand: patch embed, position embeds + rope, blocks[:upto+1], no final norm."""
    x = ref.patch_embed(pixels)
    x, rope = ref._pos_embed(x)
    x = ref.norm_pre(x)
    for blk in ref.blocks[: upto + 1]:
        x = blk(x, rope=rope)
    return x  # (B,1+grid²,D)


def eva_from(ref: torch.nn.Module, model_name: str, layer: int, drop_cls: bool) -> EVAEncoder:
    enc = EVAEncoder.tiny(model_name=model_name, depth=3, layer=layer, drop_cls=drop_cls).eval()
    state = {k: v for k, v in ref.state_dict().items() if k in enc.trunk.state_dict()}
    enc.trunk.load_state_dict(state, strict=True)
    return enc


@pytest.mark.parametrize("model_name", ARCHS)
@pytest.mark.parametrize("layer", [-1, -2, 0])
@pytest.mark.parametrize("drop_cls", [False, True])
def test_eva_matches_manual_timm_blocks(model_name: str, layer: int, drop_cls: bool) -> None:
    ref = timm_reference(model_name)
    enc = eva_from(ref, model_name, layer, drop_cls)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = manual_blocks(ref, pixels, layer % 3)
        got = enc(pixels)
    torch.testing.assert_close(got, want[:, 1:] if drop_cls else want)


@pytest.mark.parametrize("model_name", ARCHS[1:])  # the CLIP variants have a real final LayerNorm
def test_eva_last_layer_equals_timm_forward_features_without_norm(model_name: str) -> None:
    ref = timm_reference(model_name)
    assert isinstance(ref.norm, torch.nn.LayerNorm)
    enc = eva_from(ref, model_name, -1, drop_cls=False)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with_norm = ref.forward_features(pixels)
        ref.norm = torch.nn.Identity()
        torch.testing.assert_close(enc(pixels), ref.forward_features(pixels))
        assert not torch.allclose(enc(pixels), with_norm, atol=1e-3)  # the final norm is really skipped


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "open_clip"])
def test_eva_checkpoint_loading(tmp_path, fmt: str) -> None:
    ref = timm_reference()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}  # includes the unused final norm
    path = tmp_path / ("eva.safetensors" if fmt == "safetensors" else "eva.pt")
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({f"visual.{k}": v for k, v in state.items()} if fmt == "open_clip" else state, path)
    torch.manual_seed(99)  # different random init before loading
    enc = EVAEncoder.tiny(depth=3, checkpoint_path=str(path)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), manual_blocks(ref, pixels, 2))


def test_eva_checkpoint_errors_name_file_and_keys(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        EVAEncoder.tiny(checkpoint_path=str(tmp_path / "nowhere.pt"))
    state = timm_reference().state_dict()
    state.pop("blocks.1.attn.proj.weight")
    state["blocks.9.extra"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r"partial\.pt(.|\n)*blocks\.1\.attn\.proj\.weight(.|\n)*blocks\.9\.extra"):
        EVAEncoder.tiny(depth=3, checkpoint_path=str(path))


# ---------------------------------------------------------------- Llama vs HF

def tiny_lm(seed: int = 0) -> LlamaLM:
    torch.manual_seed(seed)
    return LlamaLM.tiny().eval()


def hf_copy(lm: LlamaLM) -> LlamaForCausalLM:
    ref = LlamaForCausalLM(lm.model.config).eval()
    ref.load_state_dict(lm.model.state_dict())
    return ref


def test_llama_forward_logits_match_hf() -> None:
    lm = tiny_lm()
    ref = hf_copy(lm)
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding: compare only real tokens
    with torch.no_grad():
        hidden, _ = lm(lm.embed(ids), mask)
        got = lm.logits(hidden)
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], out.logits[keep])
    torch.testing.assert_close(hidden[keep], out.hidden_states[-1][keep])  # after the final RMSNorm


def greedy_full_loop(lm: LlamaLM, embeds: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference decoding: re-run the whole sequence every step, no cache."""
    new = []
    for _ in range(steps):
        hidden, _ = lm(embeds, mask)
        nxt = lm.logits(hidden)[:, -1].argmax(-1)                          # (B,)
        new.append(nxt)
        embeds = torch.cat([embeds, lm.embed(nxt[:, None])], dim=1)        # (B,T+1,D)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)   # (B,T+1)
    return torch.stack(new, dim=1)                                         # (B,steps)


def prompt(lm: LlamaLM) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left-padded prompt, as in batched generation
    return lm.embed(ids), mask


def test_greedy_generate_equals_full_forward_loop() -> None:
    lm = tiny_lm()
    embeds, mask = prompt(lm)
    with torch.no_grad():
        want = greedy_full_loop(lm, embeds, mask, steps=8)
        got = lm.generate(embeds, mask, max_new_tokens=8)
    assert got.shape == (2, 8)
    assert torch.equal(got, want)


def test_kv_cached_forward_equals_full_loop() -> None:
    lm = tiny_lm()
    embeds, mask = prompt(lm)
    with torch.no_grad():
        want = greedy_full_loop(lm, embeds, mask, steps=8)
        cache = lm.new_cache()
        hidden, cache = lm(embeds, mask, cache)
        new = []
        for _ in range(8):
            nxt = lm.logits(hidden)[:, -1].argmax(-1)
            new.append(nxt)
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)           # (B,T_past+1)
            hidden, cache = lm(lm.embed(nxt[:, None]), mask, cache)        # one new position
    assert cache.get_seq_length() == 6 + 8
    assert torch.equal(torch.stack(new, dim=1), want)


def sequence_logprob(lm: LlamaLM, embeds: torch.Tensor, mask: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    full = torch.cat([embeds, lm.embed(new)], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(new.shape)], dim=1)
    logp = lm.logits(lm(full, full_mask)[0]).log_softmax(-1)[:, embeds.shape[1] - 1:-1]  # predicts `new`
    return logp.gather(-1, new[..., None]).squeeze(-1).sum(-1)            # (B,)


def test_beam_search_finds_at_least_the_greedy_likelihood() -> None:
    lm = tiny_lm()
    embeds, mask = prompt(lm)
    with torch.no_grad():
        greedy = lm.generate(embeds, mask, max_new_tokens=5)
        beam = lm.generate(embeds, mask, max_new_tokens=5, num_beams=4, length_penalty=0.0)
        assert beam.shape == (2, 5) and not torch.equal(beam, greedy)
        assert (sequence_logprob(lm, embeds, mask, beam) >= sequence_logprob(lm, embeds, mask, greedy) - 1e-5).all()


def test_resize_vocab_adds_mean_rows() -> None:
    lm = tiny_lm()
    old_emb = lm.model.model.embed_tokens.weight.detach().clone()
    old_head = lm.model.lm_head.weight.detach().clone()
    lm.resize_vocab(132)
    assert lm.vocab_size == 132 and lm.model.config.vocab_size == 132
    emb, head = lm.model.model.embed_tokens.weight, lm.model.lm_head.weight
    assert head.shape == (132, 64)
    torch.testing.assert_close(emb[:128], old_emb, rtol=0, atol=0)
    torch.testing.assert_close(head[:128], old_head, rtol=0, atol=0)
    torch.testing.assert_close(emb[128:], old_emb.mean(0).expand(4, -1), rtol=0, atol=1e-7)
    torch.testing.assert_close(head[128:], old_head.mean(0).expand(4, -1), rtol=0, atol=1e-7)
    ids = torch.tensor([[1, 130, 131]])
    assert lm.logits(lm(lm.embed(ids), torch.ones_like(ids))[0]).shape == (1, 3, 132)


def test_llama_loads_local_pretrained_dir(tmp_path) -> None:
    lm = tiny_lm()
    lm.model.save_pretrained(tmp_path / "llama")
    loaded = LlamaLM(pretrained_path=str(tmp_path / "llama")).eval()
    assert loaded.model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 128, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(loaded(loaded.embed(ids), mask)[0]),
                                   lm.logits(lm(lm.embed(ids), mask)[0]), rtol=0, atol=0)
    assert not torch.equal(tiny_lm(seed=5).model.lm_head.weight, loaded.model.lm_head.weight)


def test_llama_missing_dir_names_the_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-llama"):
        LlamaLM(pretrained_path=str(tmp_path / "no-such-llama"))


def test_llama_gradient_checkpointing_gives_the_same_gradients() -> None:
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones_like(ids)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        lm = LlamaLM.tiny(gradient_checkpointing=ckpt).train()
        assert lm.model.is_activation_checkpointing == ckpt
        lm.logits(lm(lm.embed(ids), mask)[0]).square().mean().backward()
        grads.append(lm.model.model.layers[0].mlp.up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
