"""Text in frames (spec 1.9): how many text boxes, and how much of the frame they cover.

    opensora data ocr meta/clips.csv                     # needs an OCR package, see below

The official tool runs MMOCR's DBNet++ on frame 10, resized (shorter side 1024) and
centre-cropped to 1024x1024, and writes `ocr` = the number of text instances with score > 0.3.
MMOCR is not a dependency here; the first installed of these backends is used instead:

* `rapidocr_onnxruntime` (pip install rapidocr-onnxruntime; its models ship in the wheel);
* `easyocr` with `--ocr-models DIR` (its detector weights in a local folder; nothing is downloaded).

Columns: `ocr` (boxes with score > 0.3) and `ocr_area` (their summed polygon area over the
frame area, capped at 1). Without a backend the command stops with the install hint.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from opensora_sdk.data.scoring import read_frames, total_frames

FRAME_INDEX = 10
SIZE = 1024
MIN_SCORE = 0.3
BACKENDS = ("rapidocr_onnxruntime", "easyocr")


def available_backend() -> str | None:
    for name in BACKENDS:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def polygon_area(points) -> float:
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def square_crop(frame: np.ndarray, size: int = SIZE) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(frame)
    w, h = image.size
    s = size / min(w, h)
    image = image.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


class OCRScorer:
    name = "ocr"
    columns = ("ocr", "ocr_area")

    def __init__(self, *, models_dir=None, device=None, backend: str | None = None):
        backend = backend or available_backend()
        if backend is None:
            raise ImportError("OCR needs an OCR package: pip install rapidocr-onnxruntime (models in the wheel), "
                              "or easyocr with --ocr-models DIR")  # fmt: skip
        self.backend = backend
        if backend == "rapidocr_onnxruntime":
            from rapidocr_onnxruntime import RapidOCR

            self.engine = RapidOCR()
        else:
            if not models_dir:
                raise ValueError("easyocr needs --ocr-models DIR with its weights (craft_mlt_25k.pth, english_g2.pth); nothing is downloaded")
            import easyocr

            from opensora_sdk.data.scoring import pick_device

            self.engine = easyocr.Reader(["en"], gpu=pick_device(device).type == "cuda", model_storage_directory=str(models_dir),
                                         download_enabled=False, verbose=False)  # fmt: skip
        self.settings = {"backend": backend}

    def load(self, row: dict) -> np.ndarray:
        from opensora_sdk.data.table import is_image

        index = 0 if is_image(row["path"]) else min(FRAME_INDEX, total_frames(row) - 1)
        return square_crop(read_frames(row, [index])[0])

    def boxes(self, image: np.ndarray) -> list[tuple[list, float]]:
        if self.backend == "rapidocr_onnxruntime":
            result, _ = self.engine(image)
            return [(box, float(score)) for box, _text, score in (result or [])]
        return [(box, float(score)) for box, _text, score in self.engine.readtext(image)]

    def score(self, items: list) -> list[dict]:
        out = []
        for image in items:
            kept = [box for box, score in self.boxes(image) if score > MIN_SCORE]
            area = sum(polygon_area(b) for b in kept) / float(image.shape[0] * image.shape[1])
            out.append({"ocr": len(kept), "ocr_area": min(1.0, area)})
        return out
