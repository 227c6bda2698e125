"""The CPU tensor tracker on known allocations, and AutoBatch's fit against the real detector on CPU."""

import pytest
import torch
from torch import nn

from detector.autobatch.choose import measure
from detector.autobatch.memory import CpuTensorMemory, probe_for
from detector.autobatch.records import fit_memory

MIB = 2**20


def test_tracker_counts_a_known_allocation_and_its_release():
    probe = CpuTensorMemory()
    probe.reset()
    before = probe.current
    with probe.watch():
        block = torch.empty(MIB, dtype=torch.uint8)  # 1 MiB
        view = block.view(1024, 1024)  # a view shares the storage: no new bytes
        view.fill_(1)
        assert probe.current - before == MIB
        del block, view
        assert probe.current == before
    assert probe.peak() - before == MIB


def test_tensors_made_before_the_step_count_once_touched_and_stay_in_the_baseline():
    weight = torch.ones(MIB // 4)  # 1 MiB of float32, made outside the tracker (like parameters)
    probe = CpuTensorMemory()
    probe.reset()
    with probe.watch():
        weight.mul_(2)  # touching it registers it
    assert probe.current == MIB
    probe.reset()
    assert probe.peak() == MIB  # the next step starts from it
    assert probe.capacity() >= MIB
    del weight
    assert probe.current == 0


def test_tracker_measures_a_training_step_with_frozen_parameters():
    # A frozen layer (like the fixed DFL projection) is what makes torch's MemTracker raise.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    model[2].weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)

    def step(batch):
        loss = model(torch.rand(batch, 3, 32, 32)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    probe = CpuTensorMemory()
    measure(step, probe, 1)  # warm-up: momentum buffers appear
    samples = [measure(step, probe, b) for b in (1, 2, 4, 8)]
    fit = fit_memory(samples)
    # The input alone is b * 3 * 32 * 32 * 4 bytes; activations and their gradients add several times that.
    assert fit.per_image_bytes > 3 * 32 * 32 * 4 * 4
    assert fit.r2 > 0.999


def test_probe_for_picks_the_cpu_tracker_and_rejects_unknown_devices():
    assert isinstance(probe_for("cpu"), CpuTensorMemory)
    with pytest.raises(ValueError, match="cannot measure memory on meta"):
        probe_for("meta")


def test_fit_on_small_batches_predicts_the_real_detector_at_an_unseen_batch():
    from detector.model.loss import DetectionLoss
    from detector.model.network import build_model
    from detector.train.probe import make_probe_step

    torch.manual_seed(0)
    model = build_model("n", 80)
    criterion = DetectionLoss(num_classes=80, strides=model.strides, reg_max=model.reg_max)
    step = make_probe_step(model, criterion, image_size=128, max_boxes=30, num_classes=80, device="cpu")
    probe = CpuTensorMemory()
    measure(step, probe, 1)  # warm-up: optimizer state and EMA appear
    fit = fit_memory([measure(step, probe, b) for b in (1, 2, 4, 8)])
    unseen = measure(step, probe, 16)
    predicted = fit.predict(16)
    assert fit.per_image_bytes > 0 and fit.r2 > 0.99
    assert abs(predicted - unseen.peak_bytes) / unseen.peak_bytes < 0.05, (predicted / MIB, unseen.peak_bytes / MIB)
