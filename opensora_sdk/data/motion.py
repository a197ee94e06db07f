"""Motion score (spec 1.8) and camera-motion labels (spec 1.11 b) from one optical-flow field.

    opensora data motion meta/clips.csv                               # OpenCV Farneback, no weights
    opensora data motion meta/clips.csv --raft models/raft_large_C_T_SKHT_V2-ff5fadd5.pth
    torchrun --nproc_per_node 8 -m opensora_sdk data motion meta/clips.csv --raft ...

Frames 0, 10, 20, 30 (clamped to the last frame), turned to landscape when H > W, resized
(bilinear, align_corners) to 320x576; flow of the pairs (f0, f1), (f1, f2), (f2, f3).
`flow` = the mean absolute value over the pairs, both components and all pixels (pixels at
320x576), as the official tool. The flow comes from torchvision's RAFT-large with `--raft`
weights (a local file), else from OpenCV's Farneback (pyr_scale 0.5, 3 levels, window 15,
3 iterations, poly_n 5, sigma 1.2), which needs no weights. The official tool uses UniMatch
(GMFlow), so the numbers are on a similar pixel scale but not equal: choose thresholds
(`--flowmin`) on your own data.

`cmotion` classifies each pair's flow field with the official OpenCV tool's rules: median
magnitude < 1 px: static; else the share of pixels the flow carries away from the centre:
> 0.6 zoom in, < 0.4 zoom out; else by the median flow angle: [315, 45) pan left, [45, 135)
tilt up, [135, 225) pan right, [225, 315) tilt down (the scene moves against the camera).
The clip's label is the majority one (more than half the pairs), else "unknown" if a pair was
static, "pan/tilt" if none was a zoom, else "dynamic". Labels use the SDK's camera-motion words
(`opensora_sdk.text.CAMERA_MOTIONS`), which the training dataset's caption suffixes accept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from opensora_sdk.data.scoring import read_frames, total_frames

FRAME_INDICES = (0, 10, 20, 30)
FLOW_SIZE = (320, 576)  # H, W
STATIC_MAGNITUDE = 1.0
ZOOM_IN, ZOOM_OUT = 0.6, 0.4


def load_frames(row: dict, size=FLOW_SIZE) -> np.ndarray:
    """float32 [4, H, W, 3] in 0..255 at `size`, landscape."""
    import torch
    import torch.nn.functional as F

    from opensora_sdk.data.table import is_image

    total = 1 if is_image(row["path"]) else total_frames(row)
    frames = read_frames(row, [min(i, total - 1) for i in FRAME_INDICES])
    x = torch.from_numpy(frames).float().permute(0, 3, 1, 2)  # [4, 3, H, W]
    if x.shape[2] > x.shape[3]:
        x = x.transpose(2, 3)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return x.permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------------
# Flow
# --------------------------------------------------------------------------------------------


def farneback_flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[H, W, 3] 0..255 pair -> flow [2, H, W] (x, y) in pixels (OpenCV Farneback)."""
    try:
        import cv2
    except ImportError:
        raise ImportError("the Farneback flow needs OpenCV: pip install 'opensora-sdk[data]' (or give --raft weights)") from None
    ga = cv2.cvtColor(np.clip(a, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    gb = cv2.cvtColor(np.clip(b, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    flow = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return flow.transpose(2, 0, 1)


class RaftFlow:
    """torchvision's RAFT-large with weights from a local file (`raft_large_*.pth`)."""

    def __init__(self, weights, device):
        import torch

        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--raft {str(path)!r} not found: give torchvision's RAFT-large weights "
                                    "(raft_large_C_T_SKHT_V2-ff5fadd5.pth), or leave --raft out for Farneback (nothing is downloaded)")  # fmt: skip
        try:
            from torchvision.models.optical_flow import raft_large
        except ImportError:
            raise ImportError("RAFT needs torchvision (pip install torchvision matching your torch), or leave --raft out for Farneback") from None
        self.model = raft_large(weights=None, progress=False)
        self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model.to(device).eval()
        self.device = device

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """[P, H, W, 3] pairs (0..255) -> [P, 2, H, W]."""
        import torch

        def prep(x):
            return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(self.device)

        with torch.no_grad():
            return self.model(prep(a), prep(b))[-1].cpu().numpy()


def motion_score(flows: np.ndarray) -> float:
    """Official `flow`: mean |u| and |v| over pairs and pixels. flows [P, 2, H, W]."""
    return float(np.abs(flows).mean())


# --------------------------------------------------------------------------------------------
# Camera motion
# --------------------------------------------------------------------------------------------


def pair_motion(flow: np.ndarray) -> str:
    """The camera motion of one flow field [2, H, W] (rules in the module docstring)."""
    u, v = flow[0], flow[1]
    magnitude = np.hypot(u, v)
    if np.median(magnitude) < STATIC_MAGNITUDE:
        return "static"
    H, W = u.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    cy, cx = (H - 1) / 2, (W - 1) / 2
    before = np.hypot(xx - cx, yy - cy)
    after = np.hypot(xx + u - cx, yy + v - cy)
    zoom = float((after >= before).mean())
    if zoom > ZOOM_IN:
        return "zoom in"
    if zoom < ZOOM_OUT:
        return "zoom out"
    angle = float(np.median(np.degrees(np.arctan2(v, u)) % 360))
    if angle >= 315 or angle < 45:
        return "pan left"
    if angle < 135:
        return "tilt up"
    if angle < 225:
        return "pan right"
    return "tilt down"


def camera_motion(flows: np.ndarray) -> str:
    """The clip's label from its pairs' labels (majority, else unknown / pan/tilt / dynamic)."""
    labels = [pair_motion(f) for f in flows]
    best = max(set(labels), key=labels.count)
    if labels.count(best) > len(labels) / 2:
        return best
    if "static" in labels:
        return "unknown"
    if not any(label.startswith("zoom") for label in labels):
        return "pan/tilt"
    return "dynamic"


class MotionScorer:
    """`flow` and `cmotion` of each row; see the module docstring."""

    name = "flow"
    columns = ("flow", "cmotion")

    def __init__(self, raft=None, *, device=None, size=FLOW_SIZE):
        from opensora_sdk.data.scoring import pick_device

        self.size = tuple(size)
        self.raft = RaftFlow(raft, pick_device(device)) if raft else None
        if self.raft is None:
            farneback_flow(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.float32))  # OpenCV there?
        self.settings = {"flow_model": str(Path(raft).resolve()) if raft else "farneback", "size": list(self.size)}

    def load(self, row: dict) -> np.ndarray:
        return load_frames(row, self.size)

    def flows(self, frames: np.ndarray) -> np.ndarray:
        """[4, H, W, 3] -> [3, 2, H, W]."""
        if self.raft is not None:
            return self.raft(frames[:-1], frames[1:])
        return np.stack([farneback_flow(frames[i], frames[i + 1]) for i in range(len(frames) - 1)])

    def score(self, items: list) -> list[dict]:
        if self.raft is not None and items:  # one batched call over every pair of the batch
            pairs = self.raft(np.concatenate([f[:-1] for f in items]), np.concatenate([f[1:] for f in items]))
            per_item = np.split(pairs, np.cumsum([len(f) - 1 for f in items])[:-1])
        else:
            per_item = [self.flows(f) for f in items]
        return [{"flow": motion_score(f), "cmotion": camera_motion(f)} for f in per_item]
