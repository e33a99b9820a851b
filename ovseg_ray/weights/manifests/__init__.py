"""Key manifests of the OVSeg release checkpoints (JSON) and the rules that derive them (``derive``)."""
