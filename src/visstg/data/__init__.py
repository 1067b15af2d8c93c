"""Datasets: YouTube-VIS/OVIS annotations, the synthetic dataset, pairs, transforms, video I/O.

Kept import-free so that ``python -m visstg.data.<tool>`` stays light.
"""
