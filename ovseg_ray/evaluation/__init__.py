"""Zero-shot evaluation (the paper's Table 1) and batch segmentation of folders or S3 prefixes.

Plain-Python logic: ``metrics`` (confusion matrices, mIoU), ``report`` (results.json, the Table-1
layout, charts), ``benchmark`` (per-image scoring, settings, seen/unseen splits), ``batch_segment``
(per-image outputs, resume and run records) and ``config`` (the shared actor-pool config). ``engine``
is the one Ray module: the Ray Data inference stage both use and the two drivers.
"""
