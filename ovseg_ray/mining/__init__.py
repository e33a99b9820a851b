"""Mining (masked region, noun) pairs from image captions (OVSeg section 3.2).

Plain-Python logic: ``nouns`` (caption nouns with nltk), ``matching`` (proposals as masks at the image
size, each noun to its best region), ``stages`` (what each pipeline operator computes per batch),
``config`` (the pydantic config) and ``preview`` (a contact sheet of mined pairs). ``pipeline`` is
the one Ray module: it wires the stages into Ray Data (tasks, two autoscaling actor pools) and runs
the driver loop that commits shards. The output layout is ``ovseg_ray.data.pair_store``.
"""
