"""Sources of frames (folders, videos, arrays, generators), files cut short or unreadable, and the grouping of
frames into batches as they arrive."""

import threading
import time

import cv2
import numpy as np
import pytest

from detector.data.images import truncation
from detector.errors import DataError
from detector.inference.batching import iter_batches
from detector.inference.sources import count_frames, open_source


def slow_stream(count, pause_after, pause_s):
    """Yields 0..count-1, pausing pause_s after each item in pause_after (a camera with hiccups)."""
    for item in range(count):
        yield item
        if item in pause_after:
            time.sleep(pause_s)


def test_a_batch_waits_at_most_max_wait_then_goes_partly_full():
    # Pauses of 0.6 s after items 2 and 5; a batch's first item waits at most 0.15 s for the rest.
    groups = list(iter_batches(slow_stream(10, {2, 5}, 0.6), batch=8, max_wait_ms=150))
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def test_without_max_wait_batches_are_full_until_the_end():
    groups = list(iter_batches(slow_stream(10, {2}, 0.2), batch=4))
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_items_that_arrived_while_the_consumer_was_busy_go_together():
    groups = []
    for group in iter_batches(range(9), batch=4, max_wait_ms=0):
        groups.append(group)
        time.sleep(0.2)  # a slow model: the reader fills the queue meanwhile
    assert [item for group in groups for item in group] == list(range(9))
    # max_wait_ms=0 never waits, yet whatever queued up during the 0.2 s of work fills the next batch: the
    # first group is whatever had arrived at once, then full groups.
    assert len(groups) == 3 and len(groups[1]) == 4


def test_a_reading_error_comes_after_the_items_before_it():
    def broken():
        yield from range(3)
        raise DataError("cannot read image x.jpg")

    seen = []
    with pytest.raises(DataError, match="x.jpg"):
        for group in iter_batches(broken(), batch=2):
            seen.extend(group)
    assert seen == [0, 1, 2]


def test_a_consumer_that_stops_early_leaves_no_reading_thread():
    def endless():
        item = 0
        while True:
            yield item
            item += 1

    batches = iter_batches(endless(), batch=4)
    assert next(batches) == [0, 1, 2, 3]
    batches.close()
    deadline = time.monotonic() + 2.0
    while any(t.name == "detector-source" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "detector-source" for t in threading.enumerate())


def _video(path, values, size=(48, 64)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size[1], size[0]))
    assert writer.isOpened()
    for value in values:
        writer.write(np.full((*size, 3), value, np.uint8))
    writer.release()


def test_folders_videos_and_arrays_give_frames_in_order(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "b.png"), np.full((20, 30, 3), 200, np.uint8))
    cv2.imwrite(str(folder / "a.png"), np.full((20, 30, 3), 100, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    _video(tmp_path / "clip.avi", [30, 90, 150])
    gray = np.full((10, 12), 7, np.uint8)  # grayscale arrays become 3 channels
    source = [folder, tmp_path / "clip.avi", gray]

    frames = list(open_source(source))
    assert [f.index for f in frames] == list(range(6))
    assert [(f.path.rsplit("/", 1)[-1], f.frame) for f in frames] == [
        ("a.png", None), ("b.png", None), ("clip.avi", 0), ("clip.avi", 1), ("clip.avi", 2), ("", None)]
    means = [float(f.image.mean()) for f in frames]
    assert means[:2] == [100.0, 200.0] and means[5] == 7.0
    assert [round(m / 10) * 10 for m in means[2:5]] == [30, 90, 150]  # MJPG is lossy, the order is not
    assert frames[5].image.shape == (10, 12, 3)
    assert count_frames(source) == 6 and count_frames(iter(source)) is None


@pytest.mark.parametrize(("source", "message"), [
    ("no/such/folder", "does not exist"),
    (np.zeros((4, 4, 3), np.float32), "must be uint8"),
    (3.5, "not understood"),
])
def test_bad_sources_are_named(source, message):
    with pytest.raises(DataError, match=message):
        list(open_source(source))


def test_an_empty_source_or_a_file_of_another_kind_says_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="^predict source is empty: give an image, a video, a folder or a glob"):
        open_source("")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(DataError, match=f"^predict source {notes} is not an image or video file: expected one of "
                                        r"\.avi, \.bmp, "):
        open_source(str(notes))
    with pytest.raises(DataError, match=f"^predict source {tmp_path} holds no images or videos"):
        open_source(tmp_path)


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images or videos"):
        open_source(tmp_path)  # at once, before any frame is asked for


def _photo(height=96, width=128):
    """A smooth picture with detail all over, so that a cut-short file decodes visibly wrong below the cut."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 2, cols * 2, (rows + cols) % 256], axis=2).astype(np.uint8)


def _write(path, image, keep=1.0, extra=b""):
    data = cv2.imencode(path.suffix, image)[1].tobytes()
    path.write_bytes(data[:int(len(data) * keep)] + extra)
    return path


def test_truncation_finds_jpegs_and_pngs_cut_short_and_only_them(tmp_path):
    photo = _photo()
    assert truncation(_write(tmp_path / "whole.jpg", photo)) is None
    assert truncation(_write(tmp_path / "whole.png", photo)) is None
    # Bytes after the end-of-image marker (some cameras append data there) are not a cut: PIL decodes it whole.
    assert truncation(_write(tmp_path / "appended.jpg", photo, extra=b"thumbnail data" * 8)) is None
    assert truncation(_write(tmp_path / "half.jpg", photo, keep=0.5)) == (
        "it is cut short: it ends before its end-of-image marker FF D9")
    assert truncation(_write(tmp_path / "half.png", photo, keep=0.5)) == (
        "it is cut short: it ends before its IEND chunk")
    assert truncation(_write(tmp_path / "half.webp", photo, keep=0.5)) is None  # not checked: OpenCV refuses it


def test_a_jpeg_cut_in_half_is_predicted_on_with_a_warning_naming_it(tmp_path, detector_log):
    photo = _photo()
    _write(tmp_path / "a.jpg", photo)
    half = _write(tmp_path / "b.jpg", photo, keep=0.5)
    _write(tmp_path / "c.jpg", photo)

    frames = list(open_source(tmp_path))
    assert [(f.path.rsplit("/", 1)[-1], f.index, f.incomplete) for f in frames] == [
        ("a.jpg", 0, False), ("b.jpg", 1, True), ("c.jpg", 2, False)]
    whole, cut = frames[0].image.astype(int), frames[1].image.astype(int)
    assert cut.shape == whole.shape
    assert np.abs(cut[:8] - whole[:8]).max() <= 2 and np.abs(cut[-8:] - whole[-8:]).mean() > 20  # lost below the cut
    assert detector_log() == (f"image {half} is incomplete, its detections cover the part that decoded: it is cut "
                              "short: it ends before its end-of-image marker FF D9")
    [frame] = open_source(half)  # named directly: the same, not an error
    assert frame.incomplete


def test_unreadable_files_in_a_folder_are_skipped_with_one_warning_each(tmp_path, detector_log):
    photo = _photo()
    _write(tmp_path / "a.png", photo)
    cut = _write(tmp_path / "b.png", photo, keep=0.5)  # OpenCV decodes no part of a PNG cut short
    (tmp_path / "c.jpg").write_bytes(b"not an image at all")
    _write(tmp_path / "d.png", photo)

    frames = list(open_source(tmp_path))
    assert [(f.path.rsplit("/", 1)[-1], f.index) for f in frames] == [("a.png", 0), ("d.png", 1)]
    assert detector_log().splitlines() == [
        f"cannot read image {cut}: it is cut short: it ends before its IEND chunk; skipped it, the other files go on",
        f"cannot read image {tmp_path / 'c.jpg'}: empty or not an image; skipped it, the other files go on"]
    assert [f.index for f in open_source(str(tmp_path / "*.png"))] == [0, 1]  # a glob skips them too


def test_an_unreadable_file_named_directly_is_an_error_naming_it(tmp_path):
    photo = _photo()
    good = _write(tmp_path / "a.png", photo)
    cut = _write(tmp_path / "b.png", photo, keep=0.5)
    with pytest.raises(DataError, match=f"^cannot read image {cut}: it is cut short: it ends before its IEND chunk$"):
        list(open_source(cut))
    seen = []
    with pytest.raises(DataError, match=f"^cannot read image {cut}:"):
        for frame in open_source([good, cut]):  # in a list, a named file too; the frames before it come first
            seen.append(frame.path)
    assert seen == [str(good)]
