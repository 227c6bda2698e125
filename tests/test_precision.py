"""Which precision training runs in: bf16 autocast on CPUs that compute in bf16, float32 on the others."""

import pytest
import torch

from detector.config import make_config
from detector.device import amp_dtype_for
from detector.model.boxes import expected_distance
from detector.train.engine import train_step
from detector.train.plan import make_plan
from detector.train.trainer import Trainer
from tests.conftest import make_tiny_setup

CPU = torch.device("cpu")


@pytest.mark.parametrize(("capabilities", "amp", "expected"), [
    ({"avx512_bf16": True, "amx_bf16": False}, True, torch.bfloat16),
    ({"avx512_bf16": False, "amx_bf16": True}, True, torch.bfloat16),
    ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, True, None),  # no bf16 arithmetic: float32
    ({"avx512_bf16": True}, False, None),
    ({"architecture": "arm64", "bf16": True}, True, None),  # not measured there: float32
])
def test_cpu_autocasts_to_bf16_only_where_the_cpu_computes_in_it(monkeypatch, capabilities, amp, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    config = make_config({"amp": amp})
    assert amp_dtype_for(config.amp, CPU) == expected
    plan = make_plan(config, CPU, 2, image_size=320, train_size=64, batch=4)
    assert plan.amp_dtype == ("bfloat16" if expected else "none")


def test_a_torch_that_cannot_tell_the_cpu_trains_in_float32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert amp_dtype_for(make_config({}).amp, CPU) is None


def test_a_bf16_training_step_keeps_float32_weights_and_gradients(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True}, raising=False)
    paths = make_tiny_setup(tmp_path, seed=3, num_train=4, num_val=2, image_size=64)
    trainer = Trainer({**paths, "imgsz": 64, "batch": 4, "epochs": 1, "workers": 0, "project": str(tmp_path)},
                      progress=False)
    assert trainer.ctx.amp_dtype == torch.bfloat16
    model, outputs, grads = trainer.ctx.model, [], []
    model.register_forward_hook(lambda module, args, out: outputs.extend(o.dtype for o in out))
    weight = next(model.parameters())
    weight.register_hook(lambda grad: grads.append((grad.dtype, bool(grad.abs().sum() > 0))))
    batch = next(iter(trainer.loader(True)))
    train_step(trainer.ctx, batch.images, batch.targets)
    assert outputs and set(outputs) == {torch.bfloat16}  # the convolutions ran in bf16
    assert grads == [(torch.float32, True)] and weight.dtype == torch.float32


def test_the_expected_distance_of_the_loss_stays_float32_under_autocast():
    logits = torch.randn(2, 100, 4, 16, generator=torch.Generator().manual_seed(0)) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_float32, from_bf16 = expected_distance(logits), expected_distance(logits.bfloat16())
    # A bf16 matmul would round the distances to steps of up to 1/16 of a bin.
    assert from_float32.dtype == torch.float32 and torch.equal(from_float32, expected_distance(logits))
    assert torch.equal(from_bf16, expected_distance(logits.bfloat16().float()))
