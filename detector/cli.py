"""Command line: `detector train|val|predict|convert|help key=value ...` (train.py is `detector train`).

A user mistake prints one line starting with 'error:' and exits with status 2, without a traceback.
"""

from __future__ import annotations

import logging
import sys

from detector.config import describe, parse_cli
from detector.errors import DetectorError
from detector.runs import setup_logging

USAGE = """usage: detector train [key=value ...]      train (python train.py is the same)
       detector val model=best.pt [data=... split=val|test|train save_json=FILE]   COCO mAP of a checkpoint
       detector val data=... predictions=FILE.json [split=val classes=0,2]   COCO mAP of any tool's COCO results
       detector predict model=best.pt source=PATH [conf=0.25 batch=8 max_wait_ms=50 save_dir=DIR save_txt=DIR
                                                    classes=0,2]
       detector export model=best.pt [imgsz=640 file=best.onnx layout=detector|yolov8]   ONNX (detector[export])
       detector benchmark batches=2,4,8,16,-1 [seeds=0,1 policies=nbs,sqrt budget=SECONDS key=value ...]
                                              what batch size does to speed, memory, mAP
       detector convert images=DIR labels=DIR out=FILE.json names=data.yaml   YOLO txt -> COCO JSON
       detector help                          every setting with its default
       detector --version                     the installed version"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and "=" not in argv[0] else "train"
    try:
        return _run(command, argv)
    except DetectorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # A training stopped by a signal saved last.pt and says so in its message; a bare Ctrl-C saved nothing.
        print(f"interrupted: {err}; last.pt holds it, continue with resume=true" if err.args else "interrupted",
              file=sys.stderr)
        return 130


def _run(command: str, argv: list[str]) -> int:
    _check_once(argv)
    if command in ("--version", "version"):
        from detector import __version__

        print(f"detector {__version__}")
        return 0
    if command in ("help", "-h", "--help"):
        print(USAGE + "\n\n" + describe())
        return 0
    if command == "convert":
        return _convert(argv)
    setup_logging()  # once, for the commands that train or run a model (help and convert print one line)
    if command == "train":
        from detector.train.trainer import train

        train(parse_cli(argv))
        return 0
    if command in ("val", "predict", "export"):
        return _inference(command, argv)
    if command == "benchmark":
        from detector.benchmark import run_cli

        run_cli(argv)
        return 0
    raise DetectorError(f"unknown command '{command}': use train, val, predict, export, benchmark, convert or help")


def _pairs(argv: list[str], allowed: set[str], command: str) -> dict[str, str]:
    _require_key_value(argv, command)
    pairs = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in allowed:
            raise DetectorError(f"unknown {command} argument '{arg}': expected key=value with key in "
                                f"{', '.join(sorted(allowed))}")
        pairs[key] = value
    return pairs


def _check_once(argv: list[str]) -> None:
    # Other YOLO trainers keep the last of a repeated key silently; a typo'd re-run should not train the wrong thing.
    values: dict[str, list[str]] = {}
    for key, sep, value in (arg.partition("=") for arg in argv):
        if sep:
            values.setdefault(key, []).append(value)
    for key, given in values.items():
        if len(given) > 1:
            raise DetectorError(f"{key}= is given {len(given)} times ({', '.join(map(repr, given))}): give it once")


def _require_key_value(argv: list[str], command: str) -> None:
    # As train's parse_cli does: a bare word would otherwise become a key with an empty value.
    for arg in argv:
        if "=" not in arg:
            raise DetectorError(f"argument '{arg}' is not key=value; run 'detector help' for the {command} arguments")


def _inference(command: str, argv: list[str]) -> int:
    from detector.api import Model

    _require_key_value(argv, command)
    args = {k: v for k, v in (a.partition("=")[::2] for a in argv)}
    scoring_a_file = command == "val" and "predictions" in args  # another tool's detections: no model runs
    if "model" not in args and not scoring_a_file:
        onnx = " or an exported .onnx" if command == "predict" else ""
        other = " (or predictions=<COCO results JSON> with data=)" if command == "val" else ""
        raise DetectorError(f"{command} needs model=<path to a .pt checkpoint{onnx}>{other}")
    model = Model(args.pop("model")) if "model" in args else Model()
    if command == "val":
        split, save_json = args.pop("split", "val"), args.pop("save_json", None)
        predictions = args.pop("predictions", None)  # like save_json, val's own argument, not a setting
        model.val(split, save_json=save_json, predictions=predictions,
                  **parse_cli([f"{k}={v}" for k, v in args.items()]))
        return 0
    if command == "export":
        options = _pairs([f"{k}={v}" for k, v in args.items()], {"imgsz", "file", "layout"}, command)
        print(f"wrote {model.export(**options)}")
        return 0
    options = _pairs([f"{k}={v}" for k, v in args.items()], {"source", "conf", "iou", "imgsz", "batch", "max_det",
                                                              "max_wait_ms", "save_dir", "save_txt", "device",
                                                              "classes"}, command)
    if "source" not in options:
        raise DetectorError("predict needs source=<image, video, folder or glob>")
    source = options.pop("source")
    if "max_wait_ms" in options:
        options["max_wait_ms"] = _milliseconds(options["max_wait_ms"])
    # imgsz, batch, conf, iou and max_det stay strings: Model.predict converts and checks them like settings.
    for result in model.predict(source, stream=True, **options):
        found = ", ".join(f"{label} {score:.2f}" for label, score in zip(result.labels, result.scores, strict=True))
        where = result.path + (f" frame {result.frame}" if result.frame is not None else "")
        logging.getLogger("detector").info("%s: %s", where, found or "nothing")
    return 0


def _milliseconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DetectorError(f"invalid value max_wait_ms={text!r}: expected milliseconds, e.g. 50") from None


def _convert(argv: list[str]) -> int:
    from pathlib import Path

    import yaml

    from detector.data.convert import yolo_to_coco

    args = _pairs(argv, {"images", "labels", "out", "names"}, "convert")
    missing = {"images", "labels", "out", "names"} - set(args)
    if missing:
        raise DetectorError(f"convert needs {', '.join(sorted(missing))}=... (see 'detector help')")
    names = yaml.safe_load(Path(args["names"]).read_text(encoding="utf-8"))
    names = names.get("names", names) if isinstance(names, dict) else names
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    out = yolo_to_coco(Path(args["images"]), Path(args["labels"]), Path(args["out"]), names)
    print(f"wrote {out}")
    return 0
