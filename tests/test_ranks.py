"""Exact resume on several ranks and streamed data at scale (docs/scale.md, "Resuming on several ranks" and
"Streaming at scale").

Default suite (in one process, ranks simulated by patching `torch.distributed`): every rank's data position goes
into the one checkpoint and each rank resumes its own, map-style (stage 1's `EpochSampler` / `ResumableMapLoader`)
and streamed (the stage-2 mixture, stage 1's tar stream); a map-style position is re-sharded onto another number of
ranks, a stream's is refused; `WebDatasetPairs`' shuffle buffer, shard deal and equal epochs.

Slow (`pytest -m slow tests/test_ranks.py`): the debug stage-1 recipe on 2 gloo processes (DDP), killed with
SIGKILL mid-epoch and resumed: the same weights bit for bit and the same samples in the same order on each rank, for
a map-style set and for uneven tar shards read by 2 workers per rank; then the 2-rank checkpoints resumed on 1 process.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import Dataset

from emu_lightning.data.layout.sequence import Layout
from emu_lightning.data.modules.captions import EpochSampler, ResumableMapLoader, _Streamed, _StreamCollate
from emu_lightning.data.modules.mixture import ResumableLoader, SourceMixture
from emu_lightning.data.real.captions import WebDatasetPairs
from tests.helpers import write_tar
from tests.test_real_data import _png

PNG = _png()


def _ranks(monkeypatch, rank: int, world: int) -> None:
    """This process plays rank `rank` of `world` (what `ranks.rank_world` reads)."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)


def _shards(tmp: Path, sizes: list[int], bad: str | None = None) -> list[str]:
    """Shards of the given sizes (uneven), keys `<shard letter><index>`; `bad` names one key with a broken image."""
    out = []
    for s, n in enumerate(sizes):
        key = lambda i: f"{chr(97 + s)}{i}"  # noqa: E731
        samples = [(key(i), {"png": b"broken" if key(i) == bad else PNG, "txt": f"caption {key(i)}".encode()})
                   for i in range(n)]
        out.append(str(write_tar(tmp / f"{s:03d}.tar", samples)))
    return out


# --- stage 1, map-style: the sampler and loader over ranks -------------------------------------------------------

class _Keys(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> int:
        return key[0]


def _read(loader: ResumableMapLoader, batches: int | None = None) -> list[list[int]]:
    out = []
    for batch in loader:
        loader.consumed()
        out.append(batch.tolist())
        if len(out) == batches:
            break
    return out


def test_epoch_sampler_deals_equal_shares_and_resumes_or_reshards():
    n, world, bs, b = 23, 2, 2, 3
    shares = []
    for rank in range(world):
        torch.manual_seed(0)                  # every rank's RNG in step (as `seed_everything` leaves them)
        shares.append([i for i, _ in EpochSampler(n, rank, world)])
    assert len(shares[0]) == len(shares[1]) == n // world             # equal epochs: the odd index waits
    assert not set(shares[0]) & set(shares[1])
    torch.manual_seed(0)
    seed = next(iter(EpochSampler(n)))[1]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    assert shares[0] == order[0::2][:11] and shares[1] == order[1::2][:11]
    # After b batches of bs on each rank the ranks consumed the first world*b*bs indices of the order, so resuming
    # from there on the same ranks continues each rank's own share...
    start = world * b * bs
    assert sorted(shares[0][:b * bs] + shares[1][:b * bs]) == sorted(order[:start])
    for rank in range(world):
        s = EpochSampler(n, rank, world)
        s.resume(seed, start)
        assert [i for i, _ in s] == shares[rank][b * bs:]
    # ...and on 3 ranks the rest of the order is dealt anew: each unread index once, none read again.
    rest = []
    for rank in range(3):
        s = EpochSampler(n, rank, 3)
        s.resume(seed, start)
        rest += [i for i, _ in s]
    assert len(rest) == len(set(rest)) == (n - start) // 3 * 3 and set(rest) <= set(order[start:])


def test_map_loader_saves_every_rank_and_resumes_each_or_reshards(recwarn):
    n, bs = 20, 2
    ref, states = [], []
    for rank in range(2):
        torch.manual_seed(0)
        ref.append(_read(ResumableMapLoader(_Keys(n), bs, rank=rank, world=2)))
        torch.manual_seed(0)
        cut = ResumableMapLoader(_Keys(n), bs, rank=rank, world=2)
        _read(cut, 3)
        states.append(cut._local_state())
    assert [len(r) for r in ref] == [5, 5]
    saved = {"world_size": 2, "ranks": states}            # what `state_dict` gathers on 2 ranks
    assert states[0]["samples"] == states[1]["samples"] == 2 * 3 * bs
    for rank in range(2):                                  # each rank resumes its own place
        loader = ResumableMapLoader(_Keys(n), bs, rank=rank, world=2)
        loader.load_state_dict(saved)
        assert _read(loader) == ref[rank][3:]
    # One process from the 2-rank checkpoint: re-sharded, the epoch's 8 unread samples, each once.
    loader = ResumableMapLoader(_Keys(n), bs)
    loader.load_state_dict(saved)
    rest = sum(_read(loader), [])
    read = sum(ref[0][:3] + ref[1][:3], [])
    assert sorted(rest + read) == list(range(n))
    assert any("saved on 2 rank(s), this run has 1" in str(w.message) for w in recwarn)
    # Ranks that disagree on their epoch cannot be re-sharded.
    bad = {"world_size": 2, "ranks": [states[0], {**states[1], "samples": 4}]}
    with pytest.raises(ValueError, match=r"2 ranks disagree on their epoch's \(order seed, consumed indices\)"):
        ResumableMapLoader(_Keys(n), bs).load_state_dict(bad)


# --- stage 2: the mixture's readers over ranks -------------------------------------------------------------------

def test_mixture_saves_every_ranks_readers_and_refuses_another_world_size(tmp_path, monkeypatch):
    """2 ranks (simulated), a map-style source and uneven tar shards behind a shuffle buffer: the merged checkpoint
    entry resumes each rank's own stream step for step; on 1 rank it is refused, naming both sizes."""
    shards = _shards(tmp_path, [3, 6, 4, 5])
    docs = [{"id": f"m{i}", "image": 0, "captions": [f"m{i}"]} for i in range(9)]

    def loader() -> ResumableLoader:
        ds = SourceMixture({"pairs": WebDatasetPairs(shards, shuffle=3, seed=1), "map": docs},
                           {"pairs": 2, "map": 1}, {"pairs": Layout("pair"), "map": Layout("pair")},
                           prepare=lambda x: 0)
        return ResumableLoader(ds, collate_fn=lambda step: step)

    ids = lambda steps: [[d["id"] for d in s] for s in steps]  # noqa: E731
    total, cut = 7, 3
    ref, local = [], []
    for rank in range(2):
        _ranks(monkeypatch, rank, 2)
        ref.append(ids(islice(loader(), total)))
        first = loader()
        for step in islice(first, cut):
            first.consumed(step.state)
        local.append(first._local_state())
    assert ref[0] != ref[1]                                             # each rank reads its own shards
    saved = ResumableLoader.merge(local)
    assert saved["world_size"] == 2 and sorted(saved["readers"]) == ["0", "1"]
    for rank in range(2):
        _ranks(monkeypatch, rank, 2)
        resumed = loader()
        resumed.load_state_dict(saved)
        assert resumed.readers.keys() == {str(rank)}
        assert ids(islice(resumed, total - cut)) == ref[rank][cut:]
    with pytest.raises(ValueError, match=r"saved with 1 DataLoader workers per rank, this run has 2: set "
                                         r"num_workers=1"):
        ResumableLoader(loader().dataset, num_workers=2).load_state_dict(saved)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)          # one process
    with pytest.raises(ValueError, match=r"saved on 2 rank\(s\), this run has 1: each of the 2 ranks' readers"):
        loader().load_state_dict(saved)


# --- WebDatasetPairs: shuffle buffer, shard deal, resumable stream ------------------------------------------------

def test_tar_stream_shuffles_by_seed_and_resumes_without_reading_what_came_before(tmp_path):
    shards = _shards(tmp_path, [5, 2, 7], bad="c3")
    keys = {f"a{i}" for i in range(5)} | {"b0", "b1"} | {f"c{i}" for i in range(7)} - {"c3"}
    take = lambda ds, n, start=(0, 0): [(s["id"], pos) for s, pos in islice(ds.stream(0, 1, start), n)]  # noqa
    full = take(WebDatasetPairs(shards, shuffle=4, seed=1), 30)
    passes = [[k for k, (p, _) in full if p == q] for q in (0, 1)]
    assert set(passes[0]) == set(passes[1]) == keys and len(passes[0]) == len(keys)   # each pass: every sample once
    assert passes[0] != passes[1]                                                       # in a new order
    assert take(WebDatasetPairs(shards, shuffle=4, seed=1), 30) == full                 # seeded
    assert [k for k, _ in take(WebDatasetPairs(shards, shuffle=4, seed=2), 13)] != passes[0]
    assert [s["id"] for s in WebDatasetPairs(shards)] == sorted(keys, key=lambda k: (k[0], int(k[1:])))  # no shuffle
    # Resumed from the position after sample 17 (pass 1): the rest of the stream, and only its images decoded.
    ds = WebDatasetPairs(shards, shuffle=4, seed=1)
    decoded = []
    real = ds._decode
    ds._decode = lambda shard, key, files: (decoded.append(key), real(shard, key, files))[1]
    resumed = take(ds, 12, full[17][1])
    assert resumed == full[18:30]
    assert [k for k in decoded if k != "c3"] == [k for k, _ in resumed]   # the broken c3 is drawn, and skipped
    # The replay counted nothing: the stats are those of the samples read since the resume.
    assert ds.stats["seen"] == len(decoded) and ds.stats["skipped/bad_image"] == decoded.count("c3") == 1


def test_tar_shards_are_dealt_per_pass_and_readers_need_one_each(tmp_path):
    shards = _shards(tmp_path, [1, 1, 1, 1, 1])
    ds = WebDatasetPairs(shards, shuffle=2, seed=0)
    for p in range(3):
        dealt = [ds.pass_shards(p, r, 2) for r in range(2)]
        assert sorted(dealt[0] + dealt[1]) == sorted(shards) and len(dealt[0]) == 3
    assert ds.pass_shards(0, 0, 2) != ds.pass_shards(1, 0, 2) or ds.pass_shards(1, 0, 2) != ds.pass_shards(2, 0, 2)
    assert WebDatasetPairs(shards).pass_shards(4, 1, 2) == shards[1::2]       # no shuffle: the listed order
    with pytest.raises(ValueError, match=r"5 shard\(s\) for 6 readers \(ranks x DataLoader workers\)"):
        next(ds.stream(0, 6))
    with pytest.raises(ValueError, match=r"shuffle=-1; expected a buffer size"):
        WebDatasetPairs(shards, shuffle=-1)
    with pytest.raises(ValueError, match=r"epoch_samples=0; expected a positive number"):
        WebDatasetPairs(shards, epoch_samples=0)
    with pytest.raises(ValueError, match=r"epoch_samples=7 over 2 readers .* less than one batch of 4"):
        WebDatasetPairs(shards, epoch_samples=7).reader_budget(2, 4)


def test_tar_epochs_are_equal_on_every_rank_with_uneven_shards(tmp_path, monkeypatch):
    shards = _shards(tmp_path, [2, 9, 3])                          # rank 0 reads 5 samples a pass, rank 1 reads 9
    ds = WebDatasetPairs(shards, shuffle=3, seed=4, epoch_samples=14)
    epochs = {}
    for rank in range(2):
        _ranks(monkeypatch, rank, 2)
        epochs[rank] = [[s["id"] for s in ds] for _ in range(3)]
    assert [len(e) for r in (0, 1) for e in epochs[r]] == [7] * 6    # 14 // 2 readers, every epoch, both ranks
    assert epochs[0][0] != epochs[0][1]                              # each epoch continues the reader's stream


# --- stage 1, streamed: equal epochs and exact resume through the loader ------------------------------------------

def test_stage1_endless_stream_needs_max_steps(tmp_path):
    from types import SimpleNamespace

    from emu_lightning.data.modules.captions import CaptionDataModule

    dm = CaptionDataModule(train=WebDatasetPairs(_shards(tmp_path, [2])), val={}, test={})
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, max_steps=-1)
    with pytest.raises(ValueError, match=r"WebDatasetPairs has no epoch_samples, so its training stream is one "
                                         r"endless epoch: set trainer.max_steps"):
        dm.train_dataloader()


def _stage1_stream(shards: list[str], bs: int, workers: int) -> ResumableLoader:
    ds = _Streamed(WebDatasetPairs(shards, shuffle=3, seed=2, epoch_samples=12), lambda im: 0, True, bs)
    return ResumableLoader(ds, batch_size=bs, drop_last=True, num_workers=workers, persistent_workers=False,
                           collate_fn=_StreamCollate(lambda samples: {"ids": [s["id"] for s in samples]}))


def _epochs(loader: ResumableLoader, n: int, stop: int | None = None) -> list[list[list[str]]]:
    out = []
    for _ in range(n):
        out.append([])
        for batch in loader:
            loader.consumed(batch["stream_state"])
            out[-1].append(batch["ids"])
            if stop is not None and loader.steps == stop:
                return out
    return out


def test_stage1_stream_two_ranks_equal_epochs_resume_exactly(tmp_path, monkeypatch):
    """2 ranks (simulated), uneven shards: 3 batches of 2 per rank each epoch; stopped mid-epoch 1 and resumed on
    each rank from the merged checkpoint entry, both ranks read what they would have, into epoch 2."""
    shards = _shards(tmp_path, [2, 7, 4])
    ref, local = [], []
    for rank in range(2):
        _ranks(monkeypatch, rank, 2)
        ref.append(_epochs(_stage1_stream(shards, 2, 0), 3))
        cut = _stage1_stream(shards, 2, 0)
        _epochs(cut, 2, stop=4)                                       # epoch 0 (3 batches) and 1 of epoch 1
        local.append(cut._local_state())
    assert [len(e) for r in ref for e in r] == [3] * 6
    saved = ResumableLoader.merge(local)
    assert saved["epoch"] == 1 and saved["world_size"] == 2
    for rank in range(2):
        _ranks(monkeypatch, rank, 2)
        resumed = _stage1_stream(shards, 2, 0)
        resumed.load_state_dict(saved)
        assert _epochs(resumed, 2) == [ref[rank][1][1:], ref[rank][2]]


def test_stage1_stream_resume_rotates_workers_then_restores_them_at_the_epoch_end(tmp_path):
    """One rank, 2 workers (2 readers): stopped after an odd batch, the resumed epoch starts at the other worker's
    batch, and the next epoch has the workers in their own roles again."""
    shards = _shards(tmp_path, [3, 8])
    ref = _epochs(_stage1_stream(shards, 2, 2), 2)
    assert [len(e) for e in ref] == [6, 6]                           # 12 // 2 readers = 3 batches each, per epoch
    cut = _stage1_stream(shards, 2, 2)
    _epochs(cut, 1, stop=3)
    resumed = _stage1_stream(shards, 2, 2)
    resumed.load_state_dict(cut.state_dict())
    assert _epochs(resumed, 2) == [ref[0][3:], ref[1]]


# --- 2 gloo processes (DDP), killed mid-epoch and resumed ---------------------------------------------------------

STEPS, CUT, BATCH = 7, 3, 2   # CUT: the checkpoint resumed from, mid-epoch 0 and odd (the next batch is worker 1's)
MAP_SIZE = 20                  # map-style: 10 samples a rank, 5 batches an epoch
TAR_SIZES = [3, 6, 4, 8, 5]    # tar: uneven shards; 16 samples an epoch over 2 ranks x 2 workers, 4 batches a rank


def _train(source: str, tmp: Path) -> tuple[dict, int]:
    """The training set of `source` and the DataLoader workers per rank it is read with."""
    if source == "map":
        return {"class_path": "emu_lightning.data.synthetic.scenes.SyntheticCaptions",
                "init_args": {"split": "train", "size": MAP_SIZE, "image_size": 64}}, 0
    return {"class_path": "emu_lightning.data.real.captions.WebDatasetPairs",
            "init_args": {"urls": _shards(tmp, TAR_SIZES), "shuffle": 4, "seed": 3, "epoch_samples": 16}}, 2


def _overlay(tmp: Path, name: str, train: dict, workers: int, devices: int = 2, pause: float = 0.0,
             every: int = STEPS) -> str:
    """The run `name`: `devices` ranks, a checkpoint `step=<k>.ckpt` every `every` steps, sample ids per rank."""
    run = tmp / name
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"trainer": {
               "max_steps": STEPS, "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
               "val_check_interval": None, "limit_val_batches": 0, "log_every_n_steps": 1,
               "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
               "default_root_dir": str(run),
               "callbacks": [
                   {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "ckpt"), "filename": "{step}", "every_n_train_steps": every,
                                  "save_top_k": -1}},
                   {"class_path": "tests.resume_helpers.StepMarker",
                    "init_args": {"marks": str(run / "marks"), "pause": pause}},
                   {"class_path": "tests.resume_helpers.BatchIds", "init_args": {"folder": str(run)}}]},
           "data": {"init_args": {"train": train, "val": {}, "batch_size": BATCH, "num_workers": workers}}}
    path = run / "overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _launch(overlay: str, ckpt: Path | None = None) -> subprocess.Popen:
    """Rank 0 of the run, in a process group of its own (Lightning starts rank 1 from it), so one signal kills both."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "tests.scripts.ddp_stage1", overlay] + ([str(ckpt)] if ckpt else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["map", "tar"])
def test_two_gloo_ranks_killed_mid_epoch_resume_bit_identically(source, tmp_path):
    from emu_lightning.checkpoints.io import safe_load
    from emu_lightning.cli import cli_main
    from tests.resume_helpers import args, assert_same_weights, read_ids
    from tests.scripts.ddp_stage1 import RECIPE

    train, workers = _train(source, tmp_path)
    _finish(_launch(_overlay(tmp_path, "ref", train, workers)))

    # SIGKILL both ranks once the step-CUT checkpoint is on disk (a pause per step keeps them mid-epoch).
    proc = _launch(_overlay(tmp_path, "cut", train, workers, pause=0.5, every=1))
    ckpt = tmp_path / "cut" / "ckpt" / f"step={CUT}.ckpt"
    start = time.time()
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() - start < 600, "no checkpoint of step CUT after 600 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "ckpt" / f"step={STEPS}.ckpt").exists()
    position = safe_load(ckpt)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert position["world_size"] == 2, position

    _finish(_launch(_overlay(tmp_path, "resumed", train, workers), ckpt))
    assert_same_weights(tmp_path / "ref" / "ckpt" / f"step={STEPS}.ckpt",
                        tmp_path / "resumed" / "ckpt" / f"step={STEPS}.ckpt")
    ref = [read_ids(tmp_path / "ref", r) for r in (0, 1)]
    for rank in (0, 1):
        before = [row for row in read_ids(tmp_path / "cut", rank) if row[1] <= CUT]
        assert before + read_ids(tmp_path / "resumed", rank) == ref[rank], rank   # (epoch, step, sample ids)
    epochs = [[sum(row[0] == e for row in ref[r]) for e in (0, 1)] for r in (0, 1)]
    per_epoch = MAP_SIZE // 2 // BATCH if source == "map" else 16 // 4 // BATCH * 2
    assert epochs == [[per_epoch, STEPS - per_epoch]] * 2, epochs           # both ranks change epoch together
    first = [{i for row in ref[r] if row[0] == 0 for i in row[2]} for r in (0, 1)]
    if source == "map":
        assert not first[0] & first[1]                                        # the ranks' shares are disjoint

    # The 2-rank checkpoint on 1 process: map-style re-shards, a stream is refused.
    one = _overlay(tmp_path, "one", train, workers, devices=1)
    if source == "tar":
        with pytest.raises(ValueError, match=r"saved on 2 rank\(s\), this run has 1"):
            cli_main(args(one, str(ckpt), recipe=RECIPE))
        return
    with pytest.warns(UserWarning, match=r"saved on 2 rank\(s\), this run has 1: the rest of its epoch is re-dealt"):
        cli_main(args(one, str(ckpt), recipe=RECIPE))
    read = [i for r in (0, 1) for row in ref[r] if row[1] <= CUT for i in row[2]]     # by both ranks, steps 1-3
    rest = [i for row in read_ids(tmp_path / "one", 0) if row[0] == 0 for i in row[2]]  # by the 1 process after
    assert len(first[0] | first[1]) == MAP_SIZE
    assert sorted(read + rest) == sorted(first[0] | first[1])                # every sample of the epoch once
