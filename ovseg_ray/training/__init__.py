"""Training (OVSeg sections 3.1, 3.3, 4.1): the masked CLIP on mined pairs, and the MaskFormer.

Plain-PyTorch logic: ``losses`` / ``maskformer_loss`` (objectives), ``clip_steps`` / ``maskformer_steps``
(the model to train, one optimisation step, checkpoints, export), ``pair_batches`` / ``maskformer_data``
(what the data tasks compute: region batches with the shared region preprocessing; decoded, checked,
augmented crops), ``clip_loop`` / ``maskformer_loop`` (the per-worker loops), ``clip_config`` /
``maskformer_config`` (pydantic configs) and ``runs`` (run folders, records, resume, the session the
loops see). ``engine`` is the one Ray module: Ray Data feeds and Ray Train runs.
"""
