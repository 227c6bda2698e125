"""Ultralytics detection checkpoints (yolov8*.pt, yolo11*.pt) -> this package's checkpoint dict, running none of
their code.

Such a file pickles Ultralytics' own nn.Module classes. `read_peer_checkpoint` rebuilds it with a restricted
unpickler: those classes (and torch.nn's) become inert PeerObjects that only keep the state the pickle hands them,
tensors are rebuilt by torch's own functions, and any other global is refused. `load_peer_checkpoint` then reads
the architecture from the model's `yaml` dict, builds this package's detector of that family and scale, and pairs
the two sets of tensors in module order, checking every shape, so the mapping follows the structure and not the
class paths (which differ between Ultralytics versions). What comes back is shaped like a checkpoint this package
writes (model_args, model, names, category_ids, config), so training, val, predict and export take it as theirs.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detector.data.convert import category_ids_for
from detector.errors import DetectorError
from detector.model.blocks import C2f
from detector.model.network import Detector
from detector.model.yolo11 import C2PSA

logger = logging.getLogger(__name__)

# The only callables a checkpoint may name: torch's tensor rebuilders and a few containers. (Storages such as
# torch.HalfStorage are resolved by torch.load itself before this table is asked.)
ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
# Classes that become inert PeerObjects: Ultralytics' own, torch.nn's layers, and numpy's scalars (metrics of
# older Ultralytics versions).
PLACEHOLDER_MODULES = ("ultralytics.", "torch.nn.modules.")
PLACEHOLDER_GLOBALS = {("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

# Layer types of each family's graph, from its published structure (backbone, then neck, then the Detect head).
_V8_NECK = ["nn.Upsample", "Concat", "C2f", "nn.Upsample", "Concat", "C2f", "Conv", "Concat", "C2f", "Conv",
            "Concat", "C2f"]
_YOLO11_NECK = [name.replace("C2f", "C3k2") for name in _V8_NECK]
FAMILY_LAYERS = {
    "yolov8": ["Conv", "Conv", "C2f", "Conv", "C2f", "Conv", "C2f", "Conv", "C2f", "SPPF", *_V8_NECK, "Detect"],
    "yolo11": ["Conv", "Conv", "C3k2", "Conv", "C3k2", "Conv", "C3k2", "Conv", "C3k2", "SPPF", "C2PSA",
               *_YOLO11_NECK, "Detect"],
}
OTHER_TASKS = {"Segment": "segmentation", "Pose": "pose", "OBB": "oriented-box", "Classify": "classification",
               "v10Detect": "YOLOv10 (end-to-end)", "WorldDetect": "YOLO-World", "RTDETRDecoder": "RT-DETR"}
# Our blocks whose children Ultralytics registers in another order (its cv1, cv2, m): the pairing follows its order.
PEER_CHILD_ORDER = {C2f: ("project", "fuse", "blocks"), C2PSA: ("project", "fuse", "blocks")}


class PeerObject:
    """An inert stand-in for an object of a class the unpickler does not import: it keeps its constructor arguments
    and the state the pickle gives it (for an nn.Module, its __dict__: _parameters, _buffers, _modules...)."""

    peer_class = ""
    args: tuple = ()
    state: Any = None  # stays None for an object the pickle creates (NEWOBJ) but never fills (BUILD)

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


# torch's storage classes as a checkpoint names them, and the dtype of their elements.
STORAGE_DTYPES = {f"{name}Storage": dtype for name, dtype in (
    ("Half", torch.float16), ("Float", torch.float32), ("Double", torch.float64), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool))}


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that imports nothing (see ALLOWED_GLOBALS and PLACEHOLDER_MODULES) and reads tensor storages
    from the checkpoint's zip archive itself: torch.load is never asked to unpickle anything but plain data."""

    def __init__(self, file: Any, archive: zipfile.ZipFile | None = None, prefix: str = ""):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.placeholders: dict[str, type[PeerObject]] = {}

    def persistent_load(self, pid: Any) -> torch.storage.TypedStorage:
        if self.archive is None or not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                                        and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"it holds a persistent id {str(pid)[:60]} that is not a tensor storage")
        _, dtype, key, _location, _numel = pid
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol 2 pickles name Python 2's module
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module.startswith(PLACEHOLDER_MODULES) or (module, name) in PLACEHOLDER_GLOBALS:
            path = f"{module}.{name}"
            if path not in self.placeholders:
                self.placeholders[path] = type(name, (PeerObject,), {"peer_class": path})
            return self.placeholders[path]
        raise pickle.UnpicklingError(f"it names {module}.{name}, which no detection checkpoint holds")


def _unpickle(path: str | Path) -> Any:
    """The pickle of torch's zip checkpoint format (<prefix>/data.pkl, storages in <prefix>/data/<key>)."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise pickle.UnpicklingError("it is not in torch's zip checkpoint format")
        prefix = pickles[0].removesuffix("data.pkl")
        if archive.namelist().count(f"{prefix}byteorder") and archive.read(f"{prefix}byteorder") != b"little":
            raise pickle.UnpicklingError("its tensors are big-endian")
        return RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix).load()


def read_peer_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's top-level dict, its model as nested PeerObjects holding real tensors; nothing is run.

    Raises:
        DetectorError: the pickle names a global outside the allowed set, or the file is unreadable.
    """
    try:
        state = _unpickle(path)
    except pickle.UnpicklingError as err:
        raise DetectorError(f"checkpoint {path} was refused: {err}; nothing from it was run") from err
    except Exception as err:  # torch raises RuntimeError, EOFError, TypeError... for a broken or crafted file
        raise DetectorError(f"checkpoint {path} is not a readable Ultralytics checkpoint ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(state, dict):
        raise DetectorError(f"checkpoint {path} is not an Ultralytics checkpoint (it holds {type(state).__name__})")
    return state


def module_tensors(module: PeerObject, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """A PeerObject nn.Module's state_dict entries, in nn.Module.state_dict's order (own tensors, then children)."""
    state = module.state if isinstance(module, PeerObject) else None
    if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise DetectorError(f"{prefix or 'the model'} is not a pickled nn.Module")
    parameters, buffers = state.get("_parameters") or {}, state.get("_buffers") or {}
    if not isinstance(parameters, dict) or not isinstance(buffers, dict):
        raise DetectorError(f"{prefix or 'the model'} has no _parameters and _buffers dicts")
    skipped = state.get("_non_persistent_buffers_set") or set()
    own = [*parameters.items(), *((k, v) for k, v in buffers.items() if k not in skipped)]
    for name, tensor in own:
        if tensor is not None:
            if not isinstance(tensor, torch.Tensor):
                raise DetectorError(f"{prefix}{name} is not a tensor")
            yield prefix + name, tensor
    for name, child in state["_modules"].items():
        if child is not None:
            yield from module_tensors(child, f"{prefix}{name}.")


def peer_architecture(model: PeerObject) -> dict[str, Any]:
    """model_args of this package's detector built like the checkpoint's model, from its `yaml` dict.

    Raises:
        DetectorError: another task's head, or a graph that is neither YOLOv8's nor YOLO11's.
    """
    spec = model.state.get("yaml") if isinstance(model.state, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("backbone"), list):
        raise DetectorError("its model holds no architecture (the `yaml` dict of backbone and head layers)")
    try:
        layers = [str(layer[2]) for layer in spec["backbone"] + spec.get("head", [])]
    except (TypeError, IndexError, KeyError) as err:
        raise DetectorError("its architecture (`yaml`) does not list layers as [from, repeats, type, args]") from err
    if layers and layers[-1] in OTHER_TASKS:
        raise DetectorError(f"it is a {OTHER_TASKS[layers[-1]]} model (head {layers[-1]}): only detection models "
                            "(head Detect) map onto this package's detector")
    family = next((name for name, graph in FAMILY_LAYERS.items() if graph == layers), None)
    if family is None:
        raise DetectorError(f"its architecture ({spec.get('yaml_file', 'a custom graph')}: "
                            f"{', '.join(layers[:12])}, ...) is neither YOLOv8's nor YOLO11's")
    scale = spec.get("scale") or _scale_from_file(str(spec.get("yaml_file", "")))
    try:
        depth, width, max_channels = spec["scales"][scale]
        multipliers = {"depth": float(depth), "width": float(width), "max_channels": int(max_channels)}
    except (KeyError, TypeError, ValueError) as err:
        raise DetectorError(f"its architecture names no multipliers for scale {scale!r}") from err
    return {**multipliers, "scale": scale, "family": family}


def _scale_from_file(yaml_file: str) -> str:
    found = re.search(r"yolo(?:v8|11)([nsmlx])", yaml_file)
    return found.group(1) if found else ""


def _peer_order(model: nn.Module) -> list[str]:
    """Our state_dict keys in the order Ultralytics registers the same tensors (PEER_CHILD_ORDER)."""
    def rank(key: str) -> list[int]:
        module, ranks = model, []
        for part in key.split(".")[:-1]:
            children = list(module._modules)
            first = next((names for block, names in PEER_CHILD_ORDER.items() if isinstance(module, block)), ())
            children = [*first, *(name for name in children if name not in first)]
            ranks.append(children.index(part))
            module = module._modules[part]
        return ranks

    return sorted(model.state_dict(), key=rank)  # stable: a module's own tensors keep their order, before children's


def map_state_dict(peer_tensors: list[tuple[str, torch.Tensor]], model_args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Ultralytics' state_dict entries (in its order) -> the state_dict of Detector(**model_args), float32.

    The pairing is by position in module order (PEER_CHILD_ORDER where the two orders differ), and every pair must
    have the same shape: a graph of other widths, depths or head outputs fails instead of loading shifted weights.

    Raises:
        DetectorError: a count or a shape that does not match, naming the first tensor that does not fit.
    """
    with torch.device("meta"):  # shapes only: a large scale costs no memory or initialisation time
        ours = Detector(**model_args)
    wanted, keys, reg_max = ours.state_dict(), _peer_order(ours), ours.reg_max
    if len(peer_tensors) == len(keys) + 1:  # the DFL's fixed projection onto bins 0..reg_max-1, which decode computes
        name, projection = peer_tensors[-1]
        bins = torch.arange(reg_max, dtype=torch.float32)
        if projection.shape != (1, reg_max, 1, 1) or not torch.equal(projection.float().flatten(), bins):
            raise DetectorError(f"its last tensor {name} is not the fixed projection onto bins 0..{reg_max - 1}")
        peer_tensors = peer_tensors[:-1]
    what = f"a {model_args.get('family', 'yolov8')} {model_args.get('scale')} detector of {ours.num_classes} classes"
    if len(peer_tensors) != len(keys):
        raise DetectorError(f"it holds {len(peer_tensors)} tensors where {what} has {len(keys)}")
    state = {}
    for key, (name, tensor) in zip(keys, peer_tensors, strict=True):
        if tensor.shape != wanted[key].shape:
            raise DetectorError(f"its {name} {tuple(tensor.shape)} does not fit {key} {tuple(wanted[key].shape)} of "
                                f"{what}")
        state[key] = tensor.detach().to(wanted[key].dtype)  # float16 in the file; BatchNorm counters stay int64
    return {key: state[key] for key in wanted}


def load_peer_checkpoint(path: str | Path) -> dict[str, Any]:
    """An Ultralytics detection checkpoint as this package's checkpoint dict: model_args, model (our state_dict
    names, float32), names, category_ids (COCO's when the names are COCO's 80, else 1..C), config (imgsz it trained
    at), and `peer` (what it came from). Its `ema` model when it has one (as Ultralytics loads it), else `model`.

    Raises:
        DetectorError: one line saying what was refused or what does not map.
    """
    path = Path(path)
    raw = read_peer_checkpoint(path)
    model = raw.get("ema") or raw.get("model")
    try:
        if not isinstance(model, PeerObject) or not isinstance(model.state, dict):
            raise DetectorError("it holds no pickled model under `ema` or `model`")
        architecture = peer_architecture(model)
        names = _class_names(model.state.get("names"))
        model_args = {**architecture, "num_classes": len(names), "reg_max": _reg_max(model)}
        state = map_state_dict(list(module_tensors(model)), model_args)
    except DetectorError as err:
        raise DetectorError(f"checkpoint {path} is an Ultralytics checkpoint this package cannot map: {err}") from err
    with torch.device("meta"):
        model_args = Detector(**model_args).model_args  # as this package writes them (family only when not yolov8)
    args = raw.get("train_args")
    args = args.state if isinstance(args, PeerObject) else args
    image_size = args.get("imgsz", 640) if isinstance(args, dict) else 640
    image_size = max(image_size) if isinstance(image_size, list | tuple) and image_size else image_size
    image_size = int(image_size) if isinstance(image_size, int | float) else 640
    logger.info("%s: Ultralytics %s %s%s detector, %d classes (%s): %d tensors mapped, float16 -> float32",
                path.name, raw.get("version", "?"), model_args.get("family", "yolov8"), model_args["scale"],
                len(names), ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""), len(state))
    return {"model_args": model_args, "model": state, "names": names, "category_ids": category_ids_for(names),
            "config": {"imgsz": image_size},
            "peer": {"file": str(path), "version": str(raw.get("version", "")),
                     "epoch": raw["epoch"] if isinstance(raw.get("epoch"), int) else None}}


def _class_names(names: Any) -> list[str]:
    """Ultralytics' {0: 'person', ...} (or a list) -> names in class order."""
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[index] for index in range(len(names))]
    if not isinstance(names, list | tuple) or not names:
        raise DetectorError("its model has no class names ({0: name, ...})")
    return [str(name) for name in names]


def _reg_max(model: PeerObject) -> int:
    """Bins per box side: the Detect head's reg_max (16 unless a custom head says otherwise)."""
    layers = (model.state.get("_modules") or {}).get("model")
    children = layers.state.get("_modules") if isinstance(layers, PeerObject) and isinstance(layers.state, dict) else {}
    head = list(children.values())[-1] if isinstance(children, dict) and children else None
    reg_max = head.state.get("reg_max", 16) if isinstance(head, PeerObject) and isinstance(head.state, dict) else 16
    return int(reg_max) if isinstance(reg_max, int) else 16
