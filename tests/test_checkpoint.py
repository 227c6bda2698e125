"""Checkpoints: atomic writes, plain data round trip, hostile pickles refused."""

import os
import pickle

import pytest
import torch

from detector import Model
from detector.atomic import atomic_write_text
from detector.errors import DetectorError
from detector.train.checkpoint import load_checkpoint, save_checkpoint
from detector.train.trainer import train


def test_round_trip_with_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "model_args": {"num_classes": 3}, "epoch": 2,
             "names": ["a", "b"], "rows": [{"epoch": 1, "metrics/mAP50": 0.5}]}
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["rows"] == state["rows"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class Exploit:
    """Unpickling this runs `touch <marker>`: what a hostile checkpoint would do with a real payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, writer):
    path, marker = tmp_path / "evil.pt", tmp_path / "code-ran"
    payload = {"model": Exploit(marker), "model_args": {}}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)  # a real checkpoint file (zip) holding the hostile object
    named = "posix.system" if writer == "torch.save" else "Unsupported operand"  # a bare pickle fails sooner
    with pytest.raises(DetectorError, match=rf"refused: it holds objects other than plain data \({named}") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
    assert "weights_only" not in str(caught.value)  # torch's advice to load it anyway is not passed on
    # Every way a user hands us a checkpoint goes through the same check.
    with pytest.raises(DetectorError, match="refused"):
        Model(str(path))
    with pytest.raises(DetectorError, match="refused"):
        train({"resume": str(path)})
    with pytest.raises(DetectorError, match="refused"):  # before the data card, whose dataset is not there
        train({"model": str(path), "data": str(tmp_path / "no_such_card.yaml")})
    assert not marker.exists()
    # The control: the payload is live, and loading without weights_only runs it.
    if writer == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


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
    (tmp_path / "text.pt").write_text("hello\n")  # torch's fallback to its old format raises a KeyError here
    with pytest.raises(DetectorError, match=r"text.pt is not readable \(KeyError"):
        load_checkpoint(tmp_path / "text.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(DetectorError, match=r"not readable \(the file is empty\)"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(DetectorError, match="is a folder: give a .pt file, e.g. .*last.pt"):
        load_checkpoint(tmp_path)


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


def test_an_ultralytics_checkpoint_is_named_as_such(tmp_path, monkeypatch):
    """Users coming from Ultralytics try their yolov8n.pt: it pickles Ultralytics' model classes."""
    import sys
    import types

    tasks = types.ModuleType("ultralytics.nn.tasks")

    class DetectionModel(torch.nn.Module):
        pass

    DetectionModel.__module__, DetectionModel.__qualname__ = "ultralytics.nn.tasks", "DetectionModel"
    tasks.DetectionModel = DetectionModel
    for name, module in (("ultralytics", types.ModuleType("ultralytics")), ("ultralytics.nn", types.ModuleType(
            "ultralytics.nn")), ("ultralytics.nn.tasks", tasks)):
        monkeypatch.setitem(sys.modules, name, module)
    torch.save({"model": DetectionModel(), "epoch": 3}, tmp_path / "yolov8n.pt")
    # Handed to detector/model/peer.py (tests/test_peer_checkpoints.py), which needs the model's architecture.
    with pytest.raises(DetectorError, match=r"yolov8n.pt is an Ultralytics checkpoint this package cannot map: its "
                       r"model holds no architecture"):
        load_checkpoint(tmp_path / "yolov8n.pt")
