"""Training settings: cfg/default.yaml + overrides -> one frozen, validated Config.

Layers are merged in order (defaults < data card < checkpoint args < user). Override strings from the
command line are converted by each field's declared type (never eval); every mistake raises ConfigError
with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from detector.assets import default_yaml
from detector.config_values import convert_value
from detector.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Config:
    """Every training setting; cfg/default.yaml documents each one and holds its default."""

    data: str
    model: str
    epochs: int
    time: float
    imgsz: int
    batch: float
    fraction: float
    single_cls: bool
    classes: str
    freeze: int
    device: str
    workers: int
    threads: int
    amp: bool
    channels_last: bool
    sync_bn: str
    cache: str
    skip_bad_images: bool
    seed: int
    deterministic: bool
    optimizer: str
    lr0: float
    lrf: float
    momentum: float
    weight_decay: float
    warmup_epochs: float
    warmup_momentum: float
    warmup_bias_lr: float
    cos_lr: bool
    nbs: int
    lr_policy: str
    grad_clip: float
    ema: bool
    box: float
    cls: float
    dfl: float
    hsv_h: float
    hsv_s: float
    hsv_v: float
    degrees: float
    translate: float
    scale: float
    shear: float
    fliplr: float
    flipud: float
    mosaic: float
    mixup: float
    close_mosaic: int
    multi_scale: float
    val: bool
    conf: float
    iou: float
    max_det: int
    patience: int
    project: str
    name: str
    exist_ok: bool
    save_period: int
    resume: str
    plots: bool
    tensorboard: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def auto_batch_fraction(self) -> float | None:
        """The memory fraction AutoBatch should fill, or None for a fixed batch."""
        if self.batch == -1:
            return 0.60
        return self.batch if 0 < self.batch < 1 else None


FIELDS = {field.name: field.type for field in dataclasses.fields(Config)}
LR_POLICIES = ("nbs", "linear", "sqrt", "none")

# Checks beyond the type: key -> (predicate, what is allowed).
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "time": (lambda v: 0 <= v <= 1000, "hours in [0, 1000] (0 = off)"),
    "imgsz": (lambda v: 32 <= v <= 8192, "an integer from 32 to 8192"),
    "batch": (lambda v: v == -1 or 0 < v < 1 or (v >= 1 and float(v).is_integer()),
              "-1 (AutoBatch at 60% memory), a fraction 0 < f < 1 (AutoBatch at that fraction) "
              "or a whole number >= 1"),
    "fraction": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "workers": (lambda v: -1 <= v <= 64,
                "an integer from 0 to 64, or -1 for the CPU cores the device leaves free (at most 8)"),
    "threads": (lambda v: v >= 0, "an integer >= 0 (0 = one per physical core)"),
    "optimizer": (lambda v: v in ("auto", "SGD", "AdamW"), "one of auto, SGD, AdamW"),
    "lr0": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "lrf": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "warmup_epochs": (lambda v: v >= 0, "a number >= 0"),
    "warmup_momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "warmup_bias_lr": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "nbs": (lambda v: v >= 1, "an integer >= 1"),
    "lr_policy": (lambda v: v in LR_POLICIES, "one of " + ", ".join(LR_POLICIES)),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "close_mosaic": (lambda v: v >= 0, "an integer >= 0 (0 = mosaic and mixup to the end)"),
    "multi_scale": (lambda v: 0 <= v < 1, "a number in [0, 1): batch sides from imgsz x [1 - f, 1 + f] (0 = off)"),
    "conf": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "iou": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "max_det": (lambda v: v >= 1, "an integer >= 1"),
    "patience": (lambda v: v >= 0, "an integer >= 0 (0 = never stop early)"),
    "save_period": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "freeze": (lambda v: v >= 0, "a number of blocks >= 0 (10 = the backbone)"),
    "degrees": (lambda v: 0 <= v <= 180, "a number of degrees in [0, 180]"),
    "shear": (lambda v: 0 <= v <= 90, "a number of degrees in [0, 90]"),
    "name": (lambda v: bool(v) and "/" not in v and v not in (".", ".."), "a folder name without '/'"),
    "project": (lambda v: bool(v.strip()), "a folder path (runs go in project/name)"),
    "data": (lambda v: bool(v.strip()), "a data card: a name in data/, a YAML path or a COCO JSON path"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1"),
}
for _key in ("box", "cls", "dfl"):
    _CHECKS[_key] = (lambda v: 0 <= v <= 100, "a number in [0, 100]")
for _key in ("hsv_h", "hsv_s", "hsv_v", "translate", "scale", "fliplr", "flipud", "mosaic", "mixup"):
    _CHECKS[_key] = (lambda v: 0 <= v <= 1, "a number in [0, 1]")


def load_defaults() -> dict[str, Any]:
    """Read cfg/default.yaml as a plain dict."""
    with open(default_yaml(), encoding="utf-8") as file:
        return yaml.safe_load(file)


# Keys of the best-known YOLO trainer that have no setting here, and what to do instead.
ULTRALYTICS_KEYS = {
    "task": "this package trains detectors only: leave task= out",
    "mode": "train.py trains; 'detector val|predict|export' do the rest",
    "pretrained": "start from weights with model=<a .pt this package wrote>",
}


def check_keys(overrides: Mapping[str, Any], source: str = "argument") -> None:
    """Raise ConfigError for the first key that is not a setting, with the closest valid names."""
    for key in overrides:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "run 'python train.py help' for the list"
            hint = ULTRALYTICS_KEYS.get(key, hint)
            raise ConfigError(f"unknown {source} '{key}': {hint}")


def make_config(*layers: Mapping[str, Any]) -> Config:
    """Merge the defaults with each layer in order, convert types, validate, freeze.

    Args:
        layers: dicts of settings, later ones win (data card, checkpoint args, user overrides).

    Raises:
        ConfigError: unknown key, wrong type, or value out of range.
    """
    merged = load_defaults()
    for layer in layers:
        check_keys(layer)
        merged.update(layer)
    values = {key: convert(key, merged[key]) for key in FIELDS}
    for key, (allowed, what) in _CHECKS.items():
        if not allowed(values[key]):
            raise ConfigError(f"invalid value {key}={merged[key]!r}: expected {what}")
    return Config(**values)


def check_values(layer: Mapping[str, Any], source: str = "argument") -> dict[str, Any]:
    """The keys of `layer` converted and checked on their own, before the layers are merged (so a mistake fails
    before a dataset is read); returns the converted values.

    Raises:
        ConfigError: unknown key, wrong type, or value out of range.
    """
    check_keys(layer, source)
    values = {key: convert(key, value) for key, value in layer.items()}
    for key, value in values.items():
        allowed, what = _CHECKS.get(key, (lambda v: True, ""))
        if not allowed(value):
            raise ConfigError(f"invalid value {key}={layer[key]!r}: expected {what}")
    return values


def convert(key: str, value: Any) -> Any:
    """Convert one value (a string from the CLI or a Python object) to the type of setting `key`."""
    return convert_value(key, value, FIELDS[key])


def parse_cli(args: list[str]) -> dict[str, str]:
    """Turn ['key=value', ...] into a dict of strings; values are converted later by make_config."""
    overrides: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument '{arg}' is not key=value (example: epochs=10); "
                              "run 'python train.py help' for the settings")
        check_keys({key: value})
        overrides[key] = value
    return overrides


def describe() -> str:
    """Every setting with its default and its comment, as cfg/default.yaml documents them."""
    lines = []
    pattern = re.compile(r"^(\w+):\s*(.*?)\s*#\s*(.*)$")
    for line in default_yaml().read_text(encoding="utf-8").splitlines():
        match = pattern.match(line)
        if match:
            key, default, comment = match.groups()
            lines.append(f"  {key:<16} {default:<14} {comment}")
    return "settings (key=value, default, meaning):\n" + "\n".join(lines)


def class_indices(classes, names: list[str]) -> list[int] | None:
    """`classes=` as class indices: None or "" (all), an index or name, a list of them, or comma-separated text
    ("0,2", "person,car"). An index out of range or an unknown name is a ConfigError naming the classes."""
    text = convert("classes", classes)  # the setting's own form: "0,2", "person,car" or "" for all
    if not text:
        return None
    indices = []
    for item in text.split(","):
        item = item.strip()
        index = int(item) if item.lstrip("-").isdigit() else names.index(item) if item in names else None
        if index is None or not 0 <= index < len(names):
            shown = ", ".join(f"{i} {n}" for i, n in enumerate(names[:5])) + (", ..." if len(names) > 5 else "")
            raise ConfigError(f"invalid value classes={classes!r}: {item!r} is not one of the {len(names)} classes "
                              f"({shown}); give indices 0-{len(names) - 1} or names")
        indices.append(index)
    return indices
