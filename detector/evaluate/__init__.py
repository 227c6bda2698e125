"""COCO mAP of detections and the plots of a run."""
