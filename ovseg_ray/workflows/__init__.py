"""Workflows across capabilities, on top of them (like ``cli``): ``reproduce`` runs the paper at small
scale with every stage's own command, ``report`` writes its tables, figure and model card."""
