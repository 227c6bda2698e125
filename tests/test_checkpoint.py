"""Checkpoints: atomic writes, plain data round trip, hostile pickles refused."""

import os
import pickle

import pytest
import torch

from detector.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from detector.errors import DetectorError


def test_round_trip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "model_args": {"num_classes": 3}, "epoch": 2,
             "names": ["a", "b"], "rows": [{"epoch": 1, "metrics/mAP50": 0.5}]}
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["rows"] == state["rows"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as file:
        pickle.dump({"model": Exploit(), "model_args": {}}, file)
    with pytest.raises(DetectorError, match="refused"):
        load_checkpoint(path)


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", {"model": {"w": torch.ones(1000)}, "model_args": {}})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DetectorError, match="not readable"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DetectorError, match="not a detector checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(DetectorError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.csv"
    atomic_write_text(path, "old")

    class Boom(Exception):
        pass

    def bad_save(state, file):
        file.write(b"partial")
        raise Boom

    monkey = pytest.MonkeyPatch()
    monkey.setattr(torch, "save", bad_save)
    with pytest.raises(Boom):
        save_checkpoint(path, {})
    monkey.undo()
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1
