"""The command line: a user mistake is one 'error:' line on stderr, exit status 2, no traceback."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from tests.conftest import REPO


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd or REPO)


def run_detector(*args, cwd=None):
    """The `detector` console script of this checkout (train.py runs train only)."""
    command = "import sys; from detector.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", command, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or REPO)


@pytest.mark.parametrize(("args", "expected"), [
    (["epcohs=3"], "did you mean epochs"),
    (["batch=abc"], "batch='abc'"),
    (["batch=0"], "batch='0'"),
    (["batch=-2"], "batch='-2'"),
    (["imgsz=-1"], "imgsz='-1'"),
    (["epochs"], "not key=value"),
    (["device=7"], "device=7"),
    (["seed=-1"], "seed='-1': expected an integer from 0"),
    (["data="], "data='': expected a data card"),
    (["epochs=3", "imgsz=64", "epochs=30"], "epochs= is given 2 times ('3', '30'): give it once"),
])
def test_bad_arguments_give_one_clear_line(args, expected, tmp_path):
    result = run_cli(*args, f"project={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written for a rejected command


def test_a_bare_ctrl_c_says_nothing_was_saved(monkeypatch, capsys):
    from detector import cli

    def interrupted(command, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["predict", "model=best.pt"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"  # no last.pt to resume from is claimed


def test_help_lists_every_setting():
    result = run_cli("help")
    assert result.returncode == 0
    for key in ("epochs", "batch", "imgsz", "close_mosaic", "nbs", "patience"):
        assert f"  {key} " in result.stdout


def _broken_dataset(root, problem):
    """A 2-image COCO dataset in root with one problem; returns the data= argument that names it."""
    images = root / "images"
    images.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(images / name), np.full((64, 64, 3), 90, np.uint8))
    bbox = [10, 10, -5, 20] if problem == "negative width" else [10, 10, 20, 20]
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10]},
                            {"image_id": 2, "category_id": 1, "bbox": bbox}],
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "instances.json").write_text(json.dumps(data))
    if problem == "missing image":
        (images / "b.jpg").unlink()
    if problem == "truncated jpeg":
        noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(images / "b.jpg"), noisy)
        (images / "b.jpg").write_bytes((images / "b.jpg").read_bytes()[:600])
    card = {"path": str(root), "train": "images", "train_json": "instances.json", "val": "images",
            "val_json": "instances.json"}
    if problem == "no train entry":
        card.pop("train")
    (root / "card.yaml").write_text(yaml.safe_dump(card))
    return f"data={root / 'card.yaml'}"


@pytest.mark.parametrize(("problem", "expected"), [
    ("no train entry", "train"),
    ("negative width", "negative"),
    ("missing image", "b.jpg"),
    ("truncated jpeg", "b.jpg"),
])
def test_broken_data_gives_one_clear_line_and_leaves_no_run_folder(problem, expected, tmp_path):
    data_arg = _broken_dataset(tmp_path / "data", problem)
    runs = tmp_path / "runs"
    result = run_cli(data_arg, f"project={runs}", "imgsz=64", "workers=0", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-1500:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.stdout
    assert not runs.exists()  # nothing written for a rejected run


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-1500:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-1500:]
    return errors[0]


def test_output_paths_of_the_wrong_kind_give_one_line_naming_them(tmp_path):
    data_arg = _broken_dataset(tmp_path / "data", "none")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    line = _one_error_line(run_cli(data_arg, f"project={notes}", "imgsz=64", "workers=0", cwd=tmp_path))
    assert line.startswith(f"error: project={notes} is a file, not a folder: ")

    (tmp_path / "names.yaml").write_text("names: [thing]")
    folder = tmp_path / "out.json"
    folder.mkdir()
    line = _one_error_line(run_detector("convert", f"images={tmp_path / 'data' / 'images'}", f"labels={tmp_path}",
                                   f"out={folder}", f"names={tmp_path / 'names.yaml'}"))
    assert line == f"error: cannot write {folder}: it is a folder; give a file path"
    assert not any(folder.iterdir())


def test_inference_and_convert_arguments_must_be_known_key_value_pairs(coco8_checkpoint):
    line = _one_error_line(run_detector("predict", f"model={coco8_checkpoint}", "source"))
    assert line == "error: argument 'source' is not key=value; run 'detector help' for the predict arguments"
    line = _one_error_line(run_detector("predict", f"model={coco8_checkpoint}", "source=x.jpg", "classes=persn"))
    assert line.startswith("error: invalid value classes='persn': 'persn' is not one of the 80 classes (0 ")
    line = _one_error_line(run_detector("val", f"model={coco8_checkpoint}", f"model={coco8_checkpoint}.bak"))
    assert line == f"error: model= is given 2 times ('{coco8_checkpoint}', '{coco8_checkpoint}.bak'): give it once"
    line = _one_error_line(run_detector("export", f"model={coco8_checkpoint}", "format=onnx"))
    assert line == "error: unknown export argument 'format=onnx': expected key=value with key in file, imgsz, layout"
    line = _one_error_line(run_detector("convert", "images=x", "output=y.json"))
    assert line == ("error: unknown convert argument 'output=y.json': expected key=value with key in images, "
                    "labels, names, out")


def test_version_from_the_console_script_and_python_m(tmp_path):
    """`detector --version` and `python -m detector --version` name the installed distribution's version."""
    from importlib.metadata import version

    expected = f"detector {version('detector')}"
    assert run_detector("--version").stdout.strip() == expected
    module = subprocess.run([sys.executable, "-m", "detector", "--version"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert module.stdout.strip() == expected, module.stderr[-300:]
