"""Optimizer, learning-rate / momentum / accumulation schedule, and the EMA of weights."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


def build_optimizer(model: nn.Module, *, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW with three groups: conv/linear weights (decayed), norm weights, biases.

    Weight decay on norm weights and biases only shrinks the scale of activations, so they get none.

    Args:
        model: the detector.
        name: "SGD" or "AdamW".
        lr: initial learning rate of every group.
        momentum: SGD momentum, or AdamW beta1.
        weight_decay: decay of the first group (already scaled for the effective batch).
    """
    decayed, norm_weights, biases = [], [], []
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if param_name == "bias":
                biases.append(param)
            elif isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
                norm_weights.append(param)
            else:
                decayed.append(param)
    groups = [
        {"params": decayed, "weight_decay": weight_decay, "kind": "weights"},
        {"params": norm_weights, "weight_decay": 0.0, "kind": "norm"},
        {"params": biases, "weight_decay": 0.0, "kind": "bias"},
    ]
    # fused: one kernel per tensor for the whole update, on CPU as on CUDA. At the default nbs the step runs
    # after every batch, so its cost counts on every batch (docs/performance.md).
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, fused=True)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=True)
    raise ValueError(f"unknown optimizer {name!r}")


@dataclass(frozen=True)
class Schedule:
    """Learning rate, momentum and gradient accumulation as functions of the iteration.

    Warm-up runs for `warmup_iters` iterations: weights' lr rises from 0 and biases' lr falls from
    `warmup_bias_lr` to the scheduled value, and momentum rises from `warmup_momentum`. After warm-up
    the lr decays per epoch, linearly or along a cosine, to lr0 * lrf. Accumulation is `accumulate` at
    every iteration, warm-up included, so every batch size up to the nominal one takes the same
    optimizer steps.
    """

    lr0: float
    lrf: float
    epochs: int
    iters_per_epoch: int
    warmup_iters: int
    warmup_bias_lr: float
    warmup_momentum: float
    momentum: float
    accumulate: int
    cosine: bool = False

    def lr_factor(self, epoch: float) -> float:
        """Decay factor at (fractional) epoch, 1 at the start and lrf at the end."""
        progress = min(epoch / max(self.epochs, 1), 1.0)
        if self.cosine:
            return self.lrf + (1 - self.lrf) * 0.5 * (1 + math.cos(math.pi * progress))
        return (1 - progress) * (1.0 - self.lrf) + self.lrf

    def at(self, iteration: int) -> tuple[dict[str, float], float, int]:
        """Per-group lr ({"weights", "norm", "bias"}), momentum and accumulation at a global iteration."""
        epoch = iteration // max(self.iters_per_epoch, 1)
        target = self.lr0 * self.lr_factor(epoch)
        if iteration >= self.warmup_iters:
            return {"weights": target, "norm": target, "bias": target}, self.momentum, self.accumulate
        t = iteration / self.warmup_iters
        lrs = {"weights": t * target, "norm": t * target, "bias": self.warmup_bias_lr * (1 - t) + t * target}
        momentum = self.warmup_momentum + t * (self.momentum - self.warmup_momentum)
        return lrs, momentum, self.accumulate

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> int:
        """Set lr and momentum of every group for this iteration; return the accumulation to use."""
        lrs, momentum, accumulate = self.at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lrs[group["kind"]]
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            else:
                group["momentum"] = momentum
        return accumulate


class ModelEMA:
    """Exponential moving average of a model's weights and buffers, used for validation and checkpoints.

    The decay ramps up as decay * (1 - exp(-updates / tau)) so the average follows the model closely
    early on, when the weights move fast and an average would mostly remember the random start.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        model_state = model.state_dict()
        averaged, current = [], []
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                averaged.append(value)
                current.append(model_state[name].detach())
            else:
                value.copy_(model_state[name])
        # The same arithmetic as value.mul_(d).add_(new, alpha=1 - d), in one call per step for all tensors.
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, current, alpha=1 - d)
