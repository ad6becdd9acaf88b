"""Cluster scale: launching a recipe with torchrun or SLURM (``launch``) and sizing a layout on paper
(``scale``).
"""
