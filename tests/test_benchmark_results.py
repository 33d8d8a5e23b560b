"""benchmarks/results_io.py: a run merges into benchmarks/results/<name>.json without losing the other runs."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks.results_io import merge_result, read_results, run_facts


def test_merge_keeps_other_runs_and_replaces_its_own(tmp_path):
    merge_result("bench", "a", {"steps": 1}, results=tmp_path)
    merge_result("bench", "b", {"steps": 2}, results=tmp_path)
    path = merge_result("bench", "a", {"steps": 3}, results=tmp_path)
    assert path == tmp_path / "bench.json"
    assert json.loads(path.read_text()) == {"a": {"steps": 3}, "b": {"steps": 2}}
    assert sorted(os.listdir(tmp_path)) == ["bench.json"]   # no temporary or lock file left behind


def test_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the old file whole and no temporary file."""
    merge_result("bench", "a", {"steps": 1}, results=tmp_path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        merge_result("bench", "b", {"steps": 2}, results=tmp_path)
    assert read_results("bench", tmp_path) == {"a": {"steps": 1}}
    assert sorted(os.listdir(tmp_path)) == ["bench.json"]


@pytest.mark.parametrize("text, match", [("{\"a\": 1", "not valid JSON"), ("[1, 2]", "found a list")])
def test_corrupt_file_is_named(tmp_path, text, match):
    (tmp_path / "bench.json").write_text(text)
    with pytest.raises(ValueError, match=rf"bench\.json: .*{match}"):
        merge_result("bench", "a", {}, results=tmp_path)
    assert (tmp_path / "bench.json").read_text() == text   # left as it was


def test_run_facts():
    facts = run_facts(["--steps", "3", "--name", "a b"])
    assert facts["command"].endswith("--steps 3 --name 'a b'")
    assert facts["machine"]["cores"] == os.cpu_count() and facts["machine"]["threads"] >= 1
    assert facts["date"].endswith("+00:00")


def test_new_file_is_readable_by_others(tmp_path):
    """A temporary file is private (0600); the results file it becomes is not."""
    path = merge_result("bench", "a", {}, results=tmp_path)
    assert path.stat().st_mode & 0o777 == 0o644
