"""Plots: each function writes a real, readable PNG atomically; plot_batch really draws boxes."""

import csv
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detector.evaluate import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["circle", "rectangle", "triangle", "star"]


def _read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = cv2.imread(str(path))
    assert image is not None
    return image


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_no_global_matplotlib_state(tmp_path):
    # A fresh interpreter: importing does not load matplotlib, plotting never loads pyplot.
    code = (
        "import sys; from pathlib import Path; import detector.evaluate.plots as p\n"
        "assert 'matplotlib' not in sys.modules\n"
        f"p.plot_curves({{'a': ([1, 2], [1, 2])}}, 'x', 'y', Path({str(tmp_path / 'a.png')!r}))\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_results_draws_one_panel_per_column(tmp_path):
    columns = ["epoch", "time", "train/loss_box", "train/loss_cls", "train/loss_dfl", "metrics/precision",
               "metrics/recall", "metrics/mAP50", "metrics/mAP50-95", "val/loss_box", "lr/pg0"]
    csv_path = tmp_path / "results.csv"
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for epoch in range(1, 6):
            writer.writerow([epoch] + [1.0 / (epoch + i) for i in range(len(columns) - 1)])
    out = plots.plot_results(csv_path, tmp_path / "results.png")
    image = _read_png(out)
    # 10 panels in a 5-wide grid: wide and about two panels tall, not a blank canvas.
    assert image.shape[1] > 1000 and image.shape[0] > 350
    assert image.std() > 10
    assert _no_temp_files(tmp_path)


def test_plot_results_rejects_empty_csv(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("epoch,metrics/mAP50\n")
    with pytest.raises(ValueError, match="no numeric rows"):
        plots.plot_results(csv_path, tmp_path / "results.png")
    assert not (tmp_path / "results.png").exists()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.full((3, 3, 96, 128), 40, dtype=torch.uint8)  # a plain dark background
    targets = torch.tensor([[0, 0, 10, 20, 60, 70], [0, 3, 70, 30, 120, 90], [2, 1, 5, 5, 40, 40]],
                           dtype=torch.float32)
    return images, targets


def test_plot_batch_draws_boxes_on_the_edges(tmp_path):
    images, targets = _batch()
    out = plots.plot_batch(images, targets, NAMES, tmp_path / "batch.png")
    mosaic = _read_png(out)
    assert mosaic.shape == (2 * 96, 2 * 128, 3)  # 3 images in a 2x2 grid, no scaling
    background = np.array([40, 40, 40])
    # Left edge of the first box (image 0, tile (0, 0)) and of the third (image 2, tile (1, 0)).
    assert np.abs(mosaic[30:60, 10].astype(int) - background).sum(axis=1).min() > 60
    assert np.abs(mosaic[96 + 15:96 + 35, 5].astype(int) - background).sum(axis=1).min() > 60
    # Inside the boxes, away from edges and labels, the image is untouched.
    assert np.array_equal(mosaic[45:55, 30:40], np.full((10, 10, 3), 40))
    # Image 1 has no boxes: its tile only has the 1 px border drawn.
    assert np.array_equal(mosaic[5:90, 128 + 5:256 - 5], np.full((85, 118, 3), 40))
    # The empty fourth tile stays grey.
    assert np.array_equal(mosaic[96 + 5, 128 + 5], [114, 114, 114])


def test_plot_batch_with_scores_limit_and_numpy_input(tmp_path):
    images, targets = _batch()
    out = plots.plot_batch(images.numpy(), targets.numpy(), NAMES[:1], tmp_path / "pred.png", max_images=1,
                           scores=np.array([0.9, 0.5, 0.3]))
    mosaic = _read_png(out)
    assert mosaic.shape == (96, 128, 3)  # only the first image
    assert np.abs(mosaic[30:60, 10].astype(int) - 40).sum(axis=1).min() > 60


def test_plot_batch_shrinks_large_batches(tmp_path):
    images = torch.zeros((16, 3, 640, 640), dtype=torch.uint8)
    targets = torch.tensor([[i, i % 4, 100, 100, 300, 300] for i in range(16)], dtype=torch.float32)
    mosaic = _read_png(plots.plot_batch(images, targets, NAMES, tmp_path / "big.png"))
    assert max(mosaic.shape[:2]) <= plots.MAX_MOSAIC_SIDE
    # The box of image 0 is scaled with its tile: its left edge is at 100 * 1920 / 2560 = 75 px.
    assert mosaic[150, 75].sum() > 100 and mosaic[150, 60].sum() == 0


def test_plot_labels_and_lines_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 50, (50, 2))], axis=1)
    out = plots.plot_labels(rng.integers(0, 4, 50), boxes, 256, NAMES, tmp_path / "labels.png")
    image = _read_png(out)
    assert image.shape[1] > 1000 and image.std() > 10
    empty = plots.plot_labels(np.zeros(0, int), np.zeros((0, 4)), (128, 96), NAMES, tmp_path / "empty.png")
    assert _read_png(empty).shape == image.shape
    x = [1, 2, 4, 8]
    lines = plots.plot_curves({"images/s": (x, [3, 5, 8, 9]), "peak MiB": (x, [100, 180, 340, 660])},
                              "batch", "value", tmp_path / "sub" / "lines.png", title="sweep", log_x=True)
    assert _read_png(lines).shape[:2] == (450, 700)
    assert _no_temp_files(tmp_path) and _no_temp_files(tmp_path / "sub")


def test_plot_curves_rejects_mismatched_series(tmp_path):
    with pytest.raises(ValueError, match="'a' has 2 values for 3"):
        plots.plot_curves({"a": ([1, 2, 3], [1, 2])}, "x", "y", tmp_path / "bad.png")


def test_pr_curves_draw_the_mean_of_the_classes_as_the_thick_blue_line(tmp_path):
    def blue_line_height(pr50, name):
        image = _read_png(plots.plot_pr_curves(pr50, tmp_path / name))
        rows, _ = np.nonzero((image[:, :, 0] > 200) & (image[:, :, 1] < 60) & (image[:, :, 2] < 60))  # BGR blue
        return np.median(rows)

    flat = {"a": np.ones(101), "b": np.zeros(101)}  # mean precision 0.5 at every recall
    high = {"a": np.ones(101), "b": np.full(101, 0.8)}  # mean 0.9
    assert blue_line_height(high, "high.png") < blue_line_height(flat, "flat.png") - 100  # rows grow downwards
    many = {f"class {i}": np.linspace(1, 0, 101) for i in range(30)}  # too many classes to name: no legend rows
    assert _read_png(plots.plot_pr_curves(many, tmp_path / "many.png")).shape[:2] == (600, 600)
    assert _no_temp_files(tmp_path)


def test_confusion_matrix_puts_true_classes_across_and_predictions_down(tmp_path):
    def dark_cells_slope(matrix, name):
        image = _read_png(plots.plot_confusion_matrix(matrix, ["a", "b", "c"], tmp_path / name))
        left = image[:, : image.shape[1] * 3 // 4]  # the colour bar on the right is dark at its top too
        rows, columns = np.nonzero((left[:, :, 2] < 60) & (left[:, :, 0] > 80))  # BGR: Blues' darkest cells
        return np.corrcoef(columns, rows)[0, 1]

    diagonal = np.diag([50, 40, 0])  # every object found as its own class
    assert dark_cells_slope(diagonal, "diagonal.png") > 0.5  # rows grow downwards: top-left to bottom-right
    swapped = np.array([[0, 50, 0], [40, 0, 0], [0, 0, 0]])  # every a detected as b and every b as a
    assert dark_cells_slope(swapped, "swapped.png") < -0.5
    with pytest.raises(ValueError, match="shape"):
        plots.plot_confusion_matrix(diagonal, ["a", "b"], tmp_path / "bad.png")
    assert _no_temp_files(tmp_path)
