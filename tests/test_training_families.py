"""Training STDiT2 (v1.1) and STDiT (v1.0) with training/train.py, and their sequence parallelism.

The checks: a few steps of each family change the weights with a finite IDDPM loss that
falls; the checkpoint loads with `OpenSoraPipeline.from_pretrained` / `load_transformer` and
generates; a resumed run equals an uninterrupted one bit for bit; the v1.1 / v1.0 data settings
(W / H aspect ratio, native fps, mask ratios, one fixed size); STDiT2 and STDiT sharded over 2
gloo processes equal one process (outputs and gradients to 1e-5); the trainer with sp_size 2
trains STDiT2 like one process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from test_distributed import free_port, max_err, rank_env, spawn
from test_training_e2e import Trainer, log_rows, tensors

from opensora_sdk import distributed
from opensora_sdk.configs import STDiT2Config, STDiTConfig
from opensora_sdk.models.stdit import STDiT
from opensora_sdk.models.stdit2 import STDiT2
from opensora_sdk.training import synthetic

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train.py"
CONFIGS = REPO / "training" / "configs"
TOL = 1e-5


@pytest.fixture(scope="module")
def trainer():
    threads = torch.get_num_threads()
    yield Trainer()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clips")
    return synthetic.generate_dataset(out, 8, size=32, num_frames=20, seed=0, image_fraction=0.0)


# The tiny recipes shrunk: 32x32 clips, 4-frame buckets of 2 (v1.1) or a fixed 4x32x32 (v1.0).
SETS = {
    "v1.1": ["data.extra_resolutions={32px: 1024}", "data.buckets={32px: {4: [1.0, 2]}}"],
    "v1.0": ["model.config_overrides.input_size=[4, 4, 4]", "data.fixed_size={num_frames: 4, image_size: [32, 32], batch_size: 2}"],
}


def args_for(family, csv_path, out, *extra) -> list[str]:
    sets = [f"data.csv={csv_path}", "features.dir=null", "cpu_threads=1", "log_every=1", "ckpt_every=1000", *SETS[family]]
    argv = ["--config", str(CONFIGS / f"tiny_{family}_cpu.yaml"), "--output-dir", str(out)]
    for s in sets:
        argv += ["--set", s]
    return argv + list(extra)


# --------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family, model_class", [("v1.1", "STDiT2"), ("v1.0", "STDiT")])
def test_steps_change_the_weights_and_the_checkpoint_generates(family, model_class, trainer, clips, tmp_path):
    from opensora_sdk.models.auto import load_transformer
    from opensora_sdk.pipeline import OpenSoraPipeline

    summary = trainer.main(args_for(family, clips, tmp_path, "--max-steps", "12"))
    losses = [float(r["loss"]) for r in log_rows(tmp_path)]
    assert summary["step"] == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # the IDDPM loss (MSE + VB) falls
    folder = tmp_path / "checkpoints" / "step-00000012"
    model = load_transformer(folder / "ema")
    assert type(model).__name__ == model_class and model.config.model_max_length == 40
    torch.manual_seed(42)  # the run's seed: the weights it started from
    start = type(model)(model.config).state_dict()
    trained = load_transformer(folder / "model").state_dict()
    changed = [k for k in start if not torch.equal(trained[k], start[k])]
    assert len(changed) > 20 and any("attn_temp" in k for k in changed)
    tuned = trainer.main(args_for(family, clips, tmp_path / "tuned", "--max-steps", "1", "--set", f"model.from_pretrained={folder / 'ema'}",
                                  "--set", "model.config_overrides={}"))  # fine-tuning the checkpoint: family from its files
    assert tuned["step"] == 1 and math.isfinite(tuned["last_loss"])
    encoders = tmp_path / "random_encoders"  # the random frozen VAE / T5 the run trained with
    pipe = OpenSoraPipeline.from_pretrained(folder / "ema", encoders / "vae", encoders / "text_encoder", device="cpu",
                                            progress=False)  # fmt: skip
    assert pipe.family.name == family
    video = pipe("a red circle moves left", height=32, width=32, num_frames=4, num_steps=3, seed=0)
    assert video.frames.shape == (4, 32, 32, 3)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["v1.1", "v1.0"])
def test_resume_continues_exactly(family, trainer, clips, tmp_path):
    first, straight = tmp_path / "first", tmp_path / "straight"
    trainer.main(args_for(family, clips, first, "--max-steps", "2"))
    resumed = trainer.main(args_for(family, clips, first, "--max-steps", "6", "--resume", "latest"))  # crosses an epoch
    trainer.main(args_for(family, clips, straight, "--max-steps", "6"))
    assert resumed["step"] == 6 and resumed["epoch"] >= 1
    a, b = tensors(first / "checkpoints" / "step-00000006"), tensors(straight / "checkpoints" / "step-00000006")
    assert a.keys() == b.keys() and len(a) > 50
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert [r["loss"] for r in log_rows(first)] == [r["loss"] for r in log_rows(straight)]


@pytest.mark.slow
def test_precomputed_features_carry_the_v1_1_inputs(trainer, clips, tmp_path):
    features = tmp_path / "features"
    summary = trainer.main(args_for("v1.1", clips, tmp_path / "run", "--max-steps", "2", "--set", f"features.dir={features}"))
    index = json.loads((features / "index.json").read_text())
    assert summary["step"] == 2 and index["meta"]["fps_condition"] == "native"
    assert {e["fps"] for e in index["entries"]} == {24.0}  # the clips' own fps, not 24 // frame_interval 3


def test_family_inputs_and_data_settings(clips):
    from opensora_sdk.training import objectives
    from opensora_sdk.training.config import ModelSection
    from opensora_sdk.training.dataset import VideoTextDataset

    v11, v10, v12 = (objectives.model_family(ModelSection(preset=p)) for p in ("STDiT2-tiny", "STDiT-tiny", "STDiT3-tiny"))
    assert (v11.name, v10.name, v12.name) == ("v1.1", "v1.0", "v1.2")
    assert (v11.loss, v10.loss, v12.loss) == ("iddpm", "iddpm", "rflow")
    assert v10.iddpm_table_dtype == torch.float64 and v11.iddpm_table_dtype == torch.float32
    batch = {"height": torch.tensor([240, 240]), "width": torch.tensor([426, 426]), "num_frames": torch.tensor([16, 16]),
             "fps": torch.tensor([30.0, 30.0])}  # fmt: skip
    inputs = objectives.model_inputs(v11, batch, "cpu")
    assert inputs["ar"].tolist() == pytest.approx([426 / 240] * 2)  # W / H, as the v1.1 dataset fed it (sic)
    assert objectives.model_inputs(v11, batch, "cpu", "H/W")["ar"].tolist() == pytest.approx([240 / 426] * 2)
    assert objectives.model_inputs(v10, batch, "cpu") == {} and "ar" not in objectives.model_inputs(v12, batch, "cpu")
    native = VideoTextDataset(clips, frame_interval=3, native_fps=True)["0-4-32-32"]
    divided = VideoTextDataset(clips, frame_interval=3)["0-4-32-32"]
    assert (native["fps"], divided["fps"]) == (24.0, 8.0)
    with pytest.raises(ValueError, match="model.type='STDiT3' but model.preset='STDiT2-tiny' is an STDiT2"):
        objectives.model_family(ModelSection(preset="STDiT2-tiny", type="STDiT3"))
    with pytest.raises(ValueError, match="not IDDPM training settings"):
        objectives.make_objective(v11, {"use_timestep_transform": True})


def test_v1_1_mask_ratios_and_the_fixed_size():
    from opensora_sdk.training.buckets import BucketBatchSampler, FixedSize
    from opensora_sdk.training.masks import MaskGenerator, resolve_mask_ratios

    ratios = resolve_mask_ratios("v1.1")
    assert list(ratios)[0] == "identity" and ratios["identity"] == 0.75 and sum(ratios.values()) == pytest.approx(1.0)
    assert ratios["quarter_head_tail"] == ratios["image_head_tail"] == 0.05 and ratios["image_head"] == 0.025
    official = {"mask_no": 0.75, "mask_quarter_random": 0.025, "mask_quarter_head": 0.025, "mask_quarter_tail": 0.025,
                "mask_quarter_head_tail": 0.05, "mask_image_random": 0.025, "mask_image_head": 0.025,
                "mask_image_tail": 0.025, "mask_image_head_tail": 0.05}  # fmt: skip
    assert resolve_mask_ratios(official) == ratios
    masks = MaskGenerator("v1.1", seed=0).get_masks(torch.zeros(400, 4, 8, 2, 2))
    assert 0.68 < float(masks.all(1).float().mean()) < 0.82  # about 75% unmasked
    fixed = FixedSize(4, [32, 48], 2)
    sampler = BucketBatchSampler([(20, 90, 160), (1, 32, 32), (3, 16, 16), (50, 720, 1280)], fixed, seed=0)
    assert sampler.assign(0) == [("fixed", 4, "32x48"), None, ("fixed", 4, "32x48"), ("fixed", 4, "32x48")]  # images: no
    assert {k.split("-", 1)[1] for batch in sampler for k in batch} == {"4-32-48"}


def test_config_checks_name_the_family_rules(trainer, clips, tmp_path):
    with pytest.raises(ValueError, match="STDiT \\(v1.0\\) has no frame conditioning; set mask_ratios: null"):
        trainer.main(args_for("v1.0", clips, tmp_path, "--set", "mask_ratios=stage1", "--max-steps", "1"))
    with pytest.raises(ValueError, match="STDiT \\(v1.0\\) trains at one fixed size"):
        trainer.main(args_for("v1.1", clips, tmp_path, "--set", "model.preset=STDiT-tiny", "--set", "mask_ratios=null",
                              "--max-steps", "1"))  # fmt: skip
    with pytest.raises(ValueError, match="data.fixed_size=.*image_size: \\[H, W\\]"):
        trainer.main(args_for("v1.0", clips, tmp_path, "--set", "data.fixed_size={num_frames: 4}"))


# --------------------------------------------------------------------------------------------
# Sequence parallelism: STDiT2 and STDiT sharded over 2 processes vs one process
# --------------------------------------------------------------------------------------------


def sp_model(kind: str, heads: int, size: tuple[int, int, int]):
    torch.manual_seed(0)
    if kind == "STDiT2":
        model = STDiT2(STDiT2Config(hidden_size=12 * heads, depth=2, num_heads=heads, caption_channels=16, model_max_length=8))
    else:
        model = STDiT(STDiTConfig(input_size=size, hidden_size=16 * heads, depth=2, num_heads=heads, caption_channels=16,
                                  model_max_length=8))  # fmt: skip
    with torch.no_grad():  # break the zero / identity inits so that every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def sp_inputs(model, B: int, size, x_mask: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    T, H, W = size
    mask = torch.zeros(B, 8, dtype=torch.long)
    for b in range(B):
        mask[b, : [5, 8][b % 2]] = 1
    inputs = {"x": torch.randn(B, 4, T, H, W, generator=g), "timestep": torch.tensor([873.0, 12.0][:B]),
              "y": torch.randn(B, 1, 8, 16, generator=g), "mask": mask}  # fmt: skip
    if isinstance(model, STDiT2):
        full = lambda v: torch.full((B,), float(v))  # noqa: E731
        inputs.update(num_frames=full(3 * T), height=full(8 * H), width=full(8 * W), ar=full(W / H), fps=full(24))
        if x_mask:
            inputs["x_mask"] = torch.ones(B, T, dtype=torch.bool)
            inputs["x_mask"][:, 0] = False
    return inputs


def sp_case(group, *, kind, heads, mode, B, size, x_mask=False, checkpointing=False) -> dict:
    model = sp_model(kind, heads, size)
    model.enable_gradient_checkpointing(checkpointing)
    inputs = sp_inputs(model, B, size, x_mask)
    weight = torch.randn(B, 8, *size, generator=torch.Generator().manual_seed(3))

    def run():
        model.zero_grad(set_to_none=True)
        x = inputs["x"].clone().requires_grad_()
        out = model(**{**inputs, "x": x})
        (out * weight).sum().backward()
        return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_dx, ref_grads = run()
    model.set_sequence_parallel_group(group, mode)
    with distributed.count_communication() as sent:
        out, dx, _ = run()
    distributed.average_gradients(model.parameters(), group)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    return {"output": max_err(out, ref_out), "input grad": max_err(dx, ref_dx),
            "param grads": max(max_err(grads[n], ref_grads[n]) for n in ref_grads),
            "mode": model.sequence_parallel.mode, "bytes": sent.total}  # fmt: skip


# (T, H, W) latent sizes: (3, 4, 6) has S = 6 spatial tokens (even), (3, 6, 6) S = 9 (padded to 10).
SP_CASES = {
    "STDiT2-ulysses-B2-S6-xmask": dict(kind="STDiT2", heads=4, mode="ulysses", B=2, size=(3, 4, 6), x_mask=True),
    "STDiT2-auto-h3-B1-S9": dict(kind="STDiT2", heads=3, mode="auto", B=1, size=(3, 6, 6)),  # 3 heads: K/V all-gather
    "STDiT2-ulysses-B2-S9-xmask-checkpointing": dict(kind="STDiT2", heads=4, mode="ulysses", B=2, size=(2, 6, 6),
                                                     x_mask=True, checkpointing=True),  # fmt: skip
    "STDiT-ulysses-B2-S9": dict(kind="STDiT", heads=4, mode="ulysses", B=2, size=(3, 6, 6)),
    "STDiT-allgather_kv-B1-S6": dict(kind="STDiT", heads=4, mode="allgather_kv", B=1, size=(2, 4, 6)),
}


def sp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, world, port))
    torch.set_num_threads(1)
    info = distributed.init_from_env(timeout_s=120)
    results = {}
    for name, kw in SP_CASES.items():
        try:
            results[name] = sp_case(info.group, **kw)
        except Exception:
            results[name] = traceback.format_exc()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def test_sharded_stdit2_and_stdit_equal_one_process(tmp_path):
    spawn(sp_worker, (2, free_port(), str(tmp_path)), 2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    bad = {}
    for name in SP_CASES:
        for r, res in enumerate(results):
            assert not isinstance(res[name], str), f"rank {r}, case {name}:\n{res[name]}"
            assert res[name]["bytes"] > 0  # the shards did talk
        errors = {k: max(res[name][k] for res in results) for k in ("output", "input grad", "param grads")}
        if max(errors.values()) > TOL:
            bad[name] = errors
    assert not bad, bad
    modes = {name: results[0][name]["mode"] for name in SP_CASES}
    assert modes["STDiT2-auto-h3-B1-S9"] == "allgather_kv" and modes["STDiT-ulysses-B2-S9"] == "ulysses"


def test_sequence_parallel_modes_and_the_identity_without_a_group():
    model = sp_model("STDiT2", 4, (2, 4, 4))
    model.set_sequence_parallel_group(None)
    assert model.sequence_parallel is None
    with pytest.raises(ValueError, match="mode='dsp' is not available for STDiT2 / STDiT"):
        model.set_sequence_parallel_group(None, "dsp")


@pytest.mark.slow
def test_trainer_with_sp_size_2_matches_one_process_for_stdit2(trainer, clips, tmp_path):
    """2 processes, sp_size 2 (one SP group, dp 1) train STDiT2 on the batches one process trains on."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip
    # mask_ratios: conditioning frames (x_mask) in some samples. optim.eps: AdamW maps a gradient g
    # to about lr * g / (|g| + eps), so with the config's eps 1e-8 and lr 5e-4 a weight whose
    # gradient is near 0 moves by up to 5e4 x the rounding difference of the two runs' summation
    # orders (1e-10 -> 5e-6); eps 1e-6 keeps that under 1e-7 and still normalises every gradient
    # above 1e-6 (a wrong scale shows in the grad norms below)
    argv = ["--max-steps", "3", "--set", "mask_ratios={image_head: 0.5}", "--set", "optim.eps=1e-6"]
    cmd = [*launch, str(TRAIN), *args_for("v1.1", clips, tmp_path / "sp2", *argv, "--set", "sp_size=2")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "sp 2: SequenceParallel(size=2, mode='ulysses')" in result.stderr  # the tokens were sharded
    trainer.main(args_for("v1.1", clips, tmp_path / "one", *argv))
    summary = json.loads((tmp_path / "sp2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3 and summary["ranks_in_sync"]
    rows = [log_rows(tmp_path / d) for d in ("one", "sp2")]
    assert len(rows[0]) == 3
    for a, b in zip(*rows):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)
        assert float(b["grad_norm"]) == pytest.approx(float(a["grad_norm"]), rel=1e-5)  # Adam alone would hide a scale
    a, b = (load_file(str(tmp_path / d / "checkpoints" / "step-00000003" / "model" / "model.safetensors")) for d in ("one", "sp2"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
