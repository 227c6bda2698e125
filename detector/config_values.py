"""One setting's value converted by the type its Config field declares ("bool", "int", "float", "str"), never
by eval(); a few settings (optimizer, cache, sync_bn, classes, resume) have forms of their own."""

from __future__ import annotations

import math
from typing import Any

from detector.errors import ConfigError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", ""}


def convert_value(key: str, value: Any, kind: str) -> Any:
    """`value` (command-line text or a Python object) of setting `key` as its field's declared `kind`.

    Raises:
        ConfigError: naming the key, the value and what the setting takes.
    """
    try:
        if key == "optimizer":
            return _optimizer_name(value)
        if key == "cache":
            return "auto" if str(value).strip().lower() == "auto" else str(_bool(value, extra_true={"ram"})).lower()
        if key == "sync_bn":
            return "auto" if str(value).strip().lower() == "auto" else str(_bool(value)).lower()
        if key == "classes":  # a list (Python, YAML) or "0,2" / "[0,2]" (command line) -> "0,2"
            items = value if isinstance(value, list | tuple) else [] if value is None else [value]
            return ",".join(str(item).strip(" []") for item in items)
        if key == "multi_scale" and str(value).strip().lower() in ("true", "false"):
            return 0.5 if str(value).strip().lower() == "true" else 0.0  # the peer's older boolean form: +/- 50%
        if key == "resume":
            return "" if value in (False, None) or str(value).lower() in _FALSE else str(value)
        if kind == "bool":
            return _bool(value)
        if kind == "int":
            return _int(value)
        if kind == "float":
            number = float(value) if not isinstance(value, bool) else _fail()
            if key == "batch" and number.is_integer():
                return int(number)  # a count of images (args.yaml says batch: 16, not 16.0); fractions stay float
            return number if math.isfinite(number) else _fail()
        return "" if value is None else str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid value {key}={value!r}: expected {_type_words(key, kind)}") from err


def _bool(value: Any, extra_true: set[str] = frozenset()) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in extra_true:
        return True
    if text in _FALSE:
        return False
    raise ValueError(value)


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(str(value).strip())


def _optimizer_name(value: Any) -> str:
    names = {"auto": "auto", "sgd": "SGD", "adamw": "AdamW"}
    return names.get(str(value).lower(), str(value))


def _fail() -> float:
    raise ValueError("not a finite number")


def _type_words(key: str, kind: str) -> str:
    if key == "cache":
        return "auto, true (ram) or false"
    if key == "sync_bn":
        return "true, false or auto"
    return {"bool": "true or false", "int": "an integer", "float": "a number"}.get(kind, "text")
