"""GenEval, DPG-Bench and COCO-FID sample folders, each read back by a reader written from the benchmark's own
documentation (cited per reader), and `python -m emu_lightning.evaluate` writing them from tiny random runs."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emu_lightning.evaluate import cli
from emu_lightning.evaluate.generation import (
    read_coco_captions, read_dpg_prompts, read_geneval_prompts, write_coco, write_dpg, write_geneval,
)
from tests.helpers import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")
SIDE = 8


def painter(prompt: str, seeds) -> torch.Tensor:
    """A sampler whose image j is one flat colour read off its seed (exact through 8-bit PNG)."""
    return torch.stack([torch.tensor(seed_color(s)).view(3, 1, 1).expand(3, SIDE, SIDE) / 255 for s in seeds])


def seed_color(seed: int) -> tuple[int, int, int]:
    return (seed * 37) % 256, (seed * 91 + 7) % 256, (seed * 53 + 11) % 256


def flat_color(image: Image.Image) -> tuple[int, ...]:
    arr = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert (arr == arr[0]).all(), "a sample is not one flat colour"
    return tuple(int(v) for v in arr[0])


# ------------------------------------------------------------------ readers, from each benchmark's documentation


def read_geneval_folder(imagedir: Path) -> list[tuple[dict, list[Path]]]:
    """djghosh13/geneval README ("The generated format should be <IMAGE_FOLDER>/00000/metadata.jsonl, grid.png,
    samples/0000.png … where metadata.jsonl contains the N-th line from evaluation_metadata.jsonl") and its
    evaluation/evaluate_images.py: every all-digit subfolder, its metadata.jsonl parsed as one JSON object, and the
    files of samples/ named <digits>.png."""
    out = []
    for sub in sorted(os.listdir(imagedir)):
        folder = imagedir / sub
        if not folder.is_dir() or not sub.isdigit():
            continue
        with open(folder / "metadata.jsonl") as f:
            metadata = json.load(f)
        samples = sorted(folder / "samples" / n for n in os.listdir(folder / "samples") if re.fullmatch(r"\d+\.png", n))
        out.append((metadata, samples))
    return out


def read_dpg_folder(imagedir: Path, prompts: Path, resolution: int) -> dict[str, list[Image.Image]]:
    """TencentQQGYLab/ELLA README ("generate 4 images per prompt and grid them to 2x2 format … your generated image's
    filename is the same with the prompt's filename") and dpg_bench/compute_dpg_bench.py: every file of the image
    folder is a prompt's grid keyed by its name up to the first dot, cut into the 4 crops (0,0,R,R), (R,0,2R,R),
    (0,R,R,2R), (R,R,2R,2R) with R the --resolution."""
    names = {p.stem for p in prompts.glob("*.txt")}
    r = resolution
    crops = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
    out = {}
    for fn in os.listdir(imagedir):
        key = fn.split(".")[0]
        assert key in names, f"{fn} matches no prompt file"
        image = Image.open(imagedir / fn)
        assert image.size == (2 * r, 2 * r)
        out[key] = [image.crop(c) for c in crops]
    return out


# ------------------------------------------------------------------ writers


@pytest.fixture
def geneval_prompts(tmp_path) -> Path:
    lines = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
             {"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "red"}],
              "exclude": [{"class": "cup", "count": 2}], "prompt": "a photo of a red cup"}]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def dpg_prompts(tmp_path) -> Path:
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "partiprompts12.txt").write_text("A red cube on top of a blue sphere, in a sunny garden.\n")
    (folder / "posescript3.txt").write_text("Two cats sleeping on a green sofa.")
    return folder


def test_geneval_layout_reads_back(geneval_prompts, tmp_path):
    rows = write_geneval(tmp_path / "out", read_geneval_prompts(geneval_prompts), painter, per_prompt=4, seed=100)
    lines = geneval_prompts.read_text().splitlines()
    folders = read_geneval_folder(tmp_path / "out" / "images")
    assert [m for m, _ in folders] == [json.loads(line) for line in lines]           # the N-th line, as written
    assert [(tmp_path / "out" / "images" / f"{i:05d}" / "metadata.jsonl").read_text() for i in range(2)] == \
        [line + "\n" for line in lines]
    manifest = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert manifest == rows and [r["seed"] for r in rows] == list(range(100, 108))
    for i, (_, samples) in enumerate(folders):
        assert [p.name for p in samples] == ["0000.png", "0001.png", "0002.png", "0003.png"]
        assert [flat_color(Image.open(p)) for p in samples] == [seed_color(100 + 4 * i + j) for j in range(4)]
    assert Image.open(tmp_path / "out" / "images" / "00000" / "grid.png").size == (2 * SIDE, 2 * SIDE)


def test_dpg_layout_reads_back(dpg_prompts, tmp_path):
    rows = write_dpg(tmp_path / "out", read_dpg_prompts(dpg_prompts), painter, seed=5)
    tiles = read_dpg_folder(tmp_path / "out" / "images", dpg_prompts, SIDE)
    assert sorted(tiles) == ["partiprompts12", "posescript3"]
    by_name = {r["name"]: [x["seed"] for x in rows if x["name"] == r["name"]] for r in rows}
    for name, crops in tiles.items():
        assert [flat_color(c) for c in crops] == [seed_color(s) for s in by_name[name]]
    assert sorted(s for seeds in by_name.values() for s in seeds) == list(range(5, 13))


def test_coco_captions_are_drawn_reproducibly_and_written_one_image_each(tmp_path):
    anns = [{"image_id": 10 + i // 2, "id": i, "caption": f"caption {i}"} for i in range(6)]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": [], "annotations": anns}))
    drawn = read_coco_captions(path, 4, seed=1)
    assert drawn == read_coco_captions(path, 4, seed=1) and len({d["id"] for d in drawn}) == 4
    rows = write_coco(tmp_path / "out", drawn, painter, seed=0)
    files = sorted((tmp_path / "out" / "images").iterdir())
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [flat_color(Image.open(f)) for f in files] == [seed_color(r["seed"]) for r in rows]
    assert [r["prompt"] for r in rows] == [d["caption"] for d in drawn]
    with pytest.raises(ValueError, match=r"captions_val2014.json: 7 captions requested but the file has 6"):
        read_coco_captions(path, 7)


# ------------------------------------------------------------------ bad prompt files


def test_bad_prompt_files_name_file_line_and_field(geneval_prompts, dpg_prompts, tmp_path):
    lines = geneval_prompts.read_text().splitlines()
    record = json.loads(lines[1])
    del record["tag"]
    geneval_prompts.write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"{geneval_prompts}: line 2 lacks required field 'tag'"):
        read_geneval_prompts(geneval_prompts)
    geneval_prompts.write_text(json.dumps({"tag": "t", "include": [], "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 field 'include' is empty"):
        read_geneval_prompts(geneval_prompts)
    (dpg_prompts / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"empty.txt: empty prompt"):
        read_dpg_prompts(dpg_prompts)
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 2}]}))
    with pytest.raises(ValueError, match=r"caps.json: annotations\[1\] lacks required field 'caption'"):
        read_coco_captions(path, 1)


# ------------------------------------------------------------------ the command, with tiny random runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {kind: tiny_run(root / kind, kind) for kind in ("stage2", "decoder")}


def test_text_to_images_draws_image_j_as_text_to_image_with_seed_j():
    from emu_lightning.inference.pipelines import EmuImagePipeline
    from tests.helpers import tiny_decoder, tiny_stage2

    pipe = EmuImagePipeline(tiny_decoder(), tiny_stage2())
    images = pipe.text_to_images("a red circle", [3, 11], steps=2)                      # (2,3,16,16)
    alone = torch.cat([pipe.text_to_image(["a red circle"], steps=2, seed=s) for s in (3, 11)])
    torch.testing.assert_close(images, alone)
    assert (images[0] - images[1]).abs().max() > 0


@pytest.mark.slow   # two model loads and 5 images through the tiny decoder
def test_geneval_command_writes_its_layout_and_each_seed_redraws_its_image(runs, geneval_prompts, tmp_path, capsys):
    from emu_lightning.inference.infer import load_decoder, load_model
    from emu_lightning.inference.pipelines import EmuImagePipeline

    model = ["--ckpt", str(runs["stage2"]), "--decoder", str(runs["decoder"]), "--steps", "2"]
    assert cli.main(["geneval", *model, "--prompts", str(geneval_prompts), "--per-prompt", "2",
                     "--out", str(tmp_path / "g")]) == 0
    assert "evaluate_images.py" in json.loads(capsys.readouterr().out)["score_with"]
    folders = read_geneval_folder(tmp_path / "g" / "images")
    assert len(folders) == 2 and all(len(s) == 2 for _, s in folders)
    pipe = EmuImagePipeline(load_decoder(runs["decoder"]), load_model(runs["stage2"]))
    row = json.loads((tmp_path / "g" / "samples.jsonl").read_text().splitlines()[3])
    again = pipe.text_to_image([row["prompt"]], steps=2, seed=row["seed"])                # (1,3,16,16)
    written = torch.from_numpy(np.array(Image.open(tmp_path / "g" / row["path"]))).permute(2, 0, 1) / 255
    assert (again[0] - written).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.slow   # 8 images through the tiny decoder
def test_dpg_command_writes_its_layout(runs, dpg_prompts, tmp_path, capsys):
    model = ["--ckpt", str(runs["stage2"]), "--decoder", str(runs["decoder"]), "--steps", "2"]
    assert cli.main(["dpg-bench", *model, "--prompts", str(dpg_prompts), "--out", str(tmp_path / "d")]) == 0
    assert "dist_eval.sh" in json.loads(capsys.readouterr().out)["score_with"]
    assert sorted(read_dpg_folder(tmp_path / "d" / "images", dpg_prompts, 16)) == ["partiprompts12", "posescript3"]


def test_coco_fid_command_says_why_fid_is_skipped(runs, tmp_path, capsys):
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"annotations": [{"image_id": i, "id": i, "caption": f"a photo {i}"}
                                                for i in range(3)]}))
    (tmp_path / "real").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 30), (40 * i, 90, 200)).save(tmp_path / "real" / f"{i}.jpg")
    code = cli.main(["coco-fid", "--ckpt", str(runs["stage2"]), "--decoder", str(runs["decoder"]), "--steps", "2",
                     "--captions", str(path), "--num", "2", "--reference", str(tmp_path / "real"),
                     "--out", str(tmp_path / "c")])
    assert code == 0
    fid = json.loads(capsys.readouterr().out)["fid"]
    assert "skipped" in fid and ("--inception-weights" in fid["skipped"] or "torch-fidelity" in fid["skipped"])
    assert len(list((tmp_path / "c" / "images").iterdir())) == 2


@pytest.mark.slow   # InceptionV3 at 299 px on the CPU
def test_coco_fid_against_a_reference_folder(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity", reason="torch-fidelity is the [fid] extra")
    from emu_lightning.evaluate.generation import folder_fid
    from tests.test_metrics_image import random_inception_weights

    weights = tmp_path / "inception.pth"
    random_inception_weights(weights, monkeypatch)
    for name, shift in (("a", 0), ("b", 0), ("c", 120)):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.new("RGB", (30 + i, 24), (40 * i + shift, 90, 200 - shift)).save(tmp_path / name / f"{i}.png")
    same = folder_fid(tmp_path / "a", tmp_path / "b", weights, 32)
    other = folder_fid(tmp_path / "a", tmp_path / "c", weights, 32)
    assert same["generated_images"] == same["reference_images"] == 4
    # Random InceptionV3 features are tiny, so FIDs are too (tests/test_metrics_image.py): compare, don't threshold.
    assert abs(same["FID"]) < 1e-9 and other["FID"] > 1e3 * max(abs(same["FID"]), 1e-18)
