"""Pictures of a run: training curves, sample batches with boxes, label statistics, benchmark lines.

Every function writes one PNG atomically (temp file, fsync, then rename) and returns its path, so a
reader never sees half a picture. Matplotlib is imported inside the functions and drives its Agg
canvas directly, never pyplot: importing this module changes no global backend or state.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from detector.atomic import atomic_write_bytes
from detector.evaluate.draw import PALETTE, box_labels, draw_boxes, save_png, to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_MOSAIC_SIDE = 1920  # pixels; larger batches are shrunk so the PNG stays quick to open


def _new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (no pyplot, so no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure: Figure, out_path: Path) -> Path:
    """Writes the figure as a PNG at out_path atomically."""
    atomic_write_bytes(Path(out_path), lambda file: figure.savefig(file, format="png"))
    return Path(out_path)


def _read_columns(csv_path: Path) -> dict[str, np.ndarray]:
    """The numeric columns of a CSV as float arrays (blank or text cells become NaN)."""
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file, skipinitialspace=True))
    if not rows:
        return {}
    columns: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = []
        for row in rows:
            try:
                values.append(float(row[name]))
            except (TypeError, ValueError):
                values.append(math.nan)
        if not np.all(np.isnan(values)):  # a text column, e.g. a timestamp string
            columns[name.strip()] = np.array(values)
    return columns


def plot_results(csv_path: Path, out_path: Path) -> Path:
    """Plots every numeric column of a results.csv against its epoch column, one panel each.

    Args:
        csv_path: results.csv with a header row; an `epoch` column is used as x when present,
            else the row number.
        out_path: PNG to write.

    Returns:
        out_path.

    Raises:
        ValueError: The CSV has no rows or no numeric column besides epoch.
    """
    columns = _read_columns(Path(csv_path))
    if not columns:
        raise ValueError(f"{csv_path} has no numeric rows to plot")
    epochs = columns.pop("epoch", None)
    if not columns:
        raise ValueError(f"{csv_path} has no numeric column besides epoch")
    if epochs is None:
        epochs = np.arange(1, len(next(iter(columns.values()))) + 1, dtype=float)
    num_cols = min(5, len(columns))
    num_rows = math.ceil(len(columns) / num_cols)
    figure = _new_figure(3.0 * num_cols, 2.4 * num_rows)
    axes = figure.subplots(num_rows, num_cols, squeeze=False).ravel()
    for ax, (name, values) in zip(axes, columns.items(), strict=False):
        ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.5, color="tab:blue")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    figure.suptitle(Path(csv_path).name, fontsize=11)
    return _save_figure(figure, out_path)


def draw_detections(image_rgb: np.ndarray, boxes_xyxy: Any, classes: Any, names: Sequence[str],
                    scores: Any | None = None) -> np.ndarray:
    """A copy of an image with boxes and 'name score' labels, coloured by class as in plot_batch.

    Args:
        image_rgb: uint8 (H, W, 3) RGB.
        boxes_xyxy: float (K, 4) pixels of the image.
        classes: int (K,) class indices into names (a class past the end is shown as its number).
        names: class names.
        scores: optional (K,) confidences shown after the names.
    """
    boxes = to_numpy(boxes_xyxy).reshape(-1, 4).astype(np.float64)
    classes = to_numpy(classes).reshape(-1)
    rows = np.concatenate([np.zeros((len(boxes), 1)), classes[:, None].astype(np.float64), boxes], axis=1)
    labels = box_labels(classes, names, None if scores is None else to_numpy(scores).reshape(-1))
    image = np.ascontiguousarray(image_rgb).copy()
    draw_boxes(image, rows, labels, 1.0)
    return image


def plot_batch(images: Any, targets: Any, names: Sequence[str], out_path: Path, *, max_images: int = 16,
               scores: Any | None = None) -> Path:
    """Draws a batch as a mosaic of its images with their boxes and class names.

    Args:
        images: uint8 (B, 3, H, W) RGB, tensor or array.
        targets: float (N, 6) rows [batch_index, class, x1, y1, x2, y2] in input pixels.
        names: Class names indexed by class; a class past the end is shown as its number.
        out_path: PNG to write.
        max_images: Draw at most this many images of the batch.
        scores: Optional (N,) confidences shown after the class names (predictions).

    Returns:
        out_path.
    """
    images = to_numpy(images)
    targets = to_numpy(targets).reshape(-1, 6).astype(np.float64)
    score_values = None if scores is None else to_numpy(scores).reshape(-1)
    num_images = min(len(images), max_images)
    height, width = images.shape[2:]
    num_cols = math.ceil(math.sqrt(max(num_images, 1)))
    num_rows = math.ceil(max(num_images, 1) / num_cols)
    scale = min(1.0, MAX_MOSAIC_SIDE / (max(num_cols * width, num_rows * height)))
    tile_h, tile_w = round(height * scale), round(width * scale)
    mosaic = np.full((num_rows * tile_h, num_cols * tile_w, 3), 114, np.uint8)
    for index in range(num_images):
        tile = np.ascontiguousarray(images[index].transpose(1, 2, 0)).astype(np.uint8)
        tile = cv2.resize(tile, (tile_w, tile_h), interpolation=cv2.INTER_AREA) if scale < 1 else tile.copy()
        selected = targets[:, 0] == index
        tile_scores = None if score_values is None else score_values[selected]
        labels = box_labels(targets[selected, 1], names, tile_scores)
        draw_boxes(tile, targets[selected], labels, scale)
        cv2.rectangle(tile, (0, 0), (tile_w - 1, tile_h - 1), (255, 255, 255), 1)  # tile border
        top, left = divmod(index, num_cols)
        top, left = top * tile_h, left * tile_w
        mosaic[top:top + tile_h, left:left + tile_w] = tile
    return save_png(mosaic, out_path)


def plot_labels(classes: Any, boxes_xyxy: Any, image_size: int | tuple[int, int], names: Sequence[str],
                out_path: Path) -> Path:
    """Plots the label statistics of a dataset: instances per class, box sizes, box centres.

    Args:
        classes: int (N,) class indices.
        boxes_xyxy: float (N, 4) boxes in pixels of images of `image_size`.
        image_size: Side of the (square) images, or (height, width), in pixels.
        names: Class names indexed by class.
        out_path: PNG to write.

    Returns:
        out_path.
    """
    classes = to_numpy(classes).reshape(-1).astype(np.int64)
    boxes = to_numpy(boxes_xyxy).reshape(-1, 4).astype(np.float64)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    num_classes = max(len(names), int(classes.max()) + 1 if len(classes) else 0)
    counts = np.bincount(classes, minlength=num_classes)
    labels = [names[i] if i < len(names) else str(i) for i in range(num_classes)]
    colors = [np.array(PALETTE[i % len(PALETTE)]) / 255 for i in range(num_classes)]
    figure = _new_figure(15, 4.5)
    bars, sizes, centres = figure.subplots(1, 3)
    bars.bar(range(num_classes), counts, color=colors)
    bars.set_xticks(range(num_classes), labels, rotation=90 if num_classes > 8 else 0, fontsize=8)
    bars.set_ylabel("instances")
    bars.set_title(f"{len(classes)} boxes in {num_classes} classes")
    box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    point_colors = [colors[c] for c in classes] if len(classes) else None
    sizes.scatter(box_w, box_h, s=6, alpha=0.5, c=point_colors)
    sizes.set(xlim=(0, width), ylim=(0, height), xlabel="box width (px)", ylabel="box height (px)",
              title="box sizes")
    centres.scatter((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, s=6, alpha=0.5,
                    c=point_colors)
    centres.set(xlim=(0, width), ylim=(height, 0), xlabel="x (px)", ylabel="y (px)", title="box centres")
    for ax in (sizes, centres):
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    return _save_figure(figure, out_path)


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
                out_path: Path, title: str = "", log_x: bool = False, fitted: dict[str, tuple] | None = None) -> Path:
    """Plots named curves, each with its own x values, and optional fitted lines (dashed, no markers).

    Args:
        curves: Name -> (x values, y values) of equal length (NaN leaves a gap).
        xlabel, ylabel: Axis labels.
        out_path: PNG to write.
        title: Figure title.
        log_x: A base-2 logarithmic x axis (batch sizes that double).
        fitted: Name -> (x values, y values) drawn as dashed lines, e.g. a model fitted to the curves.

    Raises:
        ValueError: A curve's x and y differ in length.
    """
    figure = _new_figure(7, 4.5)
    ax = figure.subplots()
    for style, group in (("data", curves), ("fit", fitted or {})):
        for name, (xs, ys) in group.items():
            if len(xs) != len(ys):
                raise ValueError(f"series {name!r} has {len(ys)} values for {len(xs)} x values")
            if style == "data":
                ax.plot(xs, np.asarray(ys, dtype=float), marker="o", markersize=4, linewidth=1.5, label=name)
            else:
                ax.plot(xs, np.asarray(ys, dtype=float), linestyle="--", linewidth=1.2, color="grey", label=name)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if curves or fitted:
        ax.legend(fontsize=9)
    return _save_figure(figure, out_path)


def plot_pr_curves(pr50: dict[str, np.ndarray], out_path: Path, max_legend: int = 20) -> Path:
    """Precision against recall at IoU 0.5: a thin line per class and a thick mean over them.

    Args:
        pr50: Class name -> precision at the recall points 0, 0.01, ..., 1 (DetectionMetrics.pr50).
        out_path: PNG to write.
        max_legend: Name the classes in the legend when there are at most this many (their AP50 beside them).
    """
    figure = _new_figure(6, 6)
    ax = figure.subplots()
    recall = np.linspace(0, 1, 101)
    named = len(pr50) <= max_legend
    for name, precision in pr50.items():
        ax.plot(recall, precision, linewidth=1, alpha=0.7, label=f"{name} {precision.mean():.3f}" if named else None)
    if pr50:
        mean = np.mean(list(pr50.values()), axis=0)
        ax.plot(recall, mean, linewidth=3, color="blue", label=f"all classes {mean.mean():.3f} mAP50")
        ax.legend(fontsize=8, loc="lower left")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="precision-recall at IoU 0.5")
    ax.grid(alpha=0.3)
    return _save_figure(figure, out_path)


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], out_path: Path, *, title: str = "confusion matrix",
                          max_named: int = 31) -> Path:
    """The confusion matrix, true classes across and predicted classes down, background last on both axes.

    Each cell's colour is its share of its column (of the objects of that true class, or of the false
    detections in the background column); the numbers are the counts.

    Args:
        matrix: Counts [predicted, true], (K + 1, K + 1) (metrics.confusion_matrix).
        labels: The K class names, then background (DetectionMetrics.confusion_labels).
        out_path: PNG to write.
        max_named: Name the rows and columns and write the counts when there are at most this many.
    """
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion matrix of shape {matrix.shape} for {len(labels)} labels")
    shares = matrix / np.maximum(matrix.sum(axis=0, keepdims=True), 1)
    side = min(max(4 + 0.4 * len(labels), 6), 16)
    figure = _new_figure(side, side)
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if len(labels) <= max_named:
        ticks = np.arange(len(labels))
        ax.set_xticks(ticks, labels, rotation=90, fontsize=8)
        ax.set_yticks(ticks, labels, fontsize=8)
        for (row, column), count in np.ndenumerate(matrix):
            if count:
                ax.text(column, row, str(count), ha="center", va="center", fontsize=7,
                        color="white" if shares[row, column] > 0.5 else "black")
    ax.set(xlabel="true", ylabel="predicted", title=title)
    return _save_figure(figure, out_path)
