"""Make the golden bundle `tests/reference/golden/lpips_alex` with the real `lpips` package.

Run once, with a Python whose torch, torchvision and lpips import together (lpips imports
torchvision), from the repository root:

    PYTHONPATH=. python tools/make_lpips_golden.py [--out tests/reference/golden]

The package's AlexNet LPIPS v0.1 (`lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True)`):
the package's own lin weights (`weights/v0.1/alex.pth`) on a seeded random AlexNet trunk
(`opensora_sdk.evaluation.metrics.seeded_backbone_state`: the test draws the same trunk, so the
bundle does not store it), so nothing is downloaded. The bundle stores the lin weights in the
package's format, three
pairs of frames in [0, 1], and the package's outputs on them (called with `normalize=True`, the
same 2x - 1 as `metrics.lpips_frames`): the value (`spatial=False`), its per-layer terms, and the
spatial map (`spatial=True`). Float32, one thread. VGG16 is left out: its trunk alone is 59 MB.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from pathlib import Path

import lpips
import numpy as np
import safetensors
import torch
import torchvision
from safetensors.torch import save_file

from opensora_sdk.evaluation.metrics import seeded_backbone_state

NAME = "lpips_alex"
SEED = 0
# (name, N, H, W, kind): independent frames, and a noisy "reconstruction" of smooth frames
PAIRS = [
    ("p64", 2, 64, 64, "independent"),
    ("p37x53", 3, 37, 53, "reconstruction"),
    ("p96x80", 2, 96, 80, "reconstruction"),
]


def smooth_frames(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """[n, 3, h, w] in [0, 1]: coarse random colours upsampled, plus fine texture."""
    coarse = torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return (x + 0.1 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)


def make_pair(g: torch.Generator, n: int, h: int, w: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = smooth_frames(g, n, h, w)
    if kind == "independent":
        return a, smooth_frames(g, n, h, w)
    return a, (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/reference/golden"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, spatial=False, verbose=False).eval()
    trunk = seeded_backbone_state("alex", SEED)
    with torch.no_grad():  # "slice1.0.weight" <- "features.0.weight" (the slices keep torchvision's indices)
        for key, value in model.net.state_dict().items():
            value.copy_(trunk["features." + key.split(".", 1)[1]])
    spatial = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, spatial=True, verbose=False).eval()
    spatial.load_state_dict(model.state_dict())

    tensors: dict[str, torch.Tensor] = {}
    for i, lin in enumerate(model.lins):
        tensors[f"sd.lin{i}.model.1.weight"] = lin.model[1].weight.contiguous()

    g = torch.Generator().manual_seed(SEED)
    records = []
    with torch.no_grad():
        for name, n, h, w, kind in PAIRS:
            a, b = make_pair(g, n, h, w, kind)
            value, layers = model(a, b, retPerLayer=True, normalize=True)
            tensors[f"in.{name}.a"], tensors[f"in.{name}.b"] = a, b
            tensors[f"out.{name}.value"] = value
            tensors[f"out.{name}.map"] = spatial(a, b, normalize=True)
            for k, layer in enumerate(layers):
                tensors[f"mid.{name}.layer{k}"] = layer
            records.append({"name": name, "shape": [n, 3, h, w], "kind": kind,
                            "value": [float(v) for v in value.flatten()]})  # fmt: skip

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / f"{NAME}.safetensors"))
    meta = {
        "name": NAME,
        "kind": "lpips",
        "description": "The lpips package's LPIPS v0.1 (AlexNet trunk, seeded random; the package's lin weights) on three pairs of frames",
        "call": ("model = lpips.LPIPS(net='alex', pretrained=True, pnet_rand=True, spatial=False), its trunk replaced by "
                 "metrics.seeded_backbone_state('alex', seed); "
                 "out.P.value, [mid.P.layerK] = model(in.P.a, in.P.b, retPerLayer=True, normalize=True); "
                 "out.P.map = the same weights with spatial=True: model(in.P.a, in.P.b, normalize=True)"),
        "inputs": "in.P.a, in.P.b: [N, 3, H, W] float32 in [0, 1]; normalize=True maps them to 2x - 1 (as metrics.lpips_frames does)",
        "pairs": records,
        "weights": ("trunk: metrics.seeded_backbone_state('alex', seed) (not stored); "
                    "sd.linK.model.1.weight: lpips/weights/v0.1/alex.pth as shipped"),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "seed": SEED,
        "env": {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                "lpips": importlib.metadata.version("lpips"),
                "numpy": np.__version__, "safetensors": safetensors.__version__, "dtype": "float32", "threads": 1},
    }  # fmt: skip
    (args.out / f"{NAME}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out / NAME}.safetensors / .json: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
