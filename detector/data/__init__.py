"""Datasets: data cards, COCO JSON + images, augmentation and batching."""
