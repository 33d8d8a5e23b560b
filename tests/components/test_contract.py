"""One shared contract over every component: shape/dtype, gradient flow, freezing, state_dict, meta device.

Each component test class supplies `make()`, `inputs()` and the shape it must emit; components whose
forward is not a single call (the LLM: embed -> forward -> logits) also override `apply()`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from components.adapters.cformer import CFormer
from components.adapters.meanpool import MeanPoolProjector
from components.base import Adapter, CausalLM, VisualEncoder
from components.contrastive import PooledImageHead, TextTower
from components.encoders.eva import EVAEncoder, sincos_2d
from components.llm.llama import LlamaLM
from components.llm.regression_head import RegressionHead
from tests.helpers import build_fragment

COMPONENTS_DIR = Path(__file__).resolve().parents[2] / "components"
FRAGMENTS = Path(__file__).resolve().parents[2] / "recipes" / "components"
B = 2


class ComponentContract:
    """Mixin: subclasses define make(), inputs(), expected_shape(); the checks below are shared."""

    def make(self) -> nn.Module:
        raise NotImplementedError

    def inputs(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def expected_shape(self, module: nn.Module) -> tuple[int, ...]:
        raise NotImplementedError

    def apply(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
        return module(*inputs)

    def _built(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make()

    def _inputs(self) -> tuple[Tensor, ...]:
        torch.manual_seed(1234)
        return self.inputs()

    def test_shape_and_dtype(self) -> None:
        module = self._built().eval()
        out = self.apply(module, self._inputs())
        assert tuple(out.shape) == self.expected_shape(module)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # The output dtype follows the module's parameters (no dtype is hard-coded inside components).
        module = module.to(torch.float64)
        inputs = tuple(x.to(torch.float64) if x.is_floating_point() else x for x in self._inputs())
        assert self.apply(module, inputs).dtype == torch.float64

    def test_gradient_reaches_every_parameter(self) -> None:
        module = self._built().train()
        out = self.apply(module, self._inputs())
        torch.manual_seed(7)
        (out * torch.randn_like(out)).sum().backward()  # random weights: no symmetric cancellation
        params = dict(module.named_parameters())
        assert params, "component has no parameters"
        no_grad = [n for n, p in params.items() if p.grad is None]
        zero_grad = [n for n, p in params.items() if p.grad is not None and not p.grad.abs().sum() > 0]
        assert not no_grad, f"parameters unreachable from the output: {no_grad}"
        assert not zero_grad, f"parameters with an all-zero gradient: {zero_grad}"

    def test_requires_grad_false_freezes(self) -> None:
        module = self._built()
        freeze = getattr(module, "freeze", None)
        (freeze or (lambda: module.requires_grad_(False)))()
        assert not [n for n, p in module.named_parameters() if p.requires_grad]
        out = self.apply(module, self._inputs())
        assert not out.requires_grad
        assert all(p.grad is None for p in module.parameters())

    def test_state_dict_round_trip(self) -> None:
        src, fresh = self._built(seed=0).eval(), self._built(seed=1).eval()
        inputs = self._inputs()
        with torch.no_grad():
            expected = self.apply(src, inputs)
            assert not torch.equal(self.apply(fresh, inputs), expected), "seeds give identical models"
            fresh.load_state_dict(src.state_dict(), strict=True)
            torch.testing.assert_close(self.apply(fresh, inputs), expected, rtol=0, atol=0)

    def test_builds_on_meta_device(self) -> None:
        with torch.device("meta"):
            module = self.make()
        tensors = list(module.parameters()) + list(module.buffers())
        assert tensors and all(t.is_meta for t in tensors)


class EncoderContract(ComponentContract):
    drop_cls = False
    layer = -1
    stem = "patch"
    pos_init = "default"

    def make(self) -> nn.Module:
        return EVAEncoder.tiny(drop_cls=self.drop_cls, layer=self.layer, stem=self.stem, pos_init=self.pos_init)

    def inputs(self) -> tuple[Tensor, ...]:
        return (torch.randn(B, 3, 64, 64),)

    def expected_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (B, 64 + (0 if self.drop_cls else 1), 64)

    def test_protocol_attributes(self) -> None:
        module = self.make()
        assert isinstance(module, VisualEncoder)
        assert (module.embed_dim, module.grid, module.num_tokens) == (64, 8, self.expected_shape(module)[1])
        assert len(module.trunk.blocks) == self.layer % 2 + 1  # blocks after `layer` are pruned

    def test_freeze_pins_eval_mode(self) -> None:
        for module in (EVAEncoder.tiny(frozen=True), self.make()):
            if not module.frozen:
                module.freeze()
            module.train()
            assert not any(m.training for m in module.modules())
            assert not [p for p in module.parameters() if p.requires_grad]


class TestEncoderLastKeepCLS(EncoderContract):
    pass


class TestEncoderLastDropCLS(EncoderContract):
    drop_cls = True


class TestEncoderPenultimateKeepCLS(EncoderContract):
    layer = -2


class TestEncoderPenultimateDropCLS(EncoderContract):
    drop_cls, layer = True, -2


class TestEncoderConvStem(EncoderContract):
    drop_cls, stem = True, "conv"

    def test_stem_downsamples_to_the_patch_grid(self) -> None:
        stem = self.make().trunk.patch_embed.proj
        convs = [m for m in stem.modules() if isinstance(m, nn.Conv2d)]
        assert [c.stride[0] for c in convs] == [2, 2, 2, 1]  # patch 8 = three stride-2 3×3 convs, then 1×1
        assert stem(torch.randn(B, 3, 64, 64)).shape == (B, 64, 8, 8)


def test_conv_stem_refuses_what_it_cannot_be() -> None:
    with pytest.raises(ValueError, match="power of two"):
        EVAEncoder.tiny(patch_size=6, stem="conv")
    with pytest.raises(ValueError, match="released EVA weights have a patchify stem"):
        EVAEncoder.tiny(stem="conv", checkpoint_path="eva.safetensors")
    with pytest.raises(ValueError, match="expected 'patch' or 'conv'"):
        EVAEncoder.tiny(stem="resnet")


class TestEncoderSinCosPositions(EncoderContract):
    drop_cls, pos_init = True, "sincos"

    def test_patch_rows_start_as_the_2d_table(self) -> None:
        pos = self.make().trunk.pos_embed[0]                       # (1 + 64, 64): CLS row, then the 8×8 grid
        table = sincos_2d(8, 64)
        assert torch.equal(pos[1:], table)
        grid = table.view(8, 8, 64)
        # the first half encodes the row (equal along a row), the second the column (equal down a column)
        assert torch.equal(grid[:, :1, :32].expand(8, 8, 32), grid[..., :32])
        assert torch.equal(grid[:1, :, 32:].expand(8, 8, 32), grid[..., 32:])
        assert len({tuple(r.tolist()) for r in table}) == 64       # every cell has its own code
        assert table[0, 0] == 0 and table[0, 16] == 1              # sin(0), cos(0) of the first frequency


def test_sincos_positions_refuse_what_they_cannot_be() -> None:
    with pytest.raises(ValueError, match="brings its own position embedding"):
        EVAEncoder.tiny(pos_init="sincos", checkpoint_path="eva.safetensors")
    with pytest.raises(ValueError, match="expected 'default' or 'sincos'"):
        EVAEncoder.tiny(pos_init="learned")
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(8, 66)


class TestMeanPoolProjector(ComponentContract):
    def make(self) -> nn.Module:
        return MeanPoolProjector(in_dim=64, out_dim=48, grid=4)

    def inputs(self) -> tuple[Tensor, ...]:
        return (torch.randn(B, 64, 64),)  # 8×8 grid, CLS dropped

    def expected_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (B, 16, 48)


class TestCFormer(ComponentContract):
    def make(self) -> nn.Module:
        return CFormer.tiny(out_dim=48)

    def inputs(self) -> tuple[Tensor, ...]:
        return (torch.randn(B, 65, 64),)  # 8×8 grid + CLS

    def expected_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (B, 8, 48)

    def test_no_word_embedding_allocated(self) -> None:
        module = self.make()
        assert module.cformer.embed_tokens is None
        assert not any("embed_tokens" in k for k in module.state_dict())


class TestLlamaLM(ComponentContract):
    def make(self) -> nn.Module:
        return LlamaLM.tiny()

    def inputs(self) -> tuple[Tensor, ...]:
        ids = torch.randint(0, 128, (B, 7))
        mask = torch.ones(B, 7, dtype=torch.long)
        mask[1, :2] = 0  # left padding in row 1
        return ids, mask

    def apply(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
        ids, mask = inputs
        hidden, cache = module(module.embed(ids), mask)
        assert cache is None
        return module.logits(hidden)

    def expected_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (B, 7, 128)

    def test_protocol_attributes(self) -> None:
        module = self.make()
        assert isinstance(module, CausalLM)
        assert (module.hidden_dim, module.vocab_size) == (64, 128)
        assert module.model.config._attn_implementation == "sdpa"
        assert module.model.config.tie_word_embeddings is False
        assert module.model.lm_head.weight.data_ptr() != module.model.model.embed_tokens.weight.data_ptr()


class TestPooledImageHead(ComponentContract):
    def make(self) -> nn.Module:
        return PooledImageHead(in_dim=64, out_dim=32)

    def inputs(self) -> tuple[Tensor, ...]:
        return (torch.randn(B, 16, 64),)

    def expected_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (B, 32)


class TestTextTower(ComponentContract):
    def make(self) -> nn.Module:
        return TextTower(vocab_size=40, width=32, depth=1, num_heads=2, max_length=8, out_dim=24)

    def inputs(self) -> tuple[Tensor, ...]:
        return torch.randint(0, 40, (B, 6)), torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])

    def expected_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (B, 24)


class TestRegressionHead(ComponentContract):
    def make(self) -> nn.Module:
        return RegressionHead(in_dim=64, out_dim=48)

    def inputs(self) -> tuple[Tensor, ...]:
        return (torch.randn(B, 5, 64),)

    def expected_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (B, 5, 48)

    def test_no_bias(self) -> None:
        assert [n for n, _ in self.make().named_parameters()] == ["proj.weight"]


@pytest.mark.parametrize("make", [lambda: CFormer.tiny(out_dim=48),
                                  lambda: MeanPoolProjector(in_dim=64, out_dim=48, grid=4)],
                         ids=["cformer", "meanpool"])
def test_adapters_are_interchangeable(make) -> None:
    """Encoder -> either adapter -> (B, adapter.num_tokens, D_llm): the system code needs nothing else."""
    torch.manual_seed(0)
    feats = EVAEncoder.tiny(drop_cls=True)(torch.randn(B, 3, 64, 64))  # (B,64,64)
    adapter = make()
    assert isinstance(adapter, Adapter)
    assert adapter(feats).shape == (B, adapter.num_tokens, 48)


@pytest.mark.parametrize("fragment, params_b, attrs", [
    ("encoder_eva01_clip_g", 1.0, {"embed_dim": 1408, "num_tokens": 257, "grid": 16}),
    ("encoder_eva02_clip_e_plus_448", 4.35, {"embed_dim": 1792, "num_tokens": 1024, "grid": 32}),
    ("adapter_cformer_emu1", 0.129, {"num_tokens": 32}),
    ("llm_llama_13b", 13.0, {"hidden_dim": 5120, "vocab_size": 32000}),
    ("llm_llama_33b", 32.5, {"hidden_dim": 6656, "vocab_size": 32000}),
])
def test_real_size_fragments_build_on_meta(fragment, params_b: float, attrs: dict) -> None:
    """The papers' sizes live in the recipe fragments only (no Python preset that could disagree with them)."""
    with torch.device("meta"):
        module = build_fragment(FRAGMENTS / f"{fragment}.yaml")
    params = list(module.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) / 1e9 == pytest.approx(params_b, rel=0.03)
    assert {k: getattr(module, k) for k in attrs} == attrs


def test_real_eva_fragments_follow_the_papers() -> None:
    with torch.device("meta"):
        g, e = build_fragment(FRAGMENTS / "encoder_eva01_clip_g.yaml"), build_fragment(FRAGMENTS / "encoder_eva02_clip_e_plus_448.yaml")
    assert (len(g.trunk.blocks), g.drop_cls, g.block_cls.__name__) == (40, False, "EvaBlock")
    assert (len(e.trunk.blocks), e.drop_cls, e.block_cls.__name__) == (64, True, "EvaBlockPostNorm")


def test_meanpool_rejects_non_square_token_counts() -> None:
    with pytest.raises(ValueError, match="L=65"):
        MeanPoolProjector(in_dim=8, out_dim=8, grid=4)(torch.randn(1, 65, 8))


def test_meanpool_grid_must_tile_the_patch_grid_unless_adaptive() -> None:
    feats = torch.randn(1, 64, 8)                                      # an 8×8 patch grid
    with pytest.raises(ValueError, match=r"grid=7\) does not tile the 8×8 patch grid"):
        MeanPoolProjector(in_dim=8, out_dim=8, grid=7)(feats)
    assert MeanPoolProjector(in_dim=8, out_dim=8, grid=7, adaptive=True).pool(feats).shape == (1, 49, 8)
    # a grid that tiles pools with kernel = stride = side / grid, as Emu2 does
    pooled = MeanPoolProjector(in_dim=8, out_dim=8, grid=4).pool(feats)
    grid = feats.reshape(1, 8, 8, 8)                                   # (B, row, col, D) row-major
    torch.testing.assert_close(pooled[0, 0], grid[0, :2, :2].mean((0, 1)))
    torch.testing.assert_close(pooled[0, 5], grid[0, 2:4, 2:4].mean((0, 1)))


def test_components_import_no_lightning_and_move_no_devices() -> None:
    files = sorted(COMPONENTS_DIR.rglob("*.py"))
    assert len(files) >= 8
    banned = re.compile(r"^\s*(import|from)\s+(lightning|pytorch_lightning)\b|\.cuda\(|autocast", re.M)
    offenders = [str(f) for f in files if banned.search(f.read_text())]
    assert not offenders, f"lightning / device / autocast use in components: {offenders}"



@pytest.mark.parametrize("fragment", sorted(FRAGMENTS.glob("adapter_*_debug*.yaml")), ids=lambda p: p.stem)
def test_every_debug_adapter_fragment_meets_the_protocol(fragment: Path) -> None:
    """Every adapter a debug recipe can name (a new one included, docs/extending.md) has what systems use:
    the widths, N, and (B,L,D_enc) -> (B,N,D_llm) on the debug encoder; a PooledAdapter also pools in encoder
    space and projects up, and the two compose to forward."""
    from components.base import PooledAdapter

    torch.manual_seed(0)
    encoder, adapter = build_fragment(FRAGMENTS / "encoder_eva_debug.yaml"), build_fragment(fragment)
    assert isinstance(adapter, Adapter)
    assert adapter.in_dim == encoder.embed_dim
    feats = encoder(torch.randn(B, 3, 64, 64))
    out = adapter(feats)
    assert out.shape == (B, adapter.num_tokens, adapter.out_dim)
    if isinstance(adapter, PooledAdapter):
        pooled = adapter.pool(feats)
        assert pooled.shape == (B, adapter.num_tokens, adapter.in_dim)
        torch.testing.assert_close(adapter.project_up(pooled), out)
