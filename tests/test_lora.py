"""LoRA as a what-trains option of the policy (`policy.lora`, emu_lightning/systems/lora.py), through peft:

- the debug stage-2 recipe fitted through the real CLI with LoRA on the LLM trains the LoRA factors and nothing
  else of the LLM (counted: layers × targets × r · (in + out)), every LLM base weight unchanged;
- a run stopped after a checkpoint resumes to the same weights, bit for bit, as the uninterrupted one (the LoRA
  dropout's RNG included);
- the export merges the factors as peft merges them: a plain folder whose forward equals the unmerged system's;
- a plain state (a converted release, an earlier stage) hands off into a LoRA part with fresh factors (B = 0),
  so the adapted part starts exactly where the plain one was.

Emu-I's setting is r 16, alpha 16, dropout 0.05 on q/k/v/o (`Emu1/inference.py` L43-51 at baaivision/Emu 13c395e);
the tests use r 4, alpha 8 to keep the debug model small and the scale alpha / r ≠ 1.
The LoRA run's exact resume is slow: `.venv/bin/python -m pytest -q -m slow tests/test_lora.py`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from emu_lightning.cli import cli_main
from tests.resume_helpers import args, assert_same_weights, overlay, weights

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA = {"policy": {"lora": {"llm": {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": TARGETS}}}}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, one_thread):
    """The debug stage-2 recipe, LoRA on the LLM: the initial state (same seed) and the fitted run."""
    tmp = tmp_path_factory.mktemp("lora")
    path = overlay(tmp, STEPS, model=LORA, name="ref")
    initial = {k: v.clone() for k, v in cli_main(args(path)[1:], run=False).model.state_dict().items()}
    cli = cli_main(args(path))
    assert cli.trainer.global_step == STEPS
    return tmp, initial, cli


def test_lora_on_the_llm_trains_only_its_factors(lora_run):
    _, initial, cli = lora_run
    system = cli.model
    llm = system.llm.model.config                                       # debug LLM: width 256, 4 layers
    r = LORA["policy"]["lora"]["llm"]["r"]
    lora_params = {n: p for n, p in system.llm.named_parameters() if ".lora_" in n}
    assert len(lora_params) == 2 * len(TARGETS) * llm.num_hidden_layers
    # q/k/v/o of LLaMA are (D, D) with D = 256 (4 heads × 64): A (r, D) and B (D, r) per target.
    want = llm.num_hidden_layers * len(TARGETS) * r * (llm.hidden_size + llm.hidden_size)
    trainable = {n for n, p in system.llm.named_parameters() if p.requires_grad}
    assert trainable == set(lora_params) and sum(p.numel() for p in lora_params.values()) == want == 32768
    groups = {g["name"]: g["params"] for g in cli.trainer.optimizers[0].param_groups}
    assert sum(p.numel() for p in groups["llm"]) == want and "llm.no_decay" not in groups
    # After the fit: every LLM tensor but the factors is exactly as initialised; the factors (B from 0) moved.
    final = system.state_dict()
    changed = {k for k in final if k.startswith("llm.") and not torch.equal(final[k], initial[k])}
    assert changed == {f"llm.{n}" for n in lora_params}
    assert all(final[k].abs().sum() > 0 for k in changed if ".lora_B." in k)
    assert all(torch.equal(final[k], initial[k]) for k in final if k.startswith("encoder."))
    assert any(not torch.equal(final[k], initial[k]) for k in final if k.startswith("adapter."))   # full weights
    from callbacks.trainable_audit import audit_rows

    rows = {name: (n_train, verdict) for name, n_train, _, _, verdict in audit_rows(system)}
    assert rows["llm"] == (want, "train") and rows["encoder"] == (0, "frozen")


@pytest.mark.slow
def test_a_lora_run_resumes_to_identical_weights(lora_run, tmp_path):
    tmp, _, _ = lora_run
    ref = tmp / "ref" / "ckpt" / "last.ckpt"
    assert any(".lora_A." in k for k in weights(ref))                  # the checkpoint holds the factors
    with pytest.raises(KeyError, match="after step 3"):
        cli_main(args(overlay(tmp_path, STEPS, crash_at=3, model=LORA, name="cut")))
    cut = tmp_path / "cut" / "ckpt" / "last.ckpt"
    assert torch.load(cut, weights_only=True)["global_step"] == 2
    cli = cli_main(args(overlay(tmp_path, STEPS, model=LORA, name="cut"), str(cut)))
    assert cli.trainer.global_step == STEPS
    assert_same_weights(ref, cut)


def test_export_merges_lora_and_computes_the_unmerged_forward(lora_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from emu_lightning.checkpoints.export import PARTS, export_model, load_exported
    from emu_lightning.data.layout.sequence import SequenceCollator

    tmp, initial, cli = lora_run
    system = cli.model.eval()
    specs = yaml.safe_load((tmp / "ref" / "config.yaml").read_text())["model"]["init_args"]
    out = export_model(system, tmp_path / "export", {p: specs[p] for p in ("llm", *PARTS)})
    tensors = load_file(str(out / "llm" / "model.safetensors"))
    assert not [k for k in tensors if "lora" in k or "base_layer" in k]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tensors[q], initial["llm.model." + q.replace(".weight", ".base_layer.weight")])
    plain = LlamaForCausalLM.from_pretrained(str(out / "llm"))          # no peft needed to load it
    assert plain.model.layers[0].self_attn.q_proj.__class__ is torch.nn.Linear
    model = load_exported(out)
    docs = [{"id": "a", "source": "pairs", "segments": [("image", torch.rand(3, 64, 64)), ("text", "a red circle.")]},
            {"id": "b", "source": "documents", "segments": [("text", "two"), ("image", torch.rand(3, 64, 64))]}]
    batch = SequenceCollator(system.tokenizer, system.num_image_tokens, max_length=96)(docs)
    with torch.no_grad():
        got = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        visual = system.encode_images(batch["pixel_values"])
        hidden, _ = system.llm(system.embed_multimodal(batch["input_ids"], visual), batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got["logits"][keep], system.llm.logits(hidden)[keep], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["regression"][keep], system.regression_head(hidden)[keep], rtol=0, atol=1e-5)


def test_merge_of_a_saved_state_equals_peft_merge(lora_run):
    """`merge_lora_state` (the converter's export of a LoRA checkpoint, no model built) gives exactly the weights
    of peft's own merge of the live part (`merged_state_dict`: base + `get_delta_weight`)."""
    from emu_lightning.checkpoints.convert.folder import lora_merged
    from emu_lightning.systems.lora import merged_state_dict

    tmp, _, cli = lora_run
    merged = lora_merged(str(tmp / "ref" / "ckpt" / "last.ckpt"))       # alpha read from the saved policy
    live = merged_state_dict(cli.model.llm)
    assert {k for k in merged if k.startswith("llm.")} == {f"llm.{k}" for k in live}
    assert all(torch.equal(merged[f"llm.{k}"], v) for k, v in live.items())


def test_a_plain_state_hands_off_into_a_lora_part_with_fresh_factors(tmp_path):
    from emu_lightning.checkpoints.handoff import load_parts
    from emu_lightning.systems.lora import LoraSpec, lora_layers
    from emu_lightning.systems.policy import StagePolicy
    from tests.helpers import tiny_stage2

    plain = tiny_stage2()
    torch.save({f"{n}.{k}": v for n, p in plain.parts.items() for k, v in p.state_dict().items()},
               tmp_path / "plain.pt")
    policy = StagePolicy(trainable=["adapter", "llm"], lr={"adapter": 1e-3, "llm": 1e-3},
                         lora={"llm": LoraSpec(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"])})
    adapted = tiny_stage2(trainable=("adapter", "llm"))
    policy.apply(adapted.parts)
    assert len(lora_layers(adapted.llm)) == 2 * 2                        # 2 layers × {q, v}
    report = load_parts(adapted.parts, str(tmp_path / "plain.pt"), {p: p for p in adapted.parts})
    state = adapted.llm.state_dict()
    q = "model.model.layers.1.self_attn.q_proj."
    assert torch.equal(state[q + "base_layer.weight"], plain.llm.state_dict()[q + "weight"])
    assert not state[q + "lora_B.default.weight"].any()                 # B = 0: the same function as the plain LLM
    assert report.loaded["llm"] == len(state)
    embeds, mask = torch.randn(2, 5, 64), torch.ones(2, 5)
    adapted.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted.llm(embeds, mask)[0], plain.llm(embeds, mask)[0], rtol=0, atol=0)


def test_lora_policy_errors_name_the_part_and_the_fix():
    from emu_lightning.systems.policy import StagePolicy
    from tests.helpers import tiny_stage2

    system = tiny_stage2()
    with pytest.raises(ValueError, match=r"policy\.lora adapts \['llm'\], which policy\.trainable freezes"):
        StagePolicy(trainable=["adapter"], lr={"adapter": 1e-3}, lora={"llm": {"r": 2}}).check(system.parts)
    with pytest.raises(ValueError, match=r"policy\.lora names \['decoder'\], but the system's parts are"):
        StagePolicy(trainable=["llm"], lr={"llm": 1e-3}, lora={"decoder": {"r": 2}}).check(system.parts)
    with pytest.raises(ValueError, match=r"policy\.lora\.llm\.target_modules=\['qkv'\]: .*not found"):
        StagePolicy(trainable=["llm"], lr={"llm": 1e-3},
                    lora={"llm": {"r": 2, "target_modules": ["qkv"]}}).apply({"llm": system.llm})


def test_a_recipe_states_lora_in_its_policy(tmp_path, monkeypatch):
    """YAML form: `policy.lora.<part>` with the `LoraSpec` fields (defaults: Emu-I's r 16, alpha 16, dropout 0.05,
    q/k/v/o)."""
    from emu_lightning.systems.lora import LoraSpec

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "debug" / "chat.yaml"
    cli = cli_main(["--config", str(recipe), "--model.init_args.policy.lora", "{llm: {}}"], run=False)
    assert cli.model.policy.lora == {"llm": LoraSpec()}
    assert LoraSpec() == LoraSpec(r=16, alpha=16.0, dropout=0.05, target_modules=TARGETS)
