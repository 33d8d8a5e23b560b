"""The lean static-cache decoder (`components.llm.llama_decode`): the same visual embeddings as transformers' cached
forward and the official full recompute, in every layout it accepts; the models it refuses fall back to the cached
forward; and the generation loop (head → `generate_visual_cached`, the system's `generate_image_embeddings`) uses
it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from components.generation import generate_visual_cached, generate_visual_reference
from components.llm import llama_decode
from components.llm.llama import LlamaLM
from components.llm.llama_decode import StaticDecoder, unsupported

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one core is faster than two shared ones


def _setup(num_kv_heads=None, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lm = LlamaLM.tiny(num_heads=4, num_kv_heads=num_kv_heads).eval().to(dtype)
    head = nn.Linear(64, 48, bias=False).to(dtype)
    feedback = nn.Linear(48, 64).to(dtype)                             # Emu2-like: project_up of the prediction
    embeds = torch.randn(3, 11, 64, dtype=dtype)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0                                                    # left padding, two lengths
    mask[2, :1] = 0
    return lm, head, feedback, embeds, mask


def _three(lm, head, feedback, embeds, mask, n=6):
    with torch.no_grad():
        return (generate_visual_cached(lm, head, feedback, embeds, mask, n),               # lean step
                generate_visual_cached(lm, head, feedback, embeds, mask, n, lean=False),   # DynamicCache forward
                generate_visual_reference(lm, head, feedback, embeds, mask, n))            # official recompute


def _count_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    step = StaticDecoder.step
    monkeypatch.setattr(StaticDecoder, "step", lambda self, x: calls.append(1) or step(self, x))
    return calls


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("padded", [True, False])
def test_lean_step_equals_the_cached_forward_and_the_full_recompute(monkeypatch, num_kv_heads, padded):
    lm, head, feedback, embeds, mask = _setup(num_kv_heads)
    if not padded:
        mask = torch.ones_like(mask)
    calls = _count_steps(monkeypatch)
    lean, cached, reference = _three(lm, head, feedback, embeds, mask)
    assert len(calls) == 5 and lean.shape == (3, 6, 48)
    torch.testing.assert_close(lean, cached, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lean, reference, atol=1e-5, rtol=1e-5)


def test_wrapped_projections_and_biases_are_honoured():
    """A projection that is not a plain `nn.Linear` (as peft's LoRA layers) is called as a module; biases are added."""
    lm, head, feedback, embeds, mask = _setup()

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Linear) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 1.5

    for layer in lm.model.model.layers:
        attn = layer.self_attn
        attn.q_proj = Wrapped(attn.q_proj)
        biased = nn.Linear(64, attn.v_proj.out_features)
        biased.weight.data.copy_(attn.v_proj.weight)
        attn.v_proj = biased
    assert unsupported(lm) is None
    lean, cached, reference = _three(lm, head, feedback, embeds, mask)
    torch.testing.assert_close(lean, cached, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lean, reference, atol=1e-5, rtol=1e-5)


def test_bfloat16_matches_the_cached_forward():
    lm, head, feedback, embeds, mask = _setup(dtype=torch.bfloat16)
    lean, cached, _ = _three(lm, head, feedback, embeds, mask, n=4)
    torch.testing.assert_close(lean, cached, atol=2e-2, rtol=2e-2)


def test_mixed_precision_matches_the_cached_forward(monkeypatch):
    """Under autocast (a bf16-mixed predict) the step's ops cast as the forward's: the same RMSNorm ops, mm, sdpa."""
    lm, head, feedback, embeds, mask = _setup(num_kv_heads=2)
    calls = _count_steps(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean, cached, reference = _three(lm, head, feedback, embeds, mask, n=4)
    assert len(calls) == 3 and lean.dtype == torch.bfloat16
    torch.testing.assert_close(lean, cached, atol=2e-2, rtol=2e-2)   # bf16 rounding (the recompute is farther)


def test_decoder_prefill_is_the_forward_and_steps_stop_at_its_size():
    lm, _, _, embeds, mask = _setup()
    with torch.no_grad():
        dec = lm.start_decoding(embeds, mask, max_steps=2)
        torch.testing.assert_close(dec.hidden, lm(embeds, mask)[0])
        x = torch.randn(3, 64)
        h1 = dec.step(x)
        full = torch.cat([mask, mask.new_ones(3, 1)], 1)
        torch.testing.assert_close(h1, lm(torch.cat([embeds, x[:, None]], 1), full)[0][:, -1], atol=1e-5, rtol=1e-5)
        dec.step(x)
        with pytest.raises(RuntimeError, match="sized for 2 steps"):
            dec.step(x)


def test_models_it_cannot_reproduce_fall_back_to_the_cached_forward(monkeypatch):
    lm, head, feedback, embeds, mask = _setup()
    calls = _count_steps(monkeypatch)
    # A forward hook (how FSDP2 gathers a sharded layer, how accelerate offloads one) must keep running.
    hooked = []
    handle = lm.model.model.layers[0].register_forward_pre_hook(lambda *a: hooked.append(1))
    assert "forward hooks" in unsupported(lm) and lm.start_decoding(embeds, mask, 5) is None
    lean, cached, reference = _three(lm, head, feedback, embeds, mask)
    assert not calls and hooked
    torch.testing.assert_close(lean, reference, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert unsupported(lm) is None
    # ... on any module the step would bypass, a plain projection too (the step reads its weight directly).
    handle = lm.model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: o * 2)
    assert "layers.1.self_attn.q_proj (Linear) has forward hooks" in unsupported(lm)
    handle.remove()
    # A RoPE whose frequencies grow with the sequence cannot be tabulated once.
    for rope in ("dynamic", "longrope"):
        monkeypatch.setattr(lm.model.model.rotary_emb, "rope_type", rope)
        assert "rescales with the sequence length" in unsupported(lm)
        assert lm.start_decoding(embeds, mask, 5) is None
    monkeypatch.undo()
    assert unsupported(lm) is None


def test_layers_that_are_not_transformers_llama_layers_are_refused():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP

    lm, *_ = _setup()

    class Scaled(LlamaMLP):                                            # a subclass may compute otherwise
        def forward(self, x):
            return 2 * super().forward(x)

    mlp = lm.model.model.layers[0].mlp
    lm.model.model.layers[0].mlp = Scaled(lm.model.model.config)
    assert "Scaled is not transformers' LlamaMLP" in unsupported(lm)
    lm.model.model.layers[0].mlp = mlp
    layer = lm.model.model.layers[1]
    layer.__class__ = type("Wrapped", (LlamaDecoderLayer,), {})
    assert "Wrapped is not transformers' LlamaDecoderLayer" in unsupported(lm)
    layer.__class__ = LlamaDecoderLayer
    assert unsupported(lm) is None


def test_lean_decoding_off_keeps_the_cached_forward(monkeypatch):
    lm, head, feedback, embeds, mask = _setup()
    calls = _count_steps(monkeypatch)
    lm.lean_decoding = False                                           # LlamaLM(lean_decoding=False) in a recipe
    assert lm.start_decoding(embeds, mask, 5) is None
    lean, cached, _ = _three(lm, head, feedback, embeds, mask)
    assert not calls
    assert torch.equal(lean, cached)
    assert not LlamaLM.tiny(lean_decoding=False).lean_decoding


def test_peft_lora_projections_run_as_modules(monkeypatch):
    """The policy's LoRA (`emu_lightning.systems.lora.add_lora`: peft `lora.Linear` around q/k/v/o) is called as a
    module, so a trained (B ≠ 0) adapter changes the lean step as it changes the cached forward."""
    pytest.importorskip("peft")
    from emu_lightning.systems.lora import LoraSpec, add_lora, lora_layers

    lm, head, feedback, embeds, mask = _setup(num_kv_heads=2)
    add_lora(lm, LoraSpec(r=4, alpha=8, dropout=0.1))
    lm.eval()
    for layer in lora_layers(lm).values():
        nn.init.normal_(layer.lora_B["default"].weight, std=0.5)     # fresh B = 0 would hide the adapter
    assert unsupported(lm) is None
    calls = _count_steps(monkeypatch)
    lean, cached, reference = _three(lm, head, feedback, embeds, mask)
    assert len(calls) == 5
    # float32 summation order differs between the paths; with B ~ N(0, 0.5) the outputs are large enough that
    # this reaches ~5e-6 on some thread counts, so both comparisons use the reference's tolerance
    torch.testing.assert_close(lean, cached, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lean, reference, atol=1e-5, rtol=1e-5)


def test_an_llm_without_start_decoding_uses_its_cache():
    lm, head, feedback, embeds, mask = _setup()

    class Plain(nn.Module):                                            # a CausalLM with only the protocol
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            return self.inner(*a)

        def new_cache(self):
            return self.inner.new_cache()

    lean, _, reference = _three(Plain(lm), head, feedback, embeds, mask)
    torch.testing.assert_close(lean, reference, atol=1e-5, rtol=1e-5)


def test_the_autoregressive_head_generates_through_the_lean_step(monkeypatch):
    """`AutoregressiveHead.generate` (what the stage-2 system's `generate_image_embeddings` calls) uses the static
    decoder by default; `use_cache=False` stays the official recompute."""
    from components.heads.autoregressive import AutoregressiveHead

    lm, _, feedback, embeds, mask = _setup(num_kv_heads=2)
    head = AutoregressiveHead(in_dim=64, out_dim=48).eval()
    calls = _count_steps(monkeypatch)
    with torch.no_grad():
        lean = head.generate(lm, feedback, embeds, mask, 5)
        assert len(calls) == 4
        reference = head.generate(lm, feedback, embeds, mask, 5, use_cache=False)
    assert len(calls) == 4
    torch.testing.assert_close(lean, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_system_generation_runs_the_lean_step(monkeypatch):
    """`generate_image_embeddings` (what `EmuImagePipeline` and `infer` call) goes through the static decoder."""
    from tests.helpers import tiny_stage2
    from tests.test_stage2 import _prompts

    system = tiny_stage2("meanpool").eval()
    calls = _count_steps(monkeypatch)
    lean = system.generate_image_embeddings(_prompts())
    assert len(calls) == system.num_image_tokens - 1
    system.llm.lean_decoding = False                                   # the generic cached loop
    cached = system.generate_image_embeddings(_prompts())
    assert len(calls) == system.num_image_tokens - 1
    torch.testing.assert_close(lean, cached, atol=1e-6, rtol=1e-6)
