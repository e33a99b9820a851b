"""Training the masked CLIP on mined pairs (OVSeg sections 3.3, 4.1).

Plain-PyTorch logic: ``losses`` (objectives), ``clip_steps`` (the model to train, one optimisation
step, checkpoints, the exported model), ``pair_batches`` (pairs -> masked region batches with the
shared region preprocessing) and ``config`` (the pydantic config and the run folder). ``engine`` is
the one Ray module: Ray Data reading the pairs, Ray Train running the DDP loop with checkpoints,
retries and resume.
"""
