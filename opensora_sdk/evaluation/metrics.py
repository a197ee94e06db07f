"""Reconstruction metrics of the official VAE evaluation (spec 10.2): PSNR, SSIM, LPIPS, FloLPIPS.

Videos are float tensors [T, C, H, W] in [0, 1] (one video) unless said otherwise.

* PSNR: per frame, MSE over C, H, W; 20 log10(1 / sqrt(MSE)); 100 when MSE < 1e-10.
* SSIM: per channel, an 11x11 Gaussian window (sigma 1.5, the `cv2.getGaussianKernel` values),
  C1 = 0.01^2, C2 = 0.03^2, statistics over the "valid" window positions (the official code
  filters with `cv2.filter2D` and crops a 5-pixel border: the same numbers), mean of the map,
  then the mean of the channels. Computed in float64.
* LPIPS: the `lpips` package's network (version 0.1: backbone features, unit-normalised
  per channel, squared differences, its learned 1x1 "lin" layers) with `spatial=True`, on
  inputs mapped to [-1, 1]; a frame's value is the mean of the spatial map (official). The
  network is rebuilt here so it needs no torchvision: the lin weights come from the installed
  `lpips` package's bundled files (or `lin_weights`), the backbone (AlexNet or VGG16 features,
  torchvision's checkpoint format) from a local file. `LPIPS.random(net)` builds it with random
  weights (tests).
* FloLPIPS: for each consecutive pair, the LPIPS feature differences of frame t are weighted by
  the magnitude of flow_gt - flow_rec (flow of frames t -> t+1 of each video), resized to each
  layer and normalised to sum 1 (official: PWC-Net flow; here any flow function: RAFT or
  Farneback). A pair whose two flows are identical gets uniform weights (the official value is
  NaN, 0 / 0). T - 1 values per video.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
C1, C2 = 0.01**2, 0.03**2


# --------------------------------------------------------------------------------------------
# PSNR, SSIM
# --------------------------------------------------------------------------------------------


def psnr_frames(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T, C, H, W] x2 in [0, 1] -> PSNR per frame [T] (float64)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    out = 20 * torch.log10(1.0 / mse.sqrt())
    return torch.where(mse < 1e-10, torch.full_like(out, 100.0), out)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The 2D window outer(k, k) of `cv2.getGaussianKernel(size, sigma)` (float64)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    return torch.outer(k, k)


def ssim_frames(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T, C, H, W] x2 in [0, 1] -> SSIM per frame [T] (mean over the map, then over channels)."""
    T, C, H, W = a.shape
    if H < SSIM_WINDOW or W < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {H}x{W}")
    x = a.double().reshape(T * C, 1, H, W)
    y = b.double().reshape(T * C, 1, H, W)
    w = gaussian_window().to(x.device)[None, None]

    def filt(z):
        return F.conv2d(z, w)  # valid positions only = filter2D + 5-pixel crop

    mu1, mu2 = filt(x), filt(y)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = filt(x * x) - mu1_sq
    s2 = filt(y * y) - mu2_sq
    s12 = filt(x * y) - mu12
    ssim_map = ((2 * mu12 + C1) * (2 * s12 + C2)) / ((mu1_sq + mu2_sq + C1) * (s1 + s2 + C2))
    return ssim_map.flatten(1).mean(1).reshape(T, C).mean(1)


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------

# (torchvision `features` layer ranges of the five slices, channels) per backbone
BACKBONES = {
    "alex": ([(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)], [64, 192, 384, 256, 256]),
    "vgg": ([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)], [64, 128, 256, 512, 512]),
}
BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def _features(net: str) -> nn.Sequential:
    """torchvision's `alexnet().features` / `vgg16().features` layer for layer (same keys)."""
    if net == "alex":
        return nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2),
        )  # fmt: skip
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(True)]
            c = v
    return nn.Sequential(*layers)


def seeded_backbone_state(net: str = "alex", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random backbone in torchvision's key format (`features.N.weight` / `.bias`), drawn from
    one seeded CPU generator in key order: weights N(0, 1/fan_in), biases N(0, 0.01^2). For
    parity bundles: the maker and the test draw the same trunk, so it need not be stored."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, p in _features(net).state_dict().items():
        std = (1.0 / p[0].numel()) ** 0.5 if key.endswith("weight") else 0.01
        state["features." + key] = torch.randn(p.shape, generator=g) * std
    return state


class LPIPS(nn.Module):
    """The LPIPS v0.1 network; `forward(x0, x1)` in [-1, 1], [B, 3, H, W] -> spatial map [B, 1, H, W]."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"net={net!r}: choose one of {sorted(BACKBONES)}")
        self.net_name = net
        self.slices, self.chns = BACKBONES[net]
        self.features = _features(net)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.chns)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, backbone: str | os.PathLike, net: str = "alex", lin_weights: str | os.PathLike | None = None) -> LPIPS:
        """Backbone from a torchvision checkpoint file, lin layers from the lpips package (or a file)."""
        model = cls(net)
        path = Path(backbone).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS backbone {str(path)!r} not found: give torchvision's {BACKBONE_FILES[net]} "
                                    "(a local file; nothing is downloaded)")  # fmt: skip
        state = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        model.features.load_state_dict(feats)
        lin_path = Path(lin_weights) if lin_weights else bundled_lin_weights(net)
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        for i, layer in enumerate(model.lins):
            key = next((k for k in (f"lin{i}.model.1.weight", f"lin{i}.model.0.weight") if k in lin), None)
            if key is None:
                raise ValueError(f"{str(lin_path)!r} is not an LPIPS lin-weights file (no lin{i}.model.1.weight)")
            layer.weight.copy_(lin[key])
        return model

    @classmethod
    def random(cls, net: str = "alex", seed: int = 0) -> LPIPS:
        """Random backbone and positive random lin weights (tests; no files)."""
        g = torch.Generator().manual_seed(seed)
        model = cls(net)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for layer in model.lins:
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=g))
        return model

    def layer_diffs(self, x0: torch.Tensor, x1: torch.Tensor) -> list[torch.Tensor]:
        """Per slice: lin(unit-normalised feature differences squared) [B, 1, h_l, w_l]."""
        h0, h1 = (x0 - self.shift) / self.scale, (x1 - self.shift) / self.scale
        out = []
        for (lo, hi), lin in zip(self.slices, self.lins):
            h0, h1 = self.features[lo:hi](h0), self.features[lo:hi](h1)
            d = (_unit(h0) - _unit(h1)) ** 2
            out.append(lin(d))
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        size = x0.shape[-2:]
        return sum(F.interpolate(d, size=size, mode="bilinear", align_corners=False) for d in self.layer_diffs(x0, x1))


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def bundled_lin_weights(net: str) -> Path:
    """The lin weights that ship inside the `lpips` wheel (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("LPIPS needs the lin weights of the `lpips` package: pip install 'opensora-sdk[eval]' (or give --lpips-lin)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)} is missing from the installed lpips package")
    return path


def lpips_frames(model: LPIPS, a: torch.Tensor, b: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """[T, 3, H, W] x2 in [0, 1] -> LPIPS per frame [T] (mean of the spatial map)."""
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(a), batch):
            x0 = a[i : i + batch].to(dev).float() * 2 - 1
            x1 = b[i : i + batch].to(dev).float() * 2 - 1
            out.append(model(x0, x1).flatten(1).mean(1).double().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# FloLPIPS
# --------------------------------------------------------------------------------------------

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # [H, W, 3] 0..255 x2 -> [2, H, W]


def flolpips_frames(model: LPIPS, gt: torch.Tensor, rec: torch.Tensor, flow: FlowFn) -> torch.Tensor:
    """[T, 3, H, W] x2 in [0, 1] -> FloLPIPS per consecutive pair [T - 1]."""
    dev = next(model.parameters()).device
    to255 = lambda x: (x.permute(1, 2, 0).clamp(0, 1) * 255).cpu().numpy()  # noqa: E731
    out = []
    with torch.no_grad():
        for t in range(len(gt) - 1):
            f_gt = torch.from_numpy(np.asarray(flow(to255(gt[t]), to255(gt[t + 1])), dtype=np.float32))
            f_rec = torch.from_numpy(np.asarray(flow(to255(rec[t]), to255(rec[t + 1])), dtype=np.float32))
            diff = (f_gt - f_rec)[None].to(dev)  # [1, 2, H, W]
            layers = model.layer_diffs(gt[t : t + 1].to(dev).float() * 2 - 1, rec[t : t + 1].to(dev).float() * 2 - 1)
            value = 0.0
            for d in layers:
                fl = F.interpolate(diff, size=d.shape[-2:], mode="bilinear", align_corners=False)
                mag = fl.pow(2).sum(1, keepdim=True).sqrt()
                total = mag.sum()
                weight = mag / total if total > 0 else torch.full_like(mag, 1.0 / mag.numel())
                value += float((d * weight).sum())
            out.append(value)
    return torch.tensor(out, dtype=torch.float64)


def summarize(values: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each metric over videos (NaN-free lists); missing metrics are left out."""
    return {k: float(np.mean(v)) for k, v in values.items() if v and not any(math.isnan(x) for x in v)}
