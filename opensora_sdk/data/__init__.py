"""From raw videos to a training set: the official data tools as functions and `opensora data ...`.

    info.scan(folder_or_csv, out)                 # path, text, num_frames, height, width, aspect_ratio, fps, resolution, duration
    scenes.detect(meta) / scenes.split(meta, save_dir=...)   # shots, then one clip per shot
    scoring.run_scores(AestheticScorer(...) | MotionScorer(...) | OCRScorer(...), meta)  # aes / flow + cmotion / ocr
    caption.caption_csv(meta, captioner=Captioner(...))      # an OpenAI-compatible vision endpoint
    csvtools.transform([meta], fmin=17, aesmin=5.0, ...)    # filter, merge, dedupe, shuffle, shard
    stats.stats(meta)                                       # counts + histograms

Every command journals finished items and writes its output atomically, so it can be re-run
to continue after a crash. Optional packages (PySceneDetect, OpenCV, an OCR package) are the
`data` extra: pip install 'opensora-sdk[data]'. Nothing here imports torch until a model runs.
"""

__all__ = ["aesthetic", "caption", "csvtools", "info", "motion", "ocr", "scenes", "scoring", "stats", "table"]
