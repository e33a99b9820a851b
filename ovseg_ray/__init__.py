"""ovseg-ray: open-vocabulary semantic segmentation with mask-adapted CLIP (OVSeg), on Ray."""

__version__ = "0.1.0"
