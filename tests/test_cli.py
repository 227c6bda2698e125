"""The command line: a user mistake is one 'error:' line on stderr, exit status 2, no traceback."""

import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd or REPO)


@pytest.mark.parametrize(("args", "expected"), [
    (["epcohs=3"], "did you mean epochs"),
    (["batch=abc"], "batch='abc'"),
    (["batch=0"], "batch='0'"),
    (["batch=-2"], "batch='-2'"),
    (["imgsz=-1"], "imgsz='-1'"),
    (["epochs"], "not key=value"),
    (["device=7"], "device=7"),
])
def test_bad_arguments_give_one_clear_line(args, expected, tmp_path):
    result = run_cli(*args, f"project={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
    assert not any(tmp_path.iterdir())  # nothing written for a rejected command


def test_help_lists_every_setting():
    result = run_cli("help")
    assert result.returncode == 0
    for key in ("epochs", "batch", "imgsz", "close_mosaic", "nbs", "patience"):
        assert f"  {key} " in result.stdout
