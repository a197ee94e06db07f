"""Training pieces (data, buckets, masks, EMA, checkpoints, features, synthetic data).

These are plain PyTorch; the accelerate entry point that composes them is `training/train.py`
at the repository root. Nothing here imports accelerate.
"""
