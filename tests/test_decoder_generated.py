"""The decoder tuned on generated embeddings: the frozen stage-2 generator's embeddings of a sample's caption
replace the encoder's condition for a `generated_p` share of training samples, paired with the true image;
evaluation adds judged text-to-image; a generator that does not fit the decoder is refused at construction."""
from __future__ import annotations

import pytest
import torch

from components.heads import QueryHead
from emu_lightning.data.layout.collate import CaptionCollator
from emu_lightning.checkpoints.export import export_model
from tests.helpers import IMAGE_SIZE, tiny_decoder, tiny_stage2
from tests.test_export import SPECS


def _generator(tmp_path, head=None):
    torch.manual_seed(0)
    system = tiny_stage2("meanpool", head=head).eval()
    spec = SPECS["meanpool"]
    if head is not None:
        spec = {**spec, "regression_head": {"class_path": "components.heads.QueryHead",
                                            "init_args": {"in_dim": 64, "out_dim": 64, "num_tokens": 4}}}
    return system, export_model(system, tmp_path / "gen", spec)


def _batch(decoder, n=3):
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions
    from emu_lightning.data.modules.captions import image_transform

    ds, tf = SyntheticCaptions(split="train", size=n, image_size=IMAGE_SIZE), image_transform(IMAGE_SIZE)
    samples = [{**s, "image": tf(s["image"]), "caption": s["captions"][0]} for s in (ds[i] for i in range(n))]
    return CaptionCollator(decoder.tokenizer, decoder.num_image_tokens, max_length=64)(samples)


@pytest.mark.parametrize("queries", [False, True])
def test_training_conditions_are_the_generators_embeddings_of_a_caption(tmp_path, queries, monkeypatch):
    generator, folder = _generator(tmp_path, QueryHead(64, 64, num_tokens=4) if queries else None)
    decoder = tiny_decoder(generator=str(folder), generated_p=1.0, cond_drop=0.0)
    batch = _batch(decoder)
    seen = {}
    forward = decoder.unet.forward
    monkeypatch.setattr(decoder.unet, "forward", lambda z, t, cond: seen.setdefault("cond", cond) is None or forward(z, t, cond))
    torch.manual_seed(1)
    decoder.losses(batch)
    # The same draw of captions, replayed: each condition is the generator's embedding of the caption drawn.
    torch.manual_seed(1)
    torch.rand(3)
    picks = [c[int(torch.randint(len(c), ()))] for c in batch["captions"]]
    want = generator.generate_image_embeddings([[("text", p)] for p in picks])
    torch.testing.assert_close(seen["cond"], want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen["cond"], decoder.condition(batch["pixel_values"]))
    # Nothing of the generator lands in the decoder's checkpoint or parameters.
    assert not any(k.startswith("_generator") or "llm" in k for k in decoder.state_dict())


def test_generated_share_zero_keeps_the_encoder_condition(tmp_path, monkeypatch):
    _, folder = _generator(tmp_path)
    decoder = tiny_decoder(generator=str(folder), generated_p=0.0, cond_drop=0.0)
    batch, seen = _batch(decoder), {}
    forward = decoder.unet.forward
    monkeypatch.setattr(decoder.unet, "forward", lambda z, t, cond: seen.setdefault("cond", cond) is None or forward(z, t, cond))
    decoder.losses(batch)
    torch.testing.assert_close(seen["cond"], decoder.condition(batch["pixel_values"]))


def test_evaluation_scores_text_to_image_with_the_judge(tmp_path, monkeypatch):
    _, folder = _generator(tmp_path)
    decoder = tiny_decoder(generator=str(folder), generated_p=0.5, semantic_classifier="judge", fid_feature=None)
    from emu_lightning.metrics import semantic

    class Judge(torch.nn.Module):
        def forward(self, x):
            return {"shape": torch.zeros(len(x), 9, 7), "color": torch.zeros(len(x), 9, 7)}

    monkeypatch.setattr(decoder, "_classifier", lambda: Judge())
    batch = _batch(decoder, 2)
    from emu_lightning.data.synthetic.scenes import SyntheticCaptions

    batch["scenes"] = [SyntheticCaptions(split="train", size=2, image_size=IMAGE_SIZE)[i]["scene"] for i in range(2)]
    decoder._evaluate(batch, 0, "val")
    assert ("val", "t2i") in decoder.metrics and len(decoder.eval_images["val"]) == 3
    assert set(decoder.metrics["val", "t2i"].compute()) >= {"color", "shape", "both"}
    del semantic


def test_a_generator_that_does_not_fit_is_refused_naming_both_sides(tmp_path):
    emu1 = export_model(tiny_stage2("cformer"), tmp_path / "emu1", SPECS["cformer"])
    with pytest.raises(ValueError, match=r"generator .*emu1 regresses target_space='adapter'.*condition='pooled'"):
        tiny_decoder(generator=str(emu1), generated_p=1.0)
    with pytest.raises(ValueError, match="generated_p=0.5 needs a generator"):
        tiny_decoder(generated_p=0.5)


def test_a_unet_handoff_starts_the_ema_from_the_loaded_weights(tmp_path):
    trained = tiny_decoder(ema_decay=0.99)
    with torch.no_grad():
        for p in trained.unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "d.ckpt")
    tuned = tiny_decoder(ema_decay=0.99, init_from=str(tmp_path / "d.ckpt"),
                         handoff={"encoder": "encoder", "adapter": "adapter", "unet": "unet"})
    first = next(iter(trained.unet.state_dict()))
    assert not torch.equal(tuned.ema.state_dict()[first], trained.unet.state_dict()[first])   # before the hand-off
    tuned.setup("fit")
    for k, v in trained.unet.state_dict().items():
        assert torch.equal(tuned.ema.state_dict()[k], v), k
    # The default hand-off loads the UNet too when the checkpoint has one (tuning a decoder run continues it) ...
    default = tiny_decoder(ema_decay=0.99, init_from=str(tmp_path / "d.ckpt"))
    default.setup("fit")
    assert default.handoff_report.fresh == []
    for k, v in trained.unet.state_dict().items():
        assert torch.equal(default.unet.state_dict()[k], v), k
        assert torch.equal(default.ema.state_dict()[k], v), k
    # ... and a mapping without it leaves the UNet, and the EMA constructed from it, fresh.
    fresh = tiny_decoder(ema_decay=0.99, init_from=str(tmp_path / "d.ckpt"),
                         handoff={"encoder": "encoder", "adapter": "adapter"})
    fresh.setup("fit")
    assert fresh.handoff_report.fresh == ["unet"]
    assert not torch.equal(fresh.unet.state_dict()[first], trained.unet.state_dict()[first])
    for k, v in fresh.unet.state_dict().items():
        assert torch.equal(fresh.ema.state_dict()[k], v), k
