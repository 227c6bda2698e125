"""The Plan (every number derived from the batch) and what AutoBatch's decision depends on."""

import json

import pytest
import torch

from detector.config import make_config
from detector.errors import ConfigError
from detector.model.loss import DetectionLoss
from detector.model.network import Detector
from detector.train.build import worst_case_boxes
from detector.train.plan import autobatch_key, make_plan
from detector.train.probe import make_probe_step
from detector.train.trainer import Trainer
from tests.conftest import TINY_SCALE, make_tiny_setup

CPU = torch.device("cpu")


def test_the_plan_holds_the_global_and_per_rank_batch_and_the_batches_per_epoch():
    config = make_config({"nbs": 64})
    plan = make_plan(config, CPU, 2, image_size=320, train_size=100, batch=16, world_size=2)
    assert (plan.batch, plan.rank_batch, plan.world_size) == (16, 8, 2)
    assert plan.batches_per_epoch == 7 and plan.accumulate == 4  # ceil(100 / 16); round(64 / 16)
    assert plan.val_batch == 8  # a fixed batch validates at the per-rank batch
    with pytest.raises(ConfigError, match="must split evenly over 2 ranks: use batch=14 or 16"):
        make_plan(config, CPU, 2, image_size=320, train_size=100, batch=15, world_size=2)


def _key(config, **changes):
    model = Detector(num_classes=3, **TINY_SCALE)
    values = {"image_size": 320, "device_name": "cuda:test", "capacity": 2**31, "max_boxes": 10, "world_size": 1,
              "amp_dtype": torch.bfloat16, **changes}
    return autobatch_key(config, model, **values)


@pytest.mark.parametrize("change", [{"ema": False}, {"deterministic": False}, {"lr_policy": "sqrt"},
                                    {"multi_scale": 0.5}])
def test_a_saved_decision_is_not_reused_when_a_setting_that_moves_memory_changed(change):
    assert _key(make_config({})) != _key(make_config(change))


@pytest.mark.parametrize("change", [{"world_size": 2}, {"amp_dtype": torch.float16}, {"image_size": 352},
                                    {"max_boxes": 40}])
def test_a_saved_decision_is_not_reused_on_another_world_size_dtype_size_or_density(change):
    assert _key(make_config({})) != _key(make_config({}), **change)


def test_the_allocator_settings_are_part_of_the_key(monkeypatch):
    before = _key(make_config({}))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert _key(make_config({})) != before


def test_the_probe_loss_runs_no_collective_while_the_training_loss_needs_one():
    model = Detector(num_classes=3, **TINY_SCALE)

    def refuse(tensor):
        raise RuntimeError("collective called")

    with pytest.raises(ValueError, match="needs the all_reduce"):
        DetectionLoss(num_classes=3, strides=model.strides, reg_max=model.reg_max, world_size=2)
    loss = DetectionLoss(num_classes=3, strides=model.strides, reg_max=model.reg_max, world_size=2, all_reduce=refuse)
    outputs = model(torch.rand(2, 3, 64, 64))
    targets = torch.tensor([[0, 1, 4.0, 4.0, 30.0, 30.0], [1, 2, 10.0, 10.0, 50.0, 40.0]])
    with pytest.raises(RuntimeError, match="collective called"):
        loss(outputs, targets, 2)
    local = loss.rank_local()
    value, _ = local(outputs, targets, 2)
    assert torch.isfinite(value) and local.world_size == 1 and loss.world_size == 2


def test_autobatch_probes_the_densest_sample_a_mosaic_or_mixup_can_make(tmp_path):
    paths = make_tiny_setup(tmp_path, seed=2, num_train=8, num_val=2, image_size=64)
    settings = {**paths, "imgsz": 64, "batch": 4, "epochs": 1, "workers": 0, "project": str(tmp_path)}
    counts = sorted(len(t) for t in Trainer(settings, progress=False).train_data.targets)
    data = Trainer({**settings, "name": "m"}, progress=False).train_data
    with_mosaic, without = worst_case_boxes(data, 1.0, 0.0), worst_case_boxes(data, 0.0, 0.0)
    assert with_mosaic == sum(counts[-4:]) > without == counts[-1]
    # mixup blends two samples: two mosaics, the eight densest images; without mosaic the two densest.
    assert worst_case_boxes(data, 1.0, 0.5) == sum(counts[-8:]) > with_mosaic
    assert worst_case_boxes(data, 0.0, 0.5) == sum(counts[-2:])


def test_autobatch_measures_the_training_step_at_the_largest_side_multi_scale_draws(tmp_path, monkeypatch):
    from detector.train import plan as plan_module

    sides = []

    def recording_probe(*args, image_size, **kwargs):
        sides.append(image_size)
        return make_probe_step(*args, image_size=image_size, **kwargs)

    monkeypatch.setattr(plan_module, "make_probe_step", recording_probe)
    paths = make_tiny_setup(tmp_path, seed=2, num_train=8, num_val=2, image_size=64)
    trainer = Trainer({**paths, "imgsz": 64, "batch": -1, "epochs": 1, "workers": 0, "project": str(tmp_path),
                       "multi_scale": 0.5}, progress=False)
    assert sides == [96] and trainer.plan.max_image_size == 96 and trainer.plan.image_size == 64
    saved = json.loads((trainer.run_dir / "autobatch.json").read_text())
    assert saved["key"]["train_imgsz"] == 96 and saved["key"]["imgsz"] == 64


def test_the_validation_batch_is_capped_by_host_memory(monkeypatch):
    from types import SimpleNamespace

    from detector.train import plan as plan_module

    config = make_config({"workers": 2})
    roomy = make_plan(config, CPU, 2, image_size=640, train_size=100, batch=16, val_batch=4000)
    monkeypatch.setattr(plan_module.psutil, "virtual_memory", lambda: SimpleNamespace(available=2**30))
    tight = make_plan(config, CPU, 2, image_size=640, train_size=100, batch=16, val_batch=4000)
    # 10% of 1 GiB over (2 workers x 2 + 2) queued batches of 640 x 640 x 3 bytes: 14 images.
    assert tight.val_batch == int(0.1 * 2**30 / (6 * 3 * 640 * 640)) == 14
    assert roomy.val_batch > tight.val_batch


def test_a_validation_batch_that_runs_out_of_memory_goes_on_in_halves_with_the_same_detections():
    from detector.evaluate.validate import detect, detect_in_parts

    torch.manual_seed(0)
    model = Detector(num_classes=3, **TINY_SCALE).eval()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    settings = {"device": CPU, "conf": 0.0, "iou": 0.7, "max_det": 20}
    with torch.no_grad():
        expected = [detect(model, images[i:i + 1], **settings)[0] for i in range(5)]
        forward = model.forward

        def small_device(x):
            if len(x) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
            return forward(x)

        model.forward = small_device
        found = detect_in_parts(model, images, **settings)
    assert len(found) == 5
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a.boxes_xyxy, b.boxes_xyxy)
        torch.testing.assert_close(a.scores, b.scores)
