"""Released visual decoders (diffusers UNet folders, Emu1/models/pipeline.py and Emu2/emu/diffusion.py) → our
`VisualDecoderUNet`: every key mapped, and the same noise prediction as the UNet called the way the release calls it."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from emu_lightning.checkpoints.convert import ConversionError
from emu_lightning.checkpoints.convert.decoder import build_decoder, convert_decoder

# Tiny twins of the released configs: Emu1 = SD1.5-style (cross-attention on the regressed 5120-d tokens);
# Emu2 = conf/diffusion_config/unet/config.json (text_time, 1792-d tokens, 3328 = 1792 + 6·256).
TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=4, norm_num_groups=8)
COND = {"emu1": dict(cross_attention_dim=48),
        "emu2": dict(cross_attention_dim=40, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=40 + 6 * 8, use_linear_projection=True)}


def released_unet(release, folder):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY, **COND[release])
    unet.save_pretrained(str(folder))
    return unet.eval()


@pytest.mark.parametrize("release", ["emu1", "emu2"])
def test_released_unet_loads_in_place_and_predicts_the_same_noise(tmp_path, release):
    ref = released_unet(release, tmp_path / "unet")
    dst = convert_decoder(release, str(tmp_path / "unet"), str(tmp_path / "out"), num_tokens=4)
    plan = json.loads((dst / "conversion.json").read_text())["keys"]
    ours = build_decoder(str(dst)).eval()
    # The plan names, for every released tensor, the `DecoderSystem` parameter (`unet.` + our decoder's name) that
    # holds it once the folder is loaded: each target exists and holds exactly that tensor.
    held = {f"unet.{k}": v for k, v in ours.state_dict().items()}
    assert sorted(plan.values()) == sorted(held)
    assert all(torch.equal(held[plan[k]], v) for k, v in ref.state_dict().items())
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    cond = torch.randn(2, 4, COND[release]["cross_attention_dim"])
    with torch.no_grad():
        if release == "emu1":     # pipeline.py: unet(latents, t, encoder_hidden_states=prompt_embeds)
            want = ref(sample, t, encoder_hidden_states=cond).sample
        else:                     # diffusion.py: text_embeds = mean(prompt_embeds, 1), time_ids = size + crop + size
            time_ids = torch.tensor([64.0, 64, 0, 0, 64, 64]).expand(2, 6)
            want = ref(sample, t, encoder_hidden_states=cond,
                       added_cond_kwargs={"text_embeds": cond.mean(1), "time_ids": time_ids}).sample
        got = ours(sample, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_wrong_release_or_a_truncated_folder_is_an_error(tmp_path):
    released_unet("emu1", tmp_path / "unet")
    with pytest.raises(ConversionError, match="emu2 decoder uses SDXL's text_time"):
        convert_decoder("emu2", str(tmp_path / "unet"), str(tmp_path / "out"))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing its weights"):
        convert_decoder("emu1", str(tmp_path / "unet"), str(tmp_path / "out"))
