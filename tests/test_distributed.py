"""Sequence parallelism on CPU (gloo), 2 and 3 processes: the collectives' autograd, STDiT3
sharded in every mode against the single-process model (outputs and parameter gradients to
1e-5), a sampling run, and failure handling (a failing or stuck rank never hangs the others).

The multi-process cases run in one process group per world size (module fixtures); each rank
computes the single-process reference itself and reports its errors, the tests assert on them.
"""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from opensora_sdk import collectives, distributed
from opensora_sdk.configs import STDiT3Config
from opensora_sdk.models.stdit3 import STDiT3

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, **extra) -> dict:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank), **extra}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Cases run on every rank (group: the world group of P processes)
# --------------------------------------------------------------------------------------------


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max(1, max |b|)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def primitives_case(group) -> dict[str, float]:
    """Each collective against its definition on a global tensor, forward and backward."""
    P, r = distributed.group_size(group), distributed.group_rank(group)
    g = torch.Generator().manual_seed(1)
    errors = {}
    # all_to_all: global X [P*2, 3, P*4]; rank r holds X[:, :, r-th chunk] and receives X[r-th chunk, :, :].
    X, G = (torch.randn(2 * P, 3, 4 * P, generator=g, dtype=torch.float64) for _ in range(2))
    x = X.chunk(P, 2)[r].clone().requires_grad_()
    y = distributed.all_to_all(x, group, scatter_dim=0, gather_dim=2)  # [2, 3, 4P]
    y.backward(G.chunk(P, 0)[r])
    errors["all_to_all forward"] = max_err(y, X.chunk(P, 0)[r])
    errors["all_to_all backward"] = max_err(x.grad, G.chunk(P, 2)[r])  # the inverse all-to-all
    # round trip is the identity
    z = distributed.all_to_all(distributed.all_to_all(x, group, 0, 2), group, 2, 0)
    errors["all_to_all round trip"] = max_err(z, x)
    # split / gather with the spec's scaling, on a tensor replicated over ranks
    for scale, factor in (("down", 1 / P), ("up", P), (None, 1)):
        x = X.clone().requires_grad_()
        y = distributed.split_forward_gather_backward(x, 0, group, scale)
        y.backward(G.chunk(P, 0)[r])  # rank r's upstream gradient for its chunk
        errors[f"split forward ({scale})"] = max_err(y, X.chunk(P, 0)[r])
        errors[f"split backward ({scale})"] = max_err(x.grad, G * factor)
        c = X.chunk(P, 2)[r].clone().requires_grad_()
        y = distributed.gather_forward_split_backward(c, 2, group, scale)
        y.backward(G)
        errors[f"gather forward ({scale})"] = max_err(y, X)
        errors[f"gather backward ({scale})"] = max_err(c.grad, G.chunk(P, 2)[r] * factor)
    # all_gather: backward sums the upstream gradients of every rank (rank q's is G * (q + 1))
    c = X.chunk(P, 1)[0].chunk(P, 0)[r].clone().requires_grad_()
    y = distributed.all_gather(c, 0, group)
    y.backward(G.chunk(P, 1)[0] * (r + 1))
    errors["all_gather backward"] = max_err(c.grad, G.chunk(P, 1)[0].chunk(P, 0)[r] * sum(range(1, P + 1)))
    return errors


def tiny_model(heads: int, depth: int = 2, seed: int = 0) -> STDiT3:
    cfg = STDiT3Config(hidden_size=8 * heads, depth=depth, num_heads=heads, caption_channels=16, model_max_length=8)
    torch.manual_seed(seed)
    model = STDiT3(cfg).eval()
    with torch.no_grad():  # break the identity init of temporal blocks so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def model_inputs(model: STDiT3, B: int, T: int, H: int, W: int, x_mask: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    mask = torch.zeros(B, cfg.model_max_length, dtype=torch.long)
    for b in range(B):
        mask[b, : [5, 8, 3][b % 3]] = 1  # rows with different caption lengths
    y = torch.randn(B, 1, cfg.model_max_length, cfg.caption_channels, generator=g)
    inputs = dict(x=torch.randn(B, cfg.in_channels, T, H, W, generator=g), y=y, mask=mask,
                  timestep=torch.tensor([873.5, 120.25, 500.0][:B]), fps=torch.full((B,), 24.0),
                  height=torch.full((B,), 8.0 * H), width=torch.full((B,), 8.0 * W))  # fmt: skip
    if x_mask:
        inputs["x_mask"] = torch.ones(B, T, dtype=torch.bool)
        inputs["x_mask"][:, 0] = False  # a conditioning frame
        inputs["x_mask"][-1, -1] = False
    return inputs


def model_case(group, *, heads, mode, B, T, H, W, x_mask, checkpointing=False, seed=0) -> dict[str, float]:
    """Forward output, input gradient and parameter gradients: SP vs single process."""
    model = tiny_model(heads)
    model.enable_gradient_checkpointing(checkpointing)
    inputs = model_inputs(model, B, T, H, W, x_mask, seed=seed)
    weight = torch.randn(B, 2 * model.config.in_channels, T, H, W, generator=torch.Generator().manual_seed(3))

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
    return {
        "output": max_err(out, ref_out),
        "input grad": max_err(dx, ref_dx),
        "param grads": max(max_err(grads[n], ref_grads[n]) for n in ref_grads),
        "mode": model.sequence_parallel.mode,
        "bytes": sent.total,
    }


def sampling_case(group) -> dict[str, float]:
    """A 3-step CFG sampling run with a conditioning frame: SP latent vs single-process latent."""
    from opensora_sdk.sampling import sample
    from opensora_sdk.schedulers.rflow import RectifiedFlow

    model = tiny_model(heads=4)
    inputs = model_inputs(model, 1, 3, 6, 6, x_mask=False, seed=5)
    steps = RectifiedFlow(num_sampling_steps=3).timesteps(1, height=48, width=48, num_frames=9, device=torch.device("cpu"))
    frame_mask = torch.tensor([[0.0, 1.0, 1.0]])
    null = model.y_embedder.y_embedding[None, None]

    def run():
        gen = torch.Generator().manual_seed(11)  # the same seed on every rank: the same noise
        z = torch.randn(inputs["x"].shape, generator=gen)
        kwargs = {k: inputs[k] for k in ("fps", "height", "width")}
        with torch.no_grad():
            return sample(model, z, steps, y=inputs["y"], y_null=null, y_mask=inputs["mask"], guidance_scale=4.0,
                          frame_mask=frame_mask, model_kwargs=kwargs, generator=gen)  # fmt: skip

    ref = run()
    model.set_sequence_parallel_group(group)
    return {"latent": max_err(run(), ref)}


def pipeline_case(group) -> dict[str, float]:
    """The pipeline (tiny-random preset, CFG, 2 VAE chunks): SP latent and frames vs one process."""
    from opensora_sdk.pipeline import OpenSoraPipeline

    def run(sp_group):
        pipe = OpenSoraPipeline.from_preset("tiny-random", device="cpu", progress=False, sp_group=sp_group)
        last = {}
        with distributed.count_communication() as sent:
            video = pipe("a red panda", height=64, width=64, num_frames=34, num_steps=3, seed=7,
                         callback=lambda i, n, latent, denoised: last.update(z=latent.clone()))  # fmt: skip
        return last["z"], torch.from_numpy(video.frames).int(), sent.total

    z_ref, frames_ref, _ = run(None)
    z, frames, sent = run(group)
    return {"latent": max_err(z, z_ref), "frames": float((frames - frames_ref).abs().max()), "bytes": sent}


def random_seed_case(group) -> dict[str, float]:
    """seed=None through the Python API: every rank draws its own random seed, the SDK agrees on
    rank 0's, and the sharded video equals one process run with that seed."""
    from opensora_sdk.pipeline import OpenSoraPipeline

    kwargs = dict(height=64, width=64, num_frames=17, num_steps=2)
    sharded = OpenSoraPipeline.from_preset("tiny-random", device="cpu", progress=False, sp_group=group)
    video = sharded("a red panda", seed=None, **kwargs)
    seed = int(video.metadata["seed"])
    alone = OpenSoraPipeline.from_preset("tiny-random", device="cpu", progress=False)("a red panda", seed=seed, **kwargs)
    diff = float((torch.from_numpy(video.frames).int() - torch.from_numpy(alone.frames).int()).abs().max())
    return {"frames": diff, "seed": float(seed)}


def model_cases(P: int) -> dict[str, dict]:
    """name -> kwargs of model_case. S = (H/2)*(W/2): 6 divides by 2 and 3, 4 and 9 do not."""
    even, odd = (6, 4), (6, 6) if P == 2 else (4, 4)  # (H, W): S = 6 | S = 9 (P=2) or 4 (P=3)
    cases = {}
    for mode, heads in (("ulysses", 6), ("auto", 4), ("dsp", 4)):
        for B, (H, W), xm in ((1, even, False), (2, odd, True), (2, even, True), (1, odd, False)):
            S = (H // 2) * (W // 2)
            cases[f"{mode}-h{heads}-B{B}-S{S}{'-xmask' if xm else ''}"] = dict(heads=heads, mode=mode, B=B, T=3, H=H, W=W, x_mask=xm)
    cases["ulysses-checkpointing"] = dict(heads=6, mode="ulysses", B=2, T=2, H=odd[0], W=odd[1], x_mask=True, checkpointing=True)
    return cases


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, world, port))
    torch.set_num_threads(1)
    info = distributed.init_from_env(timeout_s=120)
    results = {}
    jobs = {"primitives": lambda: primitives_case(info.group), "sampling": lambda: sampling_case(info.group),
            "pipeline": lambda: pipeline_case(info.group), "random_seed": lambda: random_seed_case(info.group)}  # fmt: skip
    jobs.update({name: (lambda kw=kw: model_case(info.group, **kw)) for name, kw in model_cases(world).items()})
    for name, job in jobs.items():
        try:
            results[name] = job()
        except Exception:
            results[name] = traceback.format_exc()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    distributed.shutdown()


def spawn(fn, args: tuple, nprocs: int) -> None:
    """mp.spawn that also asserts every process exited with status 0 (a signal at exit, such as
    SIGABRT after the last step, fails the test too)."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    while not context.join():  # raises ProcessRaisedException / ProcessExitedException on the first failure
        pass
    codes = [p.exitcode for p in context.processes]
    assert codes == [0] * nprocs, f"exit statuses {codes}"


def run_world(P: int, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp(f"sp{P}")
    spawn(worker, (P, free_port(), str(out)), P)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(P)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"{p}procs")
def world(request, tmp_path_factory):
    return request.param, run_world(request.param, tmp_path_factory)


def errors_of(results: list[dict], name: str) -> dict:
    for r, res in enumerate(results):
        assert not isinstance(res[name], str), f"rank {r}, case {name}:\n{res[name]}"
    return {k: max(res[name][k] for res in results) for k in results[0][name] if k not in ("mode", "bytes")}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_primitives_match_their_definition_forward_and_backward(world):
    P, results = world
    errors = errors_of(results, "primitives")
    assert len(errors) == 16
    assert max(errors.values()) < 1e-12, errors


def test_sharded_stdit3_equals_single_process(world):
    P, results = world
    cases = model_cases(P)
    assert len(cases) == 13
    bad = {}
    for name in cases:
        errors = errors_of(results, name)
        assert set(errors) == {"output", "input grad", "param grads"}
        if max(errors.values()) > TOL:
            bad[name] = errors
    assert not bad, bad


def test_head_fallback_and_modes_are_the_ones_asked_for(world):
    P, results = world
    modes = {name: results[0][name]["mode"] for name in model_cases(P) if not isinstance(results[0][name], str)}
    assert all(results[r][name]["bytes"] > 0 for r in range(P) for name in modes)  # the shards did talk
    assert modes["ulysses-h6-B1-S6"] == "ulysses" and modes["dsp-h4-B1-S6"] == "dsp"
    assert modes["auto-h4-B1-S6"] == ("ulysses" if P == 2 else "allgather_kv")  # 4 heads over 3 ranks: K/V fallback


def test_sampling_gives_the_single_process_latent(world):
    P, results = world
    errors = errors_of(results, "sampling")
    assert errors["latent"] < TOL, errors


def test_a_random_seed_is_agreed_across_ranks_through_the_python_api(world):
    P, results = world
    for r, res in enumerate(results):
        assert not isinstance(res["random_seed"], str), f"rank {r}:\n{res['random_seed']}"
    assert len({res["random_seed"]["seed"] for res in results}) == 1  # every rank uses rank 0's draw
    assert max(res["random_seed"]["frames"] for res in results) <= 1  # = one process with that seed


def test_pipeline_gives_the_single_process_video(world):
    P, results = world
    errors = errors_of(results, "pipeline")
    assert errors["latent"] < TOL and errors["frames"] <= 1, errors  # uint8 frames: at most one step of rounding
    assert all(res["pipeline"]["bytes"] > 0 for res in results)


def test_torchrun_cli_writes_one_output_equal_to_one_process(tmp_path):
    args = ["generate", "--preset", "tiny-random", "--prompt", "a cat", "--image-size", "64", "64", "--num-frames", "1",
            "--num-sampling-steps", "2", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "opensora_sdk.cli", *args, "--save-dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    multi = subprocess.run([*torchrun, "-m", "opensora_sdk.cli", *args, "--save-dir", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert single.returncode == 0 and multi.returncode == 0, (single.stderr + multi.stderr)[-3000:]
    assert "2 processes" in multi.stderr and multi.stdout.count("sample_0000.png") == 1  # rank 0 alone reports
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["sample_0000.png"]
    from opensora_sdk.video_io import read_image

    a, b = (torch.from_numpy(read_image(tmp_path / d / "sample_0000.png").copy()).int() for d in ("one", "two"))
    assert a.shape == b.shape == (64, 64, 3) and int((a - b).abs().max()) <= 1


def mesh_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, world, port))
    torch.set_num_threads(1)
    distributed.init_from_env(timeout_s=120)
    mesh = distributed.make_mesh(2)
    again = distributed.make_mesh(2)  # made once: the same groups, no new ones
    same = again is mesh and distributed.sequence_parallel_group(2) is mesh.sp_group and again.dp_group is mesh.dp_group
    sums = [collectives._all_reduce(torch.tensor([float(rank)]), g).item() for g in (mesh.sp_group, mesh.dp_group)]
    # each SP group shards its own batch (inputs drawn from its dp rank)
    errors = model_case(mesh.sp_group, heads=4, mode="ulysses", B=1, T=2, H=6, W=6, x_mask=False, seed=mesh.dp_rank)
    torch.save({"mesh": (mesh.dp_size, mesh.sp_size, mesh.dp_rank, mesh.sp_rank), "sums": sums, "errors": errors,
                "same": same}, Path(out) / f"rank{rank}.pt")  # fmt: skip
    distributed.shutdown()


def test_a_dp_x_sp_mesh_of_4_processes(tmp_path):
    spawn(mesh_worker, (4, free_port(), str(tmp_path)), 4)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    assert all(r["same"] for r in results)  # a second make_mesh / sequence_parallel_group returns the same groups
    assert [r["mesh"] for r in results] == [(2, 2, 0, 0), (2, 2, 0, 1), (2, 2, 1, 0), (2, 2, 1, 1)]
    assert [r["sums"] for r in results] == [[1, 2], [1, 4], [5, 2], [5, 4]]  # SP {0,1} {2,3}; DP {0,2} {1,3}
    for r in results:
        assert max(v for k, v in r["errors"].items() if k not in ("mode", "bytes")) < TOL, r["errors"]


# ---- single-process checks ------------------------------------------------------------------


def test_everything_is_the_identity_without_a_group():
    x = torch.randn(4, 6, requires_grad=True)
    for y in (distributed.all_to_all(x, None, 0, 1), distributed.split_forward_gather_backward(x, 0, None, "down"),
              distributed.gather_forward_split_backward(x, 0, None, "up"), distributed.all_gather(x, 0, None)):  # fmt: skip
        assert y is x
    model = tiny_model(heads=4, depth=1)
    model.set_sequence_parallel_group(None)
    assert model.sequence_parallel is None
    info = distributed.init_from_env(environ={})
    assert (info.rank, info.world_size, info.group) == (0, 1, None)
    distributed.barrier(None)
    with distributed.fail_together():  # alone: nothing to tell anyone
        pass
    with pytest.raises(KeyError), distributed.fail_together():
        raise KeyError("its own error, unchanged")
    mesh = distributed.make_mesh(1)
    assert distributed.make_mesh(1) is mesh and mesh.sp_group is None
    distributed.shutdown()  # forgets the meshes
    assert distributed.make_mesh(1) is not mesh


def test_bad_arguments_name_the_value_and_the_choices():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="grad_scale='sideways'.*'down', 'up'"):
        distributed.split_forward_gather_backward(x, 0, None, "sideways")
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' must be an integer"):
        distributed.init_from_env(environ={"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        distributed.init_from_env(environ={"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ValueError, match=r"sp_size=2 must divide the number of processes \(1\); allowed: \[1\]"):
        distributed.make_mesh(2)
    with pytest.raises(ValueError, match="timeout_s=0 must be"):
        distributed.timeout_seconds(0)
    with pytest.raises(ValueError, match=r"exit_after_s=-1 must be a number of seconds > 0, or None"):
        distributed.fail_together(exit_after_s=-1)
    from opensora_sdk.models.stdit3_parallel import SequenceParallel

    with pytest.raises(ValueError, match="mode='diagonal' is not known"):
        SequenceParallel(None, 4, "diagonal")


# ---- failure handling: no hang ----------------------------------------------------------------

FAILING_RANK = textwrap.dedent(
    """
    import os, sys, time, torch
    from opensora_sdk import distributed
    torch.set_num_threads(1)
    info = distributed.init_from_env(timeout_s=float(os.environ["TEST_TIMEOUT_S"]))
    model = __import__("test_distributed").tiny_model(heads=4, depth=1)
    model.set_sequence_parallel_group(info.group)
    inputs = __import__("test_distributed").model_inputs(model, 1, 2, 4, 4, x_mask=False)
    model(**inputs)  # one good step together
    if info.rank == 1:
        print(f"failing at {time.time()}", flush=True)
        if os.environ["TEST_FAILURE"] == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        time.sleep(300)  # stuck: never calls the next collective
    model(**inputs)
    print("finished without noticing", flush=True)
    """
)


@pytest.mark.parametrize("failure", ["raise", "stuck"])
def test_a_failing_rank_brings_the_others_down_with_a_clear_message(failure, tmp_path):
    port, timeout_s = free_port(), 4.0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TEST_TIMEOUT_S": str(timeout_s), "TEST_FAILURE": failure}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", FAILING_RANK], env={**env, **rank_env(r, 2, port)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]  # fmt: skip
    outs = ["", ""]
    try:
        outs[0], _ = procs[0].communicate(timeout=120)
        ended_at = time.time()
    finally:
        for r, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
            out, _ = p.communicate()
            outs[r] = outs[r] or out
    out0 = outs[0]
    assert procs[0].returncode != 0, out0
    assert "finished without noticing" not in out0
    assert "CollectiveError" in out0 and "failed on rank 0" in out0 and "a peer process probably raised" in out0, out0[-2000:]
    # rank 0 ended within 60 s of rank 1's failure (process start-up on a loaded machine not counted)
    failed_at = float(re.search(r"failing at ([0-9.]+)", outs[1]).group(1))
    assert ended_at - failed_at < 60, (failed_at, ended_at)


# ---- fail_together: one rank's error stops every rank, with that error ------------------------

FAIL_TOGETHER = textwrap.dedent(
    """
    import os, time, torch
    from opensora_sdk import distributed
    torch.set_num_threads(1)
    then = os.environ["TEST_THEN"]
    info = distributed.init_from_env(timeout_s=120)
    try:
        with distributed.fail_together(info.group, exit_after_s=3.0), distributed.fail_together():  # nested: inert
            distributed.all_gather(torch.ones(2), 0, info.group)  # a collective together
            if info.rank == 0 and then != "nothing fails":
                print(f"failing at {time.time()}", flush=True)
                raise OSError("cannot write out/sample_0000.mp4: disk full")  # rank 0's save fails
            if then == "barrier":
                distributed.barrier(info.group)
            elif then == "compute":  # in Python code, far from any collective
                while True:
                    sum(range(1000))
            elif then == "torch barrier":  # a collective this module cannot interrupt: the fallback exit
                torch.distributed.barrier()
            print(f"rank {info.rank} went on", flush=True)
    finally:
        if info.rank == 0:
            time.sleep(float(os.environ["TEST_LINGER_S"]))  # the failing rank stays alive (or not)
        distributed.shutdown()
    """
)


@pytest.mark.parametrize("then, linger_s", [("barrier", 8.0), ("barrier", 0.0), ("compute", 8.0), ("torch barrier", 8.0),
                                            ("nothing fails", 0.0)])  # fmt: skip
def test_fail_together_stops_every_rank_with_the_first_error(then, linger_s, tmp_path):
    """Rank 0 raises after a collective while rank 1 goes on into a barrier (or computes): rank 1
    raises PeerError naming rank 0 and its error within seconds, even while rank 0 stays alive."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEST_THEN": then, "TEST_LINGER_S": str(linger_s)}
    port, start = free_port(), time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", FAIL_TOGETHER], env={**env, **rank_env(r, 2, port)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]  # fmt: skip
    ended, ended_at, outs = [0.0, 0.0], [0.0, 0.0], ["", ""]
    try:
        for r in (1, 0):
            outs[r], _ = procs[r].communicate(timeout=90)
            ended[r], ended_at[r] = time.monotonic() - start, time.time()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    codes = [p.returncode for p in procs]
    if then == "nothing fails":
        assert codes == [0, 0] and all("went on" in out for out in outs), (f"exit statuses {codes}", outs)
        return
    assert codes == [1, 1], (f"exit statuses {codes}", outs)  # the failing rank: its own error; the others: PeerError
    assert "OSError: cannot write out/sample_0000.mp4: disk full" in outs[0] and "PeerError" not in outs[0], outs[0][-2000:]
    assert "rank 0 failed" in outs[1] and "OSError: cannot write out/sample_0000.mp4: disk full" in outs[1], outs[1][-2000:]
    assert "went on" not in outs[1]
    assert ("PeerError" in outs[1]) == (then != "torch barrier")  # the fallback prints the error and exits
    if linger_s:
        assert ended[0] - ended[1] > 3.0, ended  # rank 1 did not wait for rank 0 to exit
    # every rank has ended within 30 s of the failure (process start-up on a loaded machine not counted)
    failed_at = float(re.search(r"failing at ([0-9.]+)", outs[0]).group(1))
    assert max(ended_at) - failed_at < 30, (failed_at, ended_at)


# ---- the trainer with sp_size=2 --------------------------------------------------------------


def test_trainer_with_sp_size_2_matches_one_process(tmp_path):
    """2 processes, sp_size 2 (one SP group, dp 1) train on the batches one process trains on."""
    from safetensors.torch import load_file

    from opensora_sdk.training import synthetic

    clips = synthetic.generate_dataset(tmp_path / "clips", 8, size=32, num_frames=20, seed=0, image_fraction=0.0)
    sets = [f"data.csv={clips}", "features.dir=null", "data.extra_resolutions={32px: 1024}",
            "data.buckets={32px: {17: [1.0, 2]}}", "cpu_threads=1", "log_every=1", "ckpt_every=1000"]  # fmt: skip
    argv = ["--config", str(REPO / "training" / "configs" / "tiny_cpu.yaml"), "--max-steps", "3"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    train = str(REPO / "training" / "train.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip
    runs = {"one": [sys.executable, train, *argv, "--output-dir", str(tmp_path / "one")],
            "sp2": [*launch, train, *argv, "--output-dir", str(tmp_path / "sp2"), "--set", "sp_size=2"]}
    for name, cmd in runs.items():
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (name, (result.stdout + result.stderr)[-3000:])
    import json

    summary = json.loads((tmp_path / "sp2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3 and summary["ranks_in_sync"]
    assert summary["last_loss"] == pytest.approx(json.loads((tmp_path / "one" / "summary.json").read_text())["last_loss"], rel=1e-5)
    logs = [(tmp_path / d / "logs" / "train_log.csv").read_text().splitlines() for d in ("one", "sp2")]
    norms = [[float(r["grad_norm"]) for r in csv.DictReader(rows)] for rows in logs]
    assert len(norms[0]) == 3 and norms[1] == pytest.approx(norms[0], rel=1e-5)  # Adam alone would hide a gradient scale
    a, b = (load_file(str(tmp_path / d / "checkpoints" / "step-00000003" / "model" / "model.safetensors")) for d in ("one", "sp2"))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("cross_attn.kv_linear.bias"):  # key half: zero gradient in exact math, Adam scales rounding noise
            a[key], b[key] = (t[t.shape[0] // 2 :] for t in (a[key], b[key]))
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
