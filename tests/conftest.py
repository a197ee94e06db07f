"""Shared test fixtures: golden reference bundles, tiny configs, deterministic CPU torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch


def reference_dir() -> Path | None:
    value = os.environ.get("OPENSORA_REFERENCE_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    return None


@pytest.fixture(scope="session")
def reference():
    """The folder of official reference data, or skip when it is not available."""
    path = reference_dir()
    if path is None:
        pytest.skip("reference data not available: set OPENSORA_REFERENCE_DIR to shared/reference")
    return path


class Golden:
    """One golden bundle: `.meta` is the sidecar JSON, indexing gives tensors by key."""

    def __init__(self, folder: Path, name: str):
        from safetensors.torch import load_file

        self.name = name
        self.meta = json.loads((folder / f"{name}.json").read_text())
        self.tensors = load_file(str(folder / f"{name}.safetensors"))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="session")
def golden(reference):
    """golden("stdit3_a") -> Golden bundle from reference/golden/."""
    cache: dict[str, Golden] = {}

    def load(name: str) -> Golden:
        if name not in cache:
            cache[name] = Golden(reference / "golden", name)
        return cache[name]

    return load


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
