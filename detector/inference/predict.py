"""Inference: a source -> batches of letterboxed frames -> forward -> NMS -> Results in original pixels, in order.

The forward is anything that maps a uint8 batch (B, 3, H, W) RGB to decoded boxes and scores: the PyTorch
detector (TorchForward) or an exported ONNX model (inference/export.py, S x S only), so both share every other step.
AutoBatch sizes the batch for inference from forward-only steps (inference_batch).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import cv2
import numpy as np
import torch
from torch import nn

from detector.autobatch.choose import Decision, choose_batch
from detector.autobatch.memory import MemoryProbe, probe_for
from detector.data.augment import letterbox, rect_shape
from detector.device import autocast, device_ops, prepare_images
from detector.inference.batching import iter_batches
from detector.inference.results import Result
from detector.inference.sources import Frame, open_source
from detector.model.postprocess import Detections, decode, letterbox_to_original, non_max_suppression

logger = logging.getLogger(__name__)

# uint8 (B, 3, H, W) RGB -> boxes_xyxy (B, A, 4) input pixels and class probabilities (B, A, C)
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

STREAM_MAX_BATCH = 1024  # AutoBatch's cap when a stream's length is unknown (a generator)
# Without max_wait_ms, frames wait for a full batch of their input shape while the frames held plus the results
# waiting for an older frame that keep their frame, and the results waiting, are at most this many batches.
HELD_BATCHES = 4


class TorchForward:
    """A PyTorch detector as predict calls it: no gradients, decoded outputs."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None):
        self.model, self.device, self.amp_dtype = model.to(device).eval(), device, amp_dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.amp_dtype):
            outputs = self.model(prepare_images(images, self.device, channels_last=False))
        return decode(outputs, self.model.strides, self.model.reg_max)


@dataclass
class _Letterboxed:
    frame: Frame
    image: np.ndarray  # uint8 (H, W, 3) RGB
    scale: float
    pad: tuple[float, float]


def _letterbox(frame: Frame, image_size: int, rect: bool) -> _Letterboxed:
    rgb = cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGB)
    # The rectangle of the file's own size, as validation picks it: a decode at 1/r rounds an odd side up, and its
    # rectangle may be a row of 32 larger (a 375 x 500 JPEG at 128: 96 x 128, its 188 x 250 decode 128 x 128).
    shape = rect_shape(*frame.original_size, image_size) if rect else image_size
    image, _, scale, pad = letterbox(rgb, np.zeros((0, 4), np.float32), shape)
    return _Letterboxed(frame, image, scale, pad)


def _to_result(item: _Letterboxed, found: Detections, names: list[str], category_ids: list[int]) -> Result:
    """Detections in letterboxed input pixels -> a Result in the frame's original pixels."""
    frame = item.frame
    height, width = frame.original_size
    xyxy = letterbox_to_original(found.boxes_xyxy, item.scale / frame.reduction, item.pad, (height, width)).numpy()
    # A file image is read again to draw on it; an array or a video frame is kept (it cannot be).
    keep_image = not frame.path or frame.frame is not None
    return Result(frame.path, frame.index, xyxy, found.scores.float().cpu().numpy(),
                  found.classes.cpu().numpy().astype(np.int64), list(names), list(category_ids), frame.frame,
                  frame.image if keep_image else None, (height, width), frame.incomplete)


class _InOrder:
    """Frames held by input shape until a batch of one shape runs; results handed on in source order.

    `window` bounds the waiting: the frames held plus the results waiting for an older frame that keep their
    frame (arrays, video frames), and the results waiting, are at most `window` (0: run whatever arrived).
    """

    def __init__(self, detect: Callable[[list[_Letterboxed]], list[Result]], batch: int, window: int):
        self.detect, self.batch, self.window = detect, batch, window
        self.held: dict[tuple[int, ...], list[_Letterboxed]] = {}  # frames of each input shape not run yet
        self.done: dict[int, Result] = {}
        self.next_index = 0

    def add(self, items: list[_Letterboxed]) -> None:
        """Hold the frames that arrived and run every full batch of one shape."""
        for item in items:
            self.held.setdefault(item.image.shape, []).append(item)
        for waiting in self.held.values():
            while len(waiting) >= self.batch:
                self._run(waiting[:self.batch])
                del waiting[:self.batch]

    def ready(self) -> Iterator[Result]:
        """The results due in order; runs the oldest frames' shape, full batch or not, while past the window."""
        while True:
            yield from self._in_order()
            framed = sum(result.image is not None for result in self.done.values())
            held = sum(map(len, self.held.values()))
            if not held or max(held + framed, len(self.done)) <= self.window:
                return
            self._run_oldest()

    def flush(self) -> Iterator[Result]:
        """Run every frame still held; the remaining results in order."""
        while any(self.held.values()):
            self._run_oldest()
        yield from self._in_order()

    def _in_order(self) -> Iterator[Result]:
        while self.next_index in self.done:
            yield self.done.pop(self.next_index)
            self.next_index += 1

    def _run(self, items: list[_Letterboxed]) -> None:
        for item, result in zip(items, self.detect(items), strict=True):
            self.done[item.frame.index] = result

    def _run_oldest(self) -> None:
        oldest = min((items for items in self.held.values() if items), key=lambda items: items[0].frame.index)
        self._run(oldest)
        oldest.clear()


def predict(forward: Forward, source, *, names: list[str], category_ids: list[int], image_size: int,
            batch: int = 8, max_wait_ms: float | None = None, conf: float = 0.25, iou: float = 0.7,
            max_det: int = 300, rect: bool = True, classes: list[int] | None = None) -> Iterator[Result]:
    """Detect objects in every frame of `source`, `batch` frames per forward pass; results in source order.

    Frames are read and letterboxed in a background thread and grouped as they arrive (batching.iter_batches);
    with `max_wait_ms` a batch goes to the model at most that long after its first frame arrived, full or not.

    Args:
        forward: uint8 (B, 3, H, W) RGB -> boxes_xyxy (B, A, 4) in input pixels, scores (B, A, C).
        source: a path, glob, folder, video, array, or a list or iterable of them (inference/sources.py).
        names, category_ids: class names and COCO category ids of the class indices.
        image_size: longest side S of the letterboxed input (a multiple of 32).
        batch: most frames per forward pass.
        max_wait_ms: longest wait of a batch's first frame for the rest (None: until the batch is full).
        conf, iou, max_det, classes: NMS settings (model/postprocess.py).
        rect: letterbox each frame to the smallest multiples of 32 around it; every forward takes frames of one
            shape. Without max_wait_ms a frame waits, among up to HELD_BATCHES batches of frames, for a full
            batch of its shape; with it, a group that arrived runs at once, one forward per shape. False: S x S
            squares, all an ONNX model takes.

    Yields:
        One Result per frame, in source order.
    """

    def detect(items: list[_Letterboxed]) -> list[Result]:
        # Frames of one shape only: no frame is padded past its own rectangle, so what is found in a frame does not
        # depend on the frames batched with it.
        boxes, scores = forward(torch.from_numpy(np.stack([item.image for item in items]).transpose(0, 3, 1, 2)))
        detections = non_max_suppression(boxes, scores, conf=conf, iou=iou, max_det=max_det, classes=classes)
        return [_to_result(item, found, names, category_ids) for item, found in zip(items, detections, strict=True)]

    queue = _InOrder(detect, batch, window=0 if max_wait_ms is not None else HELD_BATCHES * batch)
    prepare = partial(_letterbox, image_size=image_size, rect=rect)
    error = None
    try:
        for group in iter_batches(open_source(source, image_size), batch, max_wait_ms, transform=prepare):
            queue.add(group)
            yield from queue.ready()
    except Exception as err:  # a frame that cannot be read: the frames before it still get their results
        error = err
    yield from queue.flush()
    if error is not None:
        raise error


def make_inference_step(model: nn.Module, *, image_size: int, device: torch.device | str,
                        amp_dtype: torch.dtype | None = None, channels_last: bool = False, iou: float = 0.7,
                        max_det: int = 300, seed: int = 0, conf: float = 0.0) -> Callable[[int], None]:
    """A function that runs one validation step at batch b on a copy of the model: forward without
    gradients, decoding and NMS.

    NMS runs at `conf`, by default 0, its worst case: every (anchor, class) pair is a candidate, up to
    the cap. (Timing inference on CPU, pass the run's conf: at conf 0 the time is NMS sorting candidates
    that no real image at conf 0.25 gives.)
    """
    device = torch.device(device)
    ops = device_ops(device)
    net = copy.deepcopy(model).to(device).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def step(batch: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
        with autocast(device, amp_dtype):
            outputs = net(prepare_images(images, device, channels_last))
        boxes, scores = decode(outputs, net.strides, net.reg_max)
        non_max_suppression(boxes, scores, conf=conf, iou=iou, max_det=max_det)
        ops.synchronize()

    return step



def inference_batch(model: nn.Module, *, image_size: int, device: torch.device, fraction: float, max_batch: int,
                    conf: float = 0.25, amp_dtype: torch.dtype | None = None, probe: MemoryProbe | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> Decision:
    """AutoBatch for inference: the batch that fills `fraction` of the device with forward-only steps.

    The measured step is make_inference_step (a copy of the model, no gradients,
    decoding and NMS), so the batch is far larger than training's at the same memory. Where memory decides
    (GPUs) NMS runs at its worst case, conf 0; on CPU, where images/s takes part as in training, it runs at
    the run's `conf`, since the worst case's 30,000 candidates would cost more than the forward and make
    the choice a measure of NMS.

    Args:
        model: the model inference will run (fused or not, as it will run).
        image_size: side of the letterboxed input.
        device: where inference runs.
        fraction: share of the device's memory to fill, in (0, 1).
        max_batch: the most frames a batch can hold (the source's length, when known).
        conf: the NMS score threshold inference will use.
        amp_dtype: autocast dtype of inference, None for full precision.
        probe: memory reader (default: the device's; tests inject one).
        clock: seconds counter (tests inject one).

    Raises:
        AutoBatchError: not even one image fits.
    """
    by_throughput = device_ops(device).kind == "cpu"
    step = make_inference_step(model, image_size=image_size, device=device, amp_dtype=amp_dtype,
                               conf=conf if by_throughput else 0.0)
    probe = probe or probe_for(device)
    try:
        # Up to 2**10 sampled: forward-only steps are small, so the useful range reaches far past training's.
        return choose_batch(step, probe, fraction=fraction, max_batch=max_batch, max_samples=11,
                            measure_throughput=by_throughput, image_size=image_size, clock=clock, label="inference")
    finally:
        del step  # the probe's model copy
        probe.cleanup()
