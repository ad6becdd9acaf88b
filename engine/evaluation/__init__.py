"""Evaluation and reporting: sampled clips scored with paired confidence intervals, the run report, pictures.

evaluate.py   samples on fixed seeds, oracle scores with 95% CIs, paired deltas and win rates
report.py     ``report.html`` of a run directory with its plots
visualize.py  GIF / PNG grids of clips
"""
