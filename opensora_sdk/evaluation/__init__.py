"""Scores for what we make: the official evaluation as functions and `opensora eval ...`.

    metrics.psnr_frames / ssim_frames / LPIPS / flolpips_frames    # spec 10.2, [T, C, H, W] in [0, 1]
    vae_eval.evaluate(meta, vae, out)                             # reconstruction metrics per video
    loss.evaluate(pipe, data, out)                                # rectified-flow loss per bucket, ten fixed t
    sample.cmd_sample / vbench.combine_t2v(raw)                   # VBench samples and the official combination

Optional packages are the `eval` extra (pip install 'opensora-sdk[eval]'); weights always come
from local paths.
"""

__all__ = ["loss", "metrics", "sample", "vae_eval", "vbench"]
