"""Aesthetic score (spec 1.7): CLIP image features through the LAION aesthetic MLP head.

    opensora data aes meta/clips.csv --clip models/clip-vit-large-patch14 --head models/aesthetic.pth
    torchrun --nproc_per_node 8 -m opensora_sdk data aes meta/clips.csv --clip ... --head ...

* `--clip`: a local folder of transformers' `CLIPVisionModelWithProjection` (e.g. a download of
  `openai/clip-vit-large-patch14`, the ViT-L/14 the official tool uses).
* `--head`: the MLP weights (`sac+logos+ava1-l14-linearMSE.pth`, the official
  `pretrained_models/aesthetic.pth`; .pth or .safetensors with keys `layers.{0,2,4,6,7}.*`).

Frames at points {1: (0.5), 2: (0.25, 0.5), 3: (0.1, 0.5, 0.9)} (default 3); each is resized
(shorter side to the model's image size, bicubic), centre-cropped and normalised with CLIP's
mean / std; the image embeddings are L2-normalised, cast to float32, scored by the MLP
(Linear 768-1024-128-64-16-1, dropout inactive), and `aes` is the mean over the frames.
Nothing is downloaded: a missing folder or file is an error naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from opensora_sdk.data.scoring import point_indices, read_frames, total_frames

FRAME_POINTS = {1: (0.5,), 2: (0.25, 0.5), 3: (0.1, 0.5, 0.9)}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_LAYERS = (0, 2, 4, 6, 7)  # Linear positions in the official nn.Sequential (dropouts between)


def _require_file(path, what: str, hint: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} not found: {hint} (nothing is downloaded)")
    return path


def load_head(path: str | os.PathLike):
    """The MLP head from a .pth / .safetensors state dict (sizes read from its shapes)."""
    import torch

    path = _require_file(path, "--head", "give the aesthetic MLP weights, e.g. sac+logos+ava1-l14-linearMSE.pth")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.split("layers.", 1)[-1]: v for k, v in state.items() if "layers." in k}
    want = [f"{i}.{p}" for i in HEAD_LAYERS for p in ("weight", "bias")]
    missing = [k for k in want if k not in state]
    if missing:
        raise ValueError(f"--head {str(path)!r}: not the aesthetic MLP (missing layers.{missing[0]}; expected "
                         f"layers.{{0,2,4,6,7}}.weight/bias)")  # fmt: skip
    mods = []
    for n, i in enumerate(HEAD_LAYERS):
        w = state[f"{i}.weight"]
        linear = torch.nn.Linear(w.shape[1], w.shape[0])
        linear.load_state_dict({"weight": w, "bias": state[f"{i}.bias"]})
        mods.append(linear)
        if n < 3:
            mods.append(torch.nn.Dropout((0.2, 0.2, 0.1)[n]))
    head = torch.nn.Sequential(*mods).eval()
    if head[-1].out_features != 1:
        raise ValueError(f"--head {str(path)!r}: the last layer gives {head[-1].out_features} outputs, expected 1")
    return head


def preprocess(frames: np.ndarray, size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 [N, H, W, 3] -> float32 [N, 3, size, size]: shorter side to `size` (bicubic),
    centre crop, /255, CLIP normalisation (CLIP's own preprocess)."""
    import torch
    from PIL import Image

    out = []
    for frame in frames:
        image = Image.fromarray(frame)
        w, h = image.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        out.append(np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class AestheticScorer:
    """See the module docstring. `device` None: CUDA of this rank when available, else CPU."""

    name = "aes"
    columns = ("aes",)

    def __init__(self, clip_path, head_path, *, num_frames: int = 3, device=None, dtype=None):
        import torch

        from opensora_sdk.data.scoring import pick_device

        if num_frames not in FRAME_POINTS:
            raise ValueError(f"--num-frames {num_frames}: expected one of {sorted(FRAME_POINTS)}")
        folder = _require_file(clip_path, "--clip", "give a local folder of a CLIP vision model "
                                          "(CLIPVisionModelWithProjection, e.g. openai/clip-vit-large-patch14)")  # fmt: skip
        from transformers import CLIPVisionModelWithProjection

        self.device = pick_device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.clip = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True).to(self.device, self.dtype).eval()
        self.head = load_head(head_path).to(self.device)
        dim = self.clip.config.projection_dim
        if self.head[0].in_features != dim:
            raise ValueError(f"--head takes {self.head[0].in_features}-d features but the CLIP model gives {dim}-d "
                             "(the official head is for ViT-L/14, 768-d)")  # fmt: skip
        self.size = self.clip.config.image_size
        self.mean, self.std = _normalisation(folder)
        self.points = FRAME_POINTS[num_frames]
        self.settings = {"clip": str(Path(clip_path).resolve()), "head": str(Path(head_path).resolve()), "num_frames": num_frames}

    def load(self, row: dict):
        from opensora_sdk.data.table import is_image

        indices = [0] if is_image(row["path"]) else point_indices(self.points, total_frames(row))
        return preprocess(read_frames(row, indices), self.size, self.mean, self.std)

    def score(self, items: list) -> list[dict]:
        import torch

        counts = [len(x) for x in items]
        with torch.no_grad():
            x = torch.cat(items).to(self.device, self.dtype)
            feats = self.clip(pixel_values=x).image_embeds
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
            scores = self.head(feats).squeeze(-1).cpu()
        return [{"aes": float(s.mean())} for s in torch.split(scores, counts)]


def _normalisation(folder: Path):
    """mean / std of the folder's preprocessor_config.json, else CLIP's."""
    import json

    file = folder / "preprocessor_config.json"
    if file.is_file():
        cfg = json.loads(file.read_text("utf-8"))
        return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD
