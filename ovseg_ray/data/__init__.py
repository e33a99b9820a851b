"""Datasets: synthetic COCO-format scenes, image decoding, benchmark class lists and readers."""
