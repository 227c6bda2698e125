"""The detector network, its loss (task-aligned assignment, CIoU, DFL) and decoding (boxes, NMS)."""
