"""Evaluation (`opensora eval ...`): metrics against hand-computed values, the VBench combination on
a worked example, and each command on small real files with the built-in tiny models."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from opensora_sdk.cli import main
from opensora_sdk.evaluation import loss, metrics, vae_eval, vbench

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_VAE = ROOT / "opensora_sdk" / "builtin" / "tiny" / "vae"



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core machine two threads per process stall each other (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def rows_of(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# PSNR, SSIM, LPIPS, FloLPIPS
# --------------------------------------------------------------------------------------------


def test_psnr_by_hand():
    a = torch.zeros(2, 3, 16, 16)
    b = torch.full((2, 3, 16, 16), 0.1)  # MSE 0.01 -> 20 log10(1 / 0.1) = 20 dB
    assert metrics.psnr_frames(a, b).tolist() == pytest.approx([20.0, 20.0], abs=1e-6)  # 0.1 in float32
    c = b.clone()
    c[1] = 0.0  # an identical frame: 100 (official)
    assert metrics.psnr_frames(a, c).tolist() == pytest.approx([20.0, 100.0])


def test_ssim_by_hand_and_against_the_official_opencv_algorithm():
    a, b = torch.full((1, 3, 20, 20), 0.2), torch.full((1, 3, 20, 20), 0.4)
    # flat images: sigmas 0, so SSIM = (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1)
    expected = (2 * 0.2 * 0.4 + 0.01**2) / (0.2**2 + 0.4**2 + 0.01**2)
    assert metrics.ssim_frames(a, b).item() == pytest.approx(expected, rel=1e-7)  # 0.2, 0.4 in float32
    assert metrics.ssim_frames(a, a).item() == pytest.approx(1.0)
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 24, 30))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)

    def official(img1, img2):  # eval/vae's ssim: filter2D with the cv2 Gaussian, 5-pixel border cropped
        k = cv2.getGaussianKernel(11, 1.5)
        w = np.outer(k, k.transpose())
        mu1, mu2 = cv2.filter2D(img1, -1, w)[5:-5, 5:-5], cv2.filter2D(img2, -1, w)[5:-5, 5:-5]
        s1 = cv2.filter2D(img1**2, -1, w)[5:-5, 5:-5] - mu1**2
        s2 = cv2.filter2D(img2**2, -1, w)[5:-5, 5:-5] - mu2**2
        s12 = cv2.filter2D(img1 * img2, -1, w)[5:-5, 5:-5] - mu1 * mu2
        m = ((2 * mu1 * mu2 + 0.01**2) * (2 * s12 + 0.03**2)) / ((mu1**2 + mu2**2 + 0.01**2) * (s1 + s2 + 0.03**2))
        return m.mean()

    ref = [np.mean([official(x[t, c], y[t, c]) for c in range(3)]) for t in range(2)]
    assert metrics.ssim_frames(torch.from_numpy(x), torch.from_numpy(y)).tolist() == pytest.approx(ref, rel=1e-9)


def test_lpips_loads_torchvision_format_weights_and_is_zero_on_equal_frames(tmp_path):
    random_net = metrics.LPIPS.random("alex", seed=1)
    state = {f"features.{k}": v for k, v in random_net.features.state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision checkpoints also hold the classifier
    torch.save(state, tmp_path / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(random_net.lins)}, tmp_path / "lin.pth")
    net = metrics.LPIPS.from_files(tmp_path / "alexnet.pth", "alex", tmp_path / "lin.pth")
    x, y = torch.rand(2, 3, 3, 48, 48).unbind(0)
    assert torch.equal(net(x * 2 - 1, y * 2 - 1), random_net(x * 2 - 1, y * 2 - 1))
    values = metrics.lpips_frames(net, x, y)
    assert values.shape == (3,) and (values > 0).all()
    assert metrics.lpips_frames(net, x, x).abs().max() == 0
    assert metrics.lpips_frames(net, y, x).tolist() == pytest.approx(values.tolist(), rel=1e-5)  # symmetric
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        metrics.LPIPS.from_files(tmp_path / "missing.pth")


def test_lpips_matches_the_lpips_package(golden, tmp_path):
    """Parity with `lpips.LPIPS(net="alex")` 0.1.4 (golden `lpips_alex`: the package's lin weights on a
    seeded random AlexNet trunk), loaded through the files the CLI reads. Bitwise equal with one
    thread (torch 2.13 and 2.14); with 2+ threads the convolutions move the maps by <= 3e-7
    relative, so 1e-5 relative is float32 round-off with a 30x margin, not a loose fit."""
    g = golden("lpips_alex")
    state = g.with_prefix("sd.")  # linK.model.1.weight as in lpips'
    torch.save(metrics.seeded_backbone_state("alex", g.meta["seed"]), tmp_path / "alexnet.pth")  # the maker's trunk
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, tmp_path / "alex_lin.pth")
    net = metrics.LPIPS.from_files(tmp_path / "alexnet.pth", "alex", tmp_path / "alex_lin.pth")
    close = dict(rtol=1e-5, atol=1e-8)
    for pair in g.meta["pairs"]:
        p = pair["name"]
        a, b = g[f"in.{p}.a"], g[f"in.{p}.b"]  # [N, 3, H, W] in [0, 1]; the package got normalize=True: 2x - 1
        with torch.no_grad():
            layers = net.layer_diffs(a * 2 - 1, b * 2 - 1)  # per layer [N, 1, h_l, w_l]
            spatial_map = net(a * 2 - 1, b * 2 - 1)  # [N, 1, H, W]
        for k, d in enumerate(layers):  # spatial=False terms, to see where a mismatch starts
            torch.testing.assert_close(d.mean((2, 3), keepdim=True), g[f"mid.{p}.layer{k}"], **close, msg=lambda m: f"{p} layer {k}: {m}")
        torch.testing.assert_close(sum(d.mean((2, 3), keepdim=True) for d in layers), g[f"out.{p}.value"], **close)
        torch.testing.assert_close(spatial_map, g[f"out.{p}.map"], **close, msg=lambda m: f"{p} spatial map: {m}")
        frames = metrics.lpips_frames(net, a, b)  # the eval's per-frame value: mean of the spatial map
        torch.testing.assert_close(frames, g[f"out.{p}.map"].flatten(1).mean(1).double(), **close)


def test_flolpips_weights_feature_differences_by_the_flow_difference():
    net = metrics.LPIPS.random("alex")
    gt, rec = torch.rand(2, 3, 3, 64, 64).unbind(0)
    zero = lambda a, b: np.zeros((2, *a.shape[:2]), np.float32)  # noqa: E731 - equal flows: uniform weights
    same = metrics.flolpips_frames(net, gt, rec, zero)
    assert same.shape == (2,)
    plain = [sum(d.mean().item() for d in net.layer_diffs(gt[t : t + 1] * 2 - 1, rec[t : t + 1] * 2 - 1)) for t in range(2)]
    assert same.tolist() == pytest.approx(plain, rel=1e-5)

    def left_half(a, b):  # gt frames move only in the left half, reconstructions not at all
        f = np.zeros((2, *a.shape[:2]), np.float32)
        if a.mean() == gt_mean[0]:
            f[0, :, : a.shape[1] // 2] = 1.0
        return f

    gt_mean = [(gt[0].permute(1, 2, 0) * 255).numpy().mean()]
    weighted = metrics.flolpips_frames(net, gt, rec, left_half)
    layers = net.layer_diffs(gt[:1] * 2 - 1, rec[:1] * 2 - 1)
    by_hand = 0.0
    for d in layers:
        w = torch.zeros_like(d)
        w[..., : d.shape[-1] // 2] = 1.0  # bilinear resizing of a half-plane step keeps most of it on the left
        flow = torch.zeros(1, 2, 64, 64)
        flow[0, 0, :, :32] = 1.0
        mag = torch.nn.functional.interpolate(flow, size=d.shape[-2:], mode="bilinear", align_corners=False).norm(dim=1, keepdim=True)
        by_hand += float((d * mag / mag.sum()).sum())
    assert weighted[0].item() == pytest.approx(by_hand, rel=1e-5)
    assert metrics.flolpips_frames(net, gt, gt, zero).abs().max() == 0


# --------------------------------------------------------------------------------------------
# VBench combination: a worked example
# --------------------------------------------------------------------------------------------


def t2v_at_minimum() -> dict:
    return {name.replace(" ", "_"): lo for name, (lo, _, _, _) in vbench.T2V_TABLE.items()}


def test_vbench_total_quality_semantic_on_a_worked_example(tmp_path):
    raw = t2v_at_minimum()
    raw["subject_consistency"] = 0.5731  # (0.5731 - 0.1462) / (1 - 0.1462) = 0.5
    raw["dynamic_degree"] = 0.6  # 0.6 x weight 0.5 = 0.3
    raw["scene"] = 0.4111  # 0.4111 / 0.8222 = 0.5
    out = vbench.combine_t2v(raw)
    quality = (0.5 + 0.3) / 6.5  # 0.1230769...
    semantic = 0.5 / 9  # 0.0555...
    assert out["quality score"] == pytest.approx(quality, abs=1e-4)
    assert out["semantic score"] == pytest.approx(semantic, abs=1e-4)
    assert out["total score"] == pytest.approx((4 * quality + semantic) / 5, abs=1e-4)  # 0.10957...
    assert out["total score"] == pytest.approx(0.10957, abs=1e-5)
    everything_max = {name: hi for name, (_, hi, _, _) in vbench.T2V_TABLE.items()}
    assert vbench.combine_t2v(everything_max)["total score"] == pytest.approx(1.0)
    del raw["color"]
    with pytest.raises(ValueError, match="color"):
        vbench.combine_t2v(raw)


def test_vbench_i2v_combination_and_tabulation_files(tmp_path):
    raw = {k: hi for k, (_, hi, _, _) in vbench.I2V_TABLE.items()}
    raw["i2v_subject"] = 0.5731  # scaled 0.5
    raw["camera_motion"] = 0.0  # reported, in no aggregate
    out = vbench.combine_i2v(raw)
    assert out["i2v score"] == pytest.approx(0.75, abs=1e-4)
    assert out["quality score"] == pytest.approx(1.0) and out["total score"] == pytest.approx(0.875, abs=1e-4)
    raw = t2v_at_minimum()
    raw["subject_consistency"] = 0.5731
    for dim in raw:  # the vbench package's per-dimension result files
        (tmp_path / f"{dim}_eval_results.json").write_text(json.dumps({dim: [raw[dim], [{"video_path": "x.mp4"}]]}))
    assert main(["eval", "vbench", "--tabulate", str(tmp_path)]) == 0
    items = json.loads((tmp_path / "scaled_results.json").read_text())["items"]
    assert list(items[0]) == ["total score"] and items[0]["total score"] == f"{4 / 5 * 0.5 / 6.5 * 100:.2f}%"
    assert json.loads((tmp_path / "all_results.json").read_text())["subject consistency"] == "0.5731"


# --------------------------------------------------------------------------------------------
# The commands on real files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from opensora_sdk.training import synthetic

    folder = tmp_path_factory.mktemp("eval_data")
    return synthetic.generate_dataset(folder, 2, size=64, num_frames=20, seed=0)


def test_eval_vae_reports_psnr_ssim_lpips_flolpips_per_video(clips, tmp_path, capsys):
    from opensora_sdk.data import table
    from opensora_sdk.models.vae import VideoAutoencoder

    columns, rows = table.read_meta(clips)
    rows.append({**rows[0], "path": "no_such.mp4"})
    meta = table.write_rows(rows, tmp_path / "val.csv", columns)
    for row in rows[:2]:
        (tmp_path / row["path"]).parent.mkdir(exist_ok=True)
        (tmp_path / row["path"]).write_bytes((clips.parent / row["path"]).read_bytes())
    vae = VideoAutoencoder.from_pretrained(BUILTIN_VAE, dtype=torch.float32)
    pytest.importorskip("cv2")
    from opensora_sdk.data.motion import farneback_flow

    summary = vae_eval.evaluate(meta, vae, tmp_path / "vae.csv", num_frames=3, resolution=64, mode="spatial",
                                video_metrics=vae_eval.VideoMetrics(metrics.LPIPS.random(), farneback_flow), progress=False)  # fmt: skip
    out = rows_of(tmp_path / "vae.csv")
    assert list(out[0]) == ["path", "num_frames", "psnr", "ssim", "lpips", "flolpips"] and len(out) == 2
    gt = vae_eval.load_clip(tmp_path / rows[0]["path"], 3, 64, 64)
    rec = vae_eval.reconstruct(vae, gt, "spatial")
    assert float(out[0]["psnr"]) == pytest.approx(metrics.psnr_frames(gt, rec).mean().item(), rel=1e-9)
    assert summary["videos"] == 2 and summary["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in out]))
    assert json.loads((tmp_path / "vae_summary.json").read_text())["ssim"] == pytest.approx(summary["ssim"])
    assert "no_such.mp4" in rows_of(tmp_path / "vae_errors.csv")[0]["path"]
    # the whole v1.2 pipeline through the CLI (PSNR and SSIM only without an LPIPS backbone)
    assert main(["eval", "vae", str(meta), "--vae", str(BUILTIN_VAE), "--num-frames", "5", "--resolution", "64",
                 "-o", str(tmp_path / "pipe.csv"), "--no-progress"]) == 0  # fmt: skip
    assert list(rows_of(tmp_path / "pipe.csv")[0]) == ["path", "num_frames", "psnr", "ssim"]
    assert main(["eval", "vae", str(meta), "--vae", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_loss_per_bucket_at_the_ten_official_timesteps(tmp_path):
    from opensora_sdk.pipeline import OpenSoraPipeline
    from opensora_sdk.training import synthetic

    assert loss.eval_timesteps() == pytest.approx([1000 * k / 11 for k in range(1, 11)], rel=1e-6)  # the official ten
    data = synthetic.generate_dataset(tmp_path / "data", 2, size=32, num_frames=20, seed=0)
    pipe = OpenSoraPipeline.from_preset(device="cpu", dtype=torch.float32)
    buckets = {"32px": {17: [1.0, 2], 1: [1.0, 4]}}
    summary = loss.evaluate(pipe, data, tmp_path / "loss.csv", buckets=buckets, extra_resolutions={"32px": 1024},
                            progress=False)  # fmt: skip
    rows = rows_of(tmp_path / "loss.csv")
    assert [(r["resolution"], r["num_frames"], r["samples"]) for r in rows] == [("32px", "17", "2"), ("32px", "1", "0")]
    t_losses = [float(rows[0][f"loss_t{t:g}"]) for t in loss.eval_timesteps()]
    assert list(rows[0])[4:6] == ["loss_t90.9091", "loss_t181.818"] and len(t_losses) == 10
    assert float(rows[0]["loss"]) == pytest.approx(np.mean(t_losses))
    assert summary["empty_buckets"] == ["32pxx1"]  # videos never fill the image bucket
    again = loss.evaluate(pipe, data, tmp_path / "loss.csv", buckets=buckets, extra_resolutions={"32px": 1024},
                          progress=False)  # fmt: skip
    assert again == summary
    assert summary["buckets"]["32pxx17"] == pytest.approx(float(rows[0]["loss"])) and math.isfinite(summary["mean_loss"])


@pytest.mark.slow
def test_eval_sample_names_files_officially_and_resumes(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right\na blue square\nnot used\n")
    args = ["eval", "sample", "--prompt-path", str(prompts), "--end-index", "2", "--prompt-as-path", "--num-sample", "2",
            "--num-sampling-steps", "1", "--num-frames", "1", "--save-dir", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["a blue square-0.png", "a blue square-1.png", "a red circle moving right-0.png", "a red circle moving right-1.png"]
    (tmp_path / "out" / "a blue square-1.png").unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "3 of 4 samples exist; generating 1" in capsys.readouterr().err
    one = ["eval", "sample", "a green triangle", "--num-sampling-steps", "1", "--num-frames", "1",
           "--save-dir", str(tmp_path / "one"), "--no-progress"]  # fmt: skip
    assert main(one) == 0 and [p.name for p in (tmp_path / "one").iterdir()] == ["sample_0000.png"]


def test_sample_names_and_seeds():
    from opensora_sdk.evaluation.sample import sample_path, sample_seed

    assert sample_path("d", None, 7, "a cat", False, 1, 0, ".mp4") == Path("d/sample_0007.mp4")
    assert sample_path("d", "run", 7, "a cat", False, 5, 3, ".mp4") == Path("d/run_0007-3.mp4")
    assert sample_path("d", None, 7, "a cat", True, 5, 3, ".mp4") == Path("d/a cat-3.mp4")
    assert sample_path("d", None, 7, "a cat", True, 1, 0, ".mp4") == Path("d/a cat.mp4")
    assert [sample_seed(42, i, k, 2) for i in (0, 1) for k in (0, 1)] == [42, 43, 44, 45]


# --------------------------------------------------------------------------------------------
# The official VAE training stages as configs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_vae():
    name = "opensora_train_vae_for_eval_tests"
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / "train_vae.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


TINY = ["vae_2d.block_out_channels=[8, 8, 8, 8]", "vae_2d.layers_per_block=1", "vae_2d.norm_num_groups=4",
        "vae_temporal.filters=4", "vae_temporal.num_res_blocks=1", "vae_temporal.num_groups=2",
        "vae_temporal.channel_multipliers=[1, 2, 2, 4]", "data_csv=x.csv", "lpips_backbone=random", "lpips_net=alex"]  # fmt: skip


@pytest.mark.parametrize("stage, trained, frozen", [(1, "temporal", "spatial"), (2, "temporal", None), (3, "joint", None)])
def test_official_vae_stages_train_the_right_parts(train_vae, stage, trained, frozen):
    cfg = train_vae.load_config(ROOT / "training" / "configs" / f"vae_stage{stage}.yaml", TINY)
    s = getattr(cfg, trained)
    assert [st for st in train_vae.STAGES if getattr(cfg, st).steps] == [trained]
    assert (s.lr, s.batch_size, s.grad_clip, s.reduction) == (1e-5, 1, 1.0, "official")
    assert s.frames == (33 if stage == 3 else 17) and cfg.image_size == [256, 256]
    torch.manual_seed(0)
    vae = train_vae.build_vae(cfg)
    gen = torch.Generator().manual_seed(0)
    size = 64 if stage == 3 else 16  # AlexNet (the perceptual term) needs 64 pixels
    clips = torch.randint(0, 255, (2, 9, size, size, 3), dtype=torch.uint8)
    s.frames = 3 if stage == 3 else 5
    cache = train_vae.cache_2d_posteriors(vae, clips, 2) if stage == 1 else None
    params = train_vae.trainable(trained, vae, s)
    loss, logs = train_vae.stage_loss(trained, vae, clips, s, gen, cache, train_vae.build_perceptual(cfg))
    loss.backward()
    assert math.isfinite(loss.item())
    has_grad = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())  # noqa: E731
    assert has_grad(vae.temporal_vae)
    assert has_grad(vae.spatial) == (frozen is None)  # stage 1 keeps the 2D VAE frozen
    assert len(params) == len(list(vae.temporal_vae.parameters())) + (len(list(vae.spatial.parameters())) if frozen is None else 0)


def test_stage3_without_lpips_weights_is_a_clear_error(train_vae):
    with pytest.raises(ValueError, match="lpips_backbone"):
        train_vae.load_config(ROOT / "training" / "configs" / "vae_stage3.yaml", ["data_csv=x.csv"])
