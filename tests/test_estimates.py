"""The memory formulas of `opensora info` against measurements on the CPU with small configs.

torch has no peak-memory counter on the CPU and a process's ru_maxrss mixes in the allocator
and the interpreter, so the tests measure what the formulas describe directly: the bytes of
the weights (fp8 layers, the blocks present on the device during a block-swapped forward) and
the peak of live activation bytes during a forward, counted by a dispatch mode that sees every
op's outputs and their release. Weights must match exactly; activations are bounded by
[1.0, 1.5] x the formula (its 12 values per token and channel leave out small terms such as the
float32 output and the text tokens, which shrink relative to the video tokens as they grow)."""

from __future__ import annotations

import copy
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from opensora_sdk import estimates, fp8
from opensora_sdk.offload import BlockSwap, streamed_tensors, transformer_blocks
from opensora_sdk.pipeline import OpenSoraPipeline
from test_stdit3 import model_for, tiny

ACTIVATION_BOUND = (1.0, 1.5)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors the ops inside the block create and that are alive at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or storage.nbytes() == 0:
                    continue  # a view of a tensor already counted
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key, 0)


def test_fp8_weight_bytes_match_the_quantized_model():
    cfg = tiny(depth=3)
    model = model_for(cfg).to(torch.bfloat16)
    split = estimates.transformer_weight_split(cfg)
    assert estimates.device_weight_bytes(split, 2) == fp8.weight_bytes(model)
    fp8.quantize_transformer_fp8(model)
    assert estimates.device_weight_bytes(split, 2, fp8=True) == fp8.weight_bytes(model)


def test_t5_split_matches_the_t5_model():
    te = OpenSoraPipeline.from_preset("tiny-random", seed=0, device="cpu").text_encoder
    c = te.model.config
    config = {k: getattr(c, k) for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                                         "relative_attention_num_buckets", "feed_forward_proj")}
    split = estimates.t5_weight_split(config)
    assert estimates.device_weight_bytes(split, 4) == fp8.weight_bytes(te.model)
    fp8.quantize_text_encoder_fp8(te, min_weights=0)
    assert estimates.device_weight_bytes(split, 4, fp8=True) == fp8.weight_bytes(te.model)


def streamed_bytes(block) -> int:
    return sum(t.numel() * t.element_size() for t in streamed_tensors(block))


class CountingMover:
    """A fake device that counts the bytes of the streamed blocks it holds."""

    def __init__(self):
        self.bytes, self.peak = 0, 0

    def load(self, block):
        self.bytes += streamed_bytes(block)
        self.peak = max(self.peak, self.bytes)

    def wait(self, block):
        pass

    def unload(self, block):
        self.bytes -= streamed_bytes(block)

    def release(self):
        pass


def test_block_swap_device_bytes_match_a_forward():
    cfg = tiny(depth=3)
    model = model_for(cfg)
    split = estimates.transformer_weight_split(cfg)
    blocks = transformer_blocks(model)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4)
    y = torch.randn(1, 1, cfg.model_max_length, cfg.caption_channels)
    for resident in (0, 2, 5, 6):
        mover = CountingMover()
        swap = BlockSwap(blocks, "cpu", resident, mover=mover).attach()
        with torch.no_grad():
            model(x, torch.tensor([400.0]), y, fps=24, height=32, width=32)
        swap.detach()
        streamed = sum(streamed_bytes(b) for b in blocks[resident:])
        measured = fp8.weight_bytes(model) - streamed + mover.peak
        assert measured == estimates.device_weight_bytes(split, 4, blocks_on_device=resident), resident


def test_activation_formula_against_live_bytes():
    cfg = tiny()
    model = copy.deepcopy(model_for(cfg))
    ratios = []
    for T, H in ((4, 32), (4, 64)):  # 1024 and 4096 video tokens per sample, two rows
        g = torch.Generator().manual_seed(T + H)
        x = torch.randn(2, cfg.in_channels, T, H, H, generator=g)
        y = torch.randn(2, 1, cfg.model_max_length, cfg.caption_channels, generator=g)
        with torch.no_grad(), LiveBytes() as live:
            model(x, torch.tensor([500.0, 100.0]), y, fps=24, height=8 * H, width=8 * H)
        formula = estimates.transformer_activation_bytes(cfg, 2, T * (H // 2) ** 2, torch.float32)
        ratios.append(live.peak / formula)
    low, high = ACTIVATION_BOUND
    assert all(low <= r <= high for r in ratios), ratios
    assert ratios[1] < ratios[0]  # the fixed terms weigh less as the tokens grow


def test_info_prints_each_mode(capsys):
    from opensora_sdk.cli import main

    args = ["info", "--preset", "v1.2", "--prompt", "a cat", "--resolution", "480p", "--num-frames", "4s",
            "--device", "cuda", "--dtype", "bf16"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--fp8", "--block-swap", "4", "--offload", "model"]) == 0
    small = capsys.readouterr().out

    def peak(text):
        line = next(x for x in text.splitlines() if "estimated peak:" in x)
        return float(line.split("estimated peak:")[1].split()[0])

    assert peak(small) < peak(plain) / 2
    modes = next(x for x in small.splitlines() if x.startswith("memory modes:"))
    assert all(name in modes for name in estimates.MODES) and "(4 blocks on the GPU)" in modes
