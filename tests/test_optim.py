"""Optimizer groups, warm-up/decay schedule, accumulation ramp and EMA."""

import math

import torch
from torch import nn

from detector.train.optim import ModelEMA, Schedule, build_optimizer


def tiny_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_no_weight_decay_on_norm_weights_and_biases():
    model = tiny_model()
    optimizer = build_optimizer(model, name="SGD", lr=0.01, momentum=0.9, weight_decay=5e-4)
    groups = {g["kind"]: g for g in optimizer.param_groups}
    assert groups["weights"]["weight_decay"] == 5e-4 and len(groups["weights"]["params"]) == 2
    assert groups["norm"]["weight_decay"] == 0 and groups["norm"]["params"][0] is model[1].weight
    assert groups["bias"]["weight_decay"] == 0 and len(groups["bias"]["params"]) == 3
    assert optimizer.defaults["nesterov"] is True
    assert isinstance(build_optimizer(model, name="AdamW", lr=1e-3, momentum=0.9, weight_decay=0), torch.optim.AdamW)


def make_schedule(**kw):
    args = dict(lr0=0.01, lrf=0.01, epochs=10, iters_per_epoch=10, warmup_iters=20, warmup_bias_lr=0.1,
                warmup_momentum=0.8, momentum=0.937, accumulate=4)
    return Schedule(**{**args, **kw})


def test_warmup_ramps_lr_and_momentum_keeps_accumulation_then_decays_linearly():
    schedule = make_schedule()
    lrs, momentum, accumulate = schedule.at(0)
    assert lrs["weights"] == 0 and math.isclose(lrs["bias"], 0.1) and momentum == 0.8 and accumulate == 4
    lrs, momentum, accumulate = schedule.at(10)
    assert 0 < lrs["weights"] < 0.01 and 0.8 < momentum < 0.937 and accumulate == 4
    lrs, momentum, accumulate = schedule.at(20)
    assert accumulate == 4 and momentum == 0.937
    assert math.isclose(lrs["weights"], 0.01 * schedule.lr_factor(2))
    assert math.isclose(schedule.lr_factor(10), 0.01) and schedule.lr_factor(0) == 1


def test_cosine_decay_ends_at_lrf():
    schedule = make_schedule(cosine=True)
    assert math.isclose(schedule.lr_factor(10), 0.01)
    assert schedule.lr_factor(5) > make_schedule().lr_factor(5) - 1e-9


def test_apply_sets_every_group():
    model = tiny_model()
    optimizer = build_optimizer(model, name="SGD", lr=0.01, momentum=0.9, weight_decay=0)
    accumulate = make_schedule(warmup_iters=0).apply(optimizer, 0)
    assert accumulate == 4
    assert all(g["lr"] == 0.01 and g["momentum"] == 0.937 for g in optimizer.param_groups)


def test_ema_moves_toward_the_model_and_copies_integer_buffers():
    model = tiny_model()
    ema = ModelEMA(model, decay=0.5, tau=1e-9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 7
    before = ema.module[0].weight.clone()
    ema.update(model)
    assert torch.allclose(ema.module[0].weight, before + 0.5)
    assert int(ema.module[1].num_batches_tracked) == 7
