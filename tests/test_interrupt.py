"""Killed and interrupted runs: training in a subprocess is stopped at a chosen point, then resumed.

The child pauses at a chosen point (after a given batch, or half-way through writing last.pt) and
touches a marker file; the test then sends the signal, so where the run is stopped is exact. A
resumed run must end with the weights of an uninterrupted one, bit for bit (CPU, one thread).
"""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from detector.errors import DetectorError
from detector.model.loss import DetectionLoss
from detector.runs import make_run_dir
from detector.train.checkpoint import load_checkpoint
from detector.train.interrupt import StopRequest
from detector.train.trainer import Trainer, train
from tests.conftest import REPO, make_tiny_setup

# 12 images in batches of 4 with nbs 8: 3 batches per epoch, an optimizer step every 2 batches, so
# every epoch ends inside an accumulation window (its gradients must survive the save). Mosaic is on
# for epochs 1-2 and off for epoch 3 (close_mosaic=1).
SETTINGS = dict(imgsz=64, batch=4, nbs=8, epochs=3, workers=0, threads=1, val=False, plots=False, close_mosaic=1)

# The child: pause where told (after global batch N, or in the middle of writing the K-th checkpoint),
# write its pid to the marker and wait until the parent removes it (or kills it). Under torchrun only
# the rank named by PAUSE_RANK pauses.
CHILD = r"""
import io, os, sys, time
from pathlib import Path
import torch
import detector.train.engine as engine
from detector.cli import main

marker, where, at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def pause():
    if os.environ.get("RANK", "0") != os.environ.get("PAUSE_RANK", "0"):
        return
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.005)

if where == "batch":
    step = engine.train_step
    def train_step(ctx, images, targets):
        items = step(ctx, images, targets)
        if ctx.state.iteration == at:
            pause()
        return items
    engine.train_step = train_step
else:
    save, calls = torch.save, []
    def half_save(obj, file, *args, **kwargs):
        calls.append(1)
        if len(calls) != at:
            return save(obj, file, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        file.flush()
        pause()
    torch.save = half_save
sys.exit(main(["train", *sys.argv[4:]]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 12-image shapes set (val = train), a very small model scale, and an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("interrupt")
    paths = make_tiny_setup(root, seed=5, num_train=12, num_val=2, image_size=96, val_is_train=True)
    args = {**SETTINGS, **paths, "project": str(root / "runs")}
    threads = torch.get_num_threads()
    train({**args, "name": "straight"}, progress=False)
    yield {"args": args, "runs": root / "runs", "reference": load_checkpoint(root / "runs" / "straight" / "weights"
                                                                              / "last.pt")}
    torch.set_num_threads(threads)


def start_child(tiny, name, where, at, marker, ranks=1):
    cli = [f"{k}={v}" for k, v in {**tiny["args"], "name": name}.items()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PAUSE_RANK": str(ranks - 1), "OMP_NUM_THREADS": "1"}
    script = marker.with_name("child.py")
    script.write_text(CHILD)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    child = subprocess.Popen([sys.executable, *launcher, str(script), str(marker), where, str(at), *cli], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached its pause point:\n{child.communicate()[1][-3000:]}")
        time.sleep(0.02)
    return child


def assert_same_run(tiny, name):
    """The resumed run's weights, EMA, optimizer counters and loss curve equal the uninterrupted run's."""
    resumed, reference = load_checkpoint(tiny["runs"] / name / "weights" / "last.pt"), tiny["reference"]
    assert resumed["epoch"] == reference["epoch"] == 3
    assert resumed["loop"] == reference["loop"]
    for key in ("raw_model", "model"):
        for tensor_name, value in reference[key].items():
            assert torch.equal(value, resumed[key][tensor_name]), f"{key}.{tensor_name}"

    def losses(run):
        rows = csv.DictReader(open(tiny["runs"] / run / "results.csv"))
        return [{k: v for k, v in row.items() if "time" not in k} for row in rows]

    assert losses(name) == losses("straight")


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tiny, tmp_path):
    child = start_child(tiny, "killed", "batch", 5, tmp_path / "marker")  # epoch 2, after its batch 2 of 3
    child.kill()
    child.wait()
    assert child.returncode == -signal.SIGKILL
    last = tiny["runs"] / "killed" / "weights" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 1  # the end of epoch 1: nothing of epoch 2 was saved
    train({"resume": True, "project": str(tiny["runs"]), "name": "killed"}, progress=False)
    assert_same_run(tiny, "killed")


def test_sigkill_while_writing_last_pt_leaves_the_previous_one_whole(tiny, tmp_path):
    child = start_child(tiny, "torn", "save", 2, tmp_path / "marker")  # half of epoch 2's last.pt is written
    weights = tiny["runs"] / "torn" / "weights"
    temp_files = [p for p in weights.iterdir() if p.name.startswith(".last.pt.")]
    assert len(temp_files) == 1 and temp_files[0].stat().st_size > 0  # the half-written file exists, aside
    child.kill()
    child.wait()
    assert load_checkpoint(weights / "last.pt")["epoch"] == 1
    train({"resume": True, "project": str(tiny["runs"]), "name": "torn"}, progress=False)
    assert_same_run(tiny, "torn")


def test_sigint_mid_epoch_saves_last_pt_there_and_resumes_from_that_batch(tiny, tmp_path):
    marker = tmp_path / "marker"
    child = start_child(tiny, "ctrl_c", "batch", 5, marker)
    child.send_signal(signal.SIGINT)
    time.sleep(0.2)  # the handler runs in the child's paused main thread
    marker.unlink()
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr[-3000:]
    assert "SIGINT: saved" in stderr and "after 2 batches of epoch 2" in stderr
    assert "continue with resume=true" in stderr.splitlines()[-1]
    saved = load_checkpoint(tiny["runs"] / "ctrl_c" / "weights" / "last.pt")
    assert saved["epoch"] == 1 and saved["loop"]["epoch_batches"] == 2 and saved["loop"]["iteration"] == 5
    assert saved["grads"]  # batch 5 opened an accumulation window: its gradients were saved with it
    train({"resume": True, "project": str(tiny["runs"]), "name": "ctrl_c"}, progress=False)
    assert_same_run(tiny, "ctrl_c")


def test_under_ddp_a_signal_to_one_rank_stops_all_after_the_same_batch(tiny, tmp_path):
    # Two gloo ranks of 2 images each; rank 1 pauses after global batch 5 (inside an accumulation window,
    # so the saved gradients are the ranks' mean) and gets SIGINT. Rank 0 waits for it in the gradient
    # all-reduce of the next batch; both must then stop after batch 5 with no rank left hanging.
    marker = tmp_path / "marker"
    child = start_child(tiny, "ddp", "batch", 5, marker, ranks=2)
    os.kill(int(marker.read_text()), signal.SIGINT)
    time.sleep(0.2)
    marker.unlink()
    _, stderr = child.communicate(timeout=120)
    assert child.returncode != 0
    assert stderr.count(": saved ") == 1 and "after 2 batches of epoch 2" in stderr, stderr[-3000:]  # by rank 0
    saved = load_checkpoint(tiny["runs"] / "ddp" / "weights" / "last.pt")
    assert saved["epoch"] == 1 and saved["loop"]["epoch_batches"] == 2 and saved["loop"]["iteration"] == 5
    assert saved["grads"] and saved["plan"]["world_size"] == 2
    result = train({"resume": True, "project": str(tiny["runs"]), "name": "ddp"}, progress=False)
    assert result["epochs_run"] == 3
    assert load_checkpoint(tiny["runs"] / "ddp" / "weights" / "last.pt")["loop"]["iteration"] == 9


def test_sigint_during_an_epoch_end_save_stops_right_after_it(tiny, monkeypatch):
    save, handler = Trainer._save, signal.getsignal(signal.SIGINT)

    def save_then_signal(self, epoch, improved):
        save(self, epoch, improved)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "_save", save_then_signal)
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGINT in epoch 1"):
        train({**tiny["args"], "name": "at_end"}, progress=False)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back
    saved = load_checkpoint(tiny["runs"] / "at_end" / "weights" / "last.pt")
    assert saved["epoch"] == 1 and saved["loop"]["epoch_batches"] == 0 and saved["loop"]["iteration"] == 3
    train({"resume": True, "project": str(tiny["runs"]), "name": "at_end"}, progress=False)
    assert_same_run(tiny, "at_end")


def test_the_first_signal_asks_to_stop_and_a_second_stops_at_once():
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT: stopped at once"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # not reached: the handler raises first
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_repeated_non_finite_losses_stop_the_run_and_leave_last_pt_whole(tiny, monkeypatch):
    forward, calls = DetectionLoss.forward, []

    def nan_from_epoch_two(self, *args, **kwargs):
        calls.append(1)
        loss, items = forward(self, *args, **kwargs)
        return (loss * float("nan"), items) if len(calls) > 3 else (loss, items)

    monkeypatch.setattr(DetectionLoss, "forward", nan_from_epoch_two)
    with pytest.raises(DetectorError, match="5 non-finite losses in a row: training stopped"):
        train({**tiny["args"], "name": "nan"}, progress=False)
    monkeypatch.undo()
    run = tiny["runs"] / "nan"
    # Batches 4-6 (all of epoch 2) were skipped and epoch 2 was saved; the 5th bad batch in a row
    # (batch 2 of epoch 3) stopped the run before anything of epoch 3 was written.
    saved = load_checkpoint(run / "weights" / "last.pt")
    assert saved["epoch"] == 2 and saved["loop"]["bad_steps"] == 3 and not saved["grads"]
    assert all(torch.isfinite(v).all() for v in saved["raw_model"].values() if v.is_floating_point())
    assert len(list(csv.DictReader(open(run / "results.csv")))) == 2
    assert "non-finite loss at iteration 4" in (run / "train.log").read_text()
    result = train({"resume": True, "project": str(tiny["runs"]), "name": "nan"}, progress=False)
    assert result["epochs_run"] == 3


def test_an_existing_run_folder_is_never_reused_without_exist_ok(tmp_path):
    first = make_run_dir(str(tmp_path), "train", exist_ok=False)
    (first / "results.csv").write_text("epoch\n1\n")
    second = make_run_dir(str(tmp_path), "train", exist_ok=False)
    third = make_run_dir(str(tmp_path), "train", exist_ok=False)
    assert (first.name, second.name, third.name) == ("train", "train2", "train3")
    assert make_run_dir(str(tmp_path), "train", exist_ok=True) == first
    assert (first / "results.csv").read_text() == "epoch\n1\n" and not any(second.iterdir())
    (tmp_path / "train4").write_text("a file, not a folder")  # any existing path is skipped, not replaced
    assert make_run_dir(str(tmp_path), "train", exist_ok=False).name == "train5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "train2", "train3", "train4", "train5"]
