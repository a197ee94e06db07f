"""Block swap and sequential offload: the schedule (which block is where before each block runs,
with a fake device mover) and the same video as the plain path (bitwise on the CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opensora_sdk.cli import main
from opensora_sdk.offload import BlockSwap, streamed_tensors, transformer_blocks
from opensora_sdk.pipeline import OpenSoraPipeline
from opensora_sdk.placement import Placement


class PoisonMover:
    """A fake device: a block "on the host" has NaN weights, "on the device" its real ones; it
    records where every block is when each block runs."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.real = {id(b): [t.data for t in streamed_tensors(b)] for b in blocks}
        self.on_device = set()
        self.log = []  # (event, block index)
        for b in blocks:
            self._poison(b)

    def _poison(self, block):
        for t in streamed_tensors(block):
            t.data = torch.full_like(t.data, float("nan"))

    def load(self, block):
        i = self.blocks.index(block)
        assert i not in self.on_device, f"block {i} loaded twice"
        for t, real in zip(streamed_tensors(block), self.real[id(block)]):
            t.data = real
        self.on_device.add(i)
        self.log.append(("load", i))

    def wait(self, block):
        self.log.append(("wait", self.blocks.index(block)))

    def unload(self, block):
        i = self.blocks.index(block)
        self._poison(block)
        self.on_device.discard(i)
        self.log.append(("unload", i))

    def release(self):
        pass


def toy_stack(n=6, width=16):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(n)])


@pytest.mark.parametrize("resident, prefetch", [(0, True), (2, True), (4, False), (6, True)])
def test_schedule_every_block_present_when_it_runs(resident, prefetch):
    stack = toy_stack()
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = stack(x)
    blocks = list(stack)
    mover = PoisonMover(blocks[resident:])  # resident blocks are real all along
    swap = BlockSwap(blocks, "cpu", resident, mover=mover, prefetch=prefetch)
    swap.attach()
    seen = []
    for i, block in enumerate(blocks):  # runs after the swap's own hook
        block.register_forward_pre_hook(lambda _m, _a, i=i: seen.append((i, set(mover.on_device))))
    with torch.no_grad():
        for _ in range(2):  # two forwards: the second starts from the same state
            assert torch.equal(stack(x), want)
            assert not mover.on_device
    # before each streamed block ran it was on the device, with at most itself and the next one
    for i, present in seen:
        if i >= resident:
            expect = {i, i + 1} if prefetch and i + 1 < len(blocks) else {i}
            assert present == {j - resident for j in expect}, (i, present)
    if prefetch and resident < len(blocks):  # the first streamed block is copied when a forward starts
        assert mover.log[0] == ("load", 0)
    # a submodule called outside its block's forward borrows the block and gives it back
    if resident < len(blocks):
        with torch.no_grad():
            got = blocks[-1][0](x @ torch.eye(16))
        assert torch.isfinite(got).all() and not mover.on_device
    swap.detach()
    assert not mover.on_device


def test_block_order_of_stdit3(pipe):
    blocks = transformer_blocks(pipe.transformer)
    t = pipe.transformer
    assert blocks == [t.spatial_blocks[0], t.temporal_blocks[0], t.spatial_blocks[1], t.temporal_blocks[1]]


def _video(pipe):
    """The final latents [1, C, T', h, w] (what the swap touches; the VAE does not stream)."""
    out = pipe("a red ball rolls", num_frames=17, height=32, width=32, num_steps=2, seed=5, output_type="latent")
    assert out.frames.abs().sum() > 0
    return out.frames


@pytest.fixture(scope="module")
def pipe():
    return OpenSoraPipeline.from_preset("tiny-random", seed=0, device="cpu", progress=False)


def test_block_swap_and_offload_give_the_plain_video(pipe):
    plain = _video(pipe)
    for setup in (lambda: pipe.enable_block_swap(1), lambda: pipe.enable_block_swap(0),
                  pipe.enable_sequential_cpu_offload, pipe.enable_model_cpu_offload):
        setup()
        assert torch.equal(_video(pipe), plain), pipe.placement
    pipe.disable_block_swap()
    pipe._set_placement(None, None, block_swap=None)
    assert torch.equal(_video(pipe), plain)


def test_diffusers_names_map_onto_one_placement(pipe):
    pipe.enable_block_swap(3)
    assert (pipe.placement.offload, pipe.placement.block_swap) == (None, 3)
    pipe.enable_model_cpu_offload()
    assert (pipe.placement.offload, pipe.placement.block_swap) == ("model", 3)
    pipe.enable_sequential_cpu_offload()
    assert (pipe.placement.offload, pipe.placement.block_swap) == ("sequential", None)
    assert pipe.placement.streamed_blocks("text_encoder") == 0
    pipe.enable_vae_slicing()
    assert pipe.vae.config.micro_batch_size == 1
    pipe.disable_vae_slicing()
    assert pipe.vae.config.micro_batch_size > 1
    pipe.enable_vae_tiling(128, 32)
    assert (pipe.vae_tiling.tile_size, pipe.vae_tiling.overlap) == (128, 32)
    pipe.disable_vae_tiling()
    pipe._set_placement(None, None, block_swap=None)


def test_bad_block_counts_are_one_clear_error(pipe):
    with pytest.raises(ValueError, match=r"block_swap=5 .* from 0 to 4"):
        pipe.enable_block_swap(5)
    with pytest.raises(ValueError, match=r"block_swap=-1 .* integer >= 0"):
        Placement("cpu", block_swap=-1)
    with pytest.raises(ValueError, match="exclude each other"):
        Placement("cpu", offload="sequential", block_swap=2)


def test_cli_rejects_bad_block_swap_before_loading(capsys, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(OpenSoraPipeline, "from_pretrained", no_loading)
    monkeypatch.setattr(OpenSoraPipeline, "from_preset", no_loading)
    for value in ("-1", "9"):
        code = main(["generate", "--prompt", "a cat", "--preset", "builtin", "--block-swap", value, "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and f"--block-swap={value}" in err and "from 0 to 8" in err, err


def test_stdit3_forward_with_poisoned_host_blocks(pipe):
    """Every streamed block of a real STDiT3 is loaded before it runs, in execution order."""
    t = pipe.transformer
    g = torch.Generator().manual_seed(1)
    c = t.config
    inputs = dict(x=torch.randn(2, c.in_channels, 3, 4, 4, generator=g), timestep=torch.tensor([700.0, 300.0]),
                  y=torch.randn(2, 1, c.model_max_length, c.caption_channels, generator=g), fps=24, height=32, width=32)
    with torch.no_grad():
        want = t(**inputs)
        blocks = transformer_blocks(t)
        mover = PoisonMover(blocks[1:])
        swap = BlockSwap(blocks, "cpu", 1, mover=mover).attach()
        try:
            got = t(**inputs)
        finally:
            swap.detach()
            for b, real in ((b, mover.real[id(b)]) for b in blocks[1:]):
                for p, r in zip(streamed_tensors(b), real):
                    p.data = r
    assert torch.equal(got, want)
    assert [i for e, i in mover.log if e == "load"] == [0, 1, 2]


def test_reused_text_keys_values_borrow_streamed_blocks(pipe):
    """The exact-reuse scope computes every block's text K/V before the blocks run: the
    streamed blocks come in for it and leave again; two steps equal the plain ones."""
    t = pipe.transformer
    if not hasattr(t, "step_invariants"):
        pytest.skip("this STDiT3 has no step-invariant reuse")
    g = torch.Generator().manual_seed(2)
    c = t.config
    x = torch.randn(2, c.in_channels, 2, 4, 4, generator=g)
    y = torch.randn(2, 1, c.model_max_length, c.caption_channels, generator=g)
    kw = dict(y=y, fps=24, height=32, width=32)
    with torch.no_grad():
        want = [t(x, torch.tensor([s, s]), **kw) for s in (800.0, 400.0)]
        blocks = transformer_blocks(t)
        mover = PoisonMover(blocks)
        swap = BlockSwap(blocks, "cpu", 0, mover=mover).attach()
        try:
            with t.step_invariants():
                got = [t(x, torch.tensor([s, s]), **kw) for s in (800.0, 400.0)]
        finally:
            swap.detach()
            for b in blocks:
                for p, r in zip(streamed_tensors(b), mover.real[id(b)]):
                    p.data = r
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not mover.on_device


def test_compiled_blocks_are_refused():
    stack = toy_stack(2)
    stack[1].compile()
    with pytest.raises(ValueError, match="torch.compile'd blocks"):
        BlockSwap(list(stack), "cpu", 0).attach()
