"""Step caching: reuse transformer work across sampling steps (approximate; off by default).

Two methods behind one option, `cache=`:

    "teacache:0.1"   TeaCacheConfig(0.1): skip the whole block stack of STDiT3 at a step
                     whose input barely changed, reusing the residual of the last computed step
    "pab"            PABConfig(): broadcast (reuse) spatial / temporal / cross-attention outputs
                     over a few steps in the middle of the schedule (Pyramid Attention Broadcast)
    None, "none"     off: the plain path, bit for bit

`parse_cache` turns the string form (or a config object) into a config, once, at the edge;
a plan carries it (`GenerationPlan.cache`) and `generation.sample_clip` opens a fresh state
for every clip (`attach`), so loops, clips and generations never share cached tensors.

TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model", arXiv:2411.19108; github.com/ali-vilab/TeaCache). The indicator of a step is the
first spatial block's modulated input m = t2i_modulate(norm1(x), shift_msa, scale_msa)
[B, T, S, C], computed from the embedded tokens (cheap: one norm). Per row b,

    d_b = mean|m_b - m_b(previous step)| / mean|m_b(previous step)|
    acc_b += poly(d_b)                    (poly rescales d to the change of the model output)
    acc_b < threshold: skip, x_out = x + residual_b;  else compute, acc_b = 0,
                       residual_b = blocks(x)_b - x_b

The first and last steps are always computed. `poly` is a polynomial (highest power first):
for Open-Sora 1.2 (STDiT3-XL/2) the published fit of the TeaCache authors,
`OPEN_SORA_V1_2_COEFFICIENTS` (their eval/teacache/experiments/opensora.py, used with
thresholds 0.1 "slow" and 0.2 "fast"); for the built-in model ours, `BUILTIN_COEFFICIENTS`
(`benchmarks/bench_cache.py --fit` fits them); for other models the identity, d itself,
unless coefficients are given.

Decisions are per row of the transformer's batch and the blocks run on the rows that need
them only. Under classifier-free guidance the batch is [cond; uncond] with the same latent
and timestep in both halves, so both halves have the same indicator and are decided
together; each half keeps its own residual (the halves' outputs differ through the text).
Per row also means a sample's decisions do not depend on the other samples of its batch
(up to floating-point differences of a smaller matmul when only some rows compute).
A frame mask (`x_mask`) that changes between steps (a condition frame starts being
regenerated) forces the rows whose mask changed to compute, as does a change of shape.

PAB (Zhao et al., "Real-Time Video Generation with Pyramid Attention Broadcast",
arXiv:2408.12588; the Open-Sora defaults of github.com/NUS-HPC-AI-Lab/VideoSys): inside the
window of timesteps `timestep_range` (model time, [450, 930] of 1000), the output of each
attention kind is computed once and reused for the next `interval - 1` steps, with the
intervals of the pyramid spatial 2, temporal 4, cross 6 (cross-attention changes least).
Outside the window every attention is computed; a changing frame mask or shape recomputes
everything at that step. Decisions are per step (the same for every row), as in the paper.

Threshold 0 (and a PAB window that holds no step) computes everything: the output is the
uncached output, bit for bit. Supported for v1.2 models (STDiT3) in one process.

    stats = CacheStats()                      # counts over every clip it is given to
    with attach(transformer, parse_cache("teacache:0.1"), num_steps=30, timesteps=ts, stats=stats):
        ...sample...                          # transformer.step_cache / blocks' attention_cache set
    print(stats.summary())
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from opensora_sdk.models.layers import t2i_modulate

# The TeaCache authors' fit for Open-Sora 1.2 (STDiT3-XL/2, 30 rectified-flow steps), highest
# power first: rescaled = sum(c_i * d^(4-i)). Source: github.com/ali-vilab/TeaCache,
# eval/teacache/experiments/opensora.py (TeaCache, arXiv:2411.19108).
OPEN_SORA_V1_2_COEFFICIENTS = (2.17546007e02, -1.18329252e02, 2.68662585e01, -4.59364272e-02, 4.84426240e-02)
# Our fit for the built-in tiny model (20 steps, guidance 5), on uncached runs of six prompts of
# its training triples: `python benchmarks/bench_cache.py --fit` prints it (not fitted at run time).
BUILTIN_COEFFICIENTS = (1.30151, -3.39918, 1.95273, 1.30749, 0.0130831)
COEFFICIENT_SETS = {"open-sora-v1.2": OPEN_SORA_V1_2_COEFFICIENTS, "builtin": BUILTIN_COEFFICIENTS, "identity": (1.0, 0.0)}
# "auto": the set fitted for a model of this (hidden_size, depth, caption_channels); others: identity
AUTO_COEFFICIENTS = {(1152, 28, 4096): "open-sora-v1.2", (128, 4, 64): "builtin"}

# Pyramid Attention Broadcast defaults for Open-Sora (VideoSys' OpenSoraPABConfig).
PAB_INTERVALS = (2, 4, 6)  # spatial, temporal, cross
PAB_TIMESTEP_RANGE = (450.0, 930.0)
ATTENTION_KINDS = ("spatial", "temporal", "cross")

FORMS = ("'none', 'teacache:THRESHOLD' (e.g. teacache:0.1; optionally teacache:0.1:identity, :builtin or "
         ":open-sora-v1.2 for the rescaling), 'pab' or 'pab:SPATIAL,TEMPORAL,CROSS' (broadcast intervals in "
         "steps, e.g. pab:2,4,6), or a TeaCacheConfig / PABConfig")


# --------------------------------------------------------------------------------------------
# Configs and the string form
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeaCacheConfig:
    """Skip the block stack while the accumulated rescaled change stays under `threshold`.

    coefficients: "auto" (the published Open-Sora 1.2 fit for STDiT3-XL/2, ours for the built-in
    model's size, the identity for other sizes), "open-sora-v1.2", "builtin", "identity", or a
    polynomial as numbers, highest power first.
    """

    threshold: float
    coefficients: str | tuple[float, ...] = "auto"

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"TeaCacheConfig threshold={t!r} is not allowed: expected a finite number >= 0 "
                             "(0 = compute every step; the published Open-Sora settings are 0.1 and 0.2)")
        c = self.coefficients
        if isinstance(c, str):
            if c != "auto" and c not in COEFFICIENT_SETS:
                raise ValueError(f"TeaCacheConfig coefficients={c!r} is not allowed: use 'auto', "
                                 f"{', '.join(map(repr, COEFFICIENT_SETS))} or a tuple of numbers (highest power first)")
        else:
            try:
                values = tuple(float(v) for v in c)
            except (TypeError, ValueError):
                values = ()
            if not values or not all(math.isfinite(v) for v in values):
                raise ValueError(f"TeaCacheConfig coefficients={c!r} is not allowed: expected 'auto', a named set or "
                                 "a non-empty tuple of finite numbers (highest power first)")
            object.__setattr__(self, "coefficients", values)

    @property
    def spec(self) -> str:
        tail = "" if self.coefficients == "auto" else f":{self.coefficients}" if isinstance(self.coefficients, str) else ":custom"
        return f"teacache:{self.threshold:g}{tail}"

    def polynomial(self, transformer) -> tuple[float, ...]:
        """The rescaling polynomial for `transformer` (resolving "auto" by its size)."""
        c = self.coefficients
        if c == "auto":
            config = transformer.config
            c = AUTO_COEFFICIENTS.get((config.hidden_size, config.depth, config.caption_channels), "identity")
        return COEFFICIENT_SETS[c] if isinstance(c, str) else c


@dataclass(frozen=True)
class PABConfig:
    """Broadcast attention outputs: each kind is computed once per `*_interval` steps inside
    `timestep_range` (model time, low..high inclusive); 1 = never reused."""

    spatial_interval: int = PAB_INTERVALS[0]
    temporal_interval: int = PAB_INTERVALS[1]
    cross_interval: int = PAB_INTERVALS[2]
    timestep_range: tuple[float, float] = PAB_TIMESTEP_RANGE

    def __post_init__(self):
        for kind in ATTENTION_KINDS:
            v = getattr(self, f"{kind}_interval")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PABConfig {kind}_interval={v!r} is not allowed: expected an integer >= 1 "
                                 "(steps each output is used for; 1 = always computed)")
        r = self.timestep_range
        ok = isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r)
        if not ok or not r[0] <= r[1]:
            raise ValueError(f"PABConfig timestep_range={r!r} is not allowed: expected (low, high) in model time "
                             "[0, 1000] with low <= high, e.g. (450, 930)")
        object.__setattr__(self, "timestep_range", (float(r[0]), float(r[1])))

    def interval(self, kind: str) -> int:
        return getattr(self, f"{kind}_interval")

    @property
    def spec(self) -> str:
        s = f"pab:{self.spatial_interval},{self.temporal_interval},{self.cross_interval}"
        return s if self.timestep_range == PAB_TIMESTEP_RANGE else s + f":{self.timestep_range[0]:g}-{self.timestep_range[1]:g}"


CacheConfig = TeaCacheConfig | PABConfig


def parse_cache(value) -> CacheConfig | None:
    """None / "none" / "" -> None; a config object as is; the string forms (see `FORMS`):
    "teacache:0.1", "teacache:0.1:identity", "pab", "pab:2,4,6", "pab:2,4,6:450-930"."""
    if value is None or isinstance(value, (TeaCacheConfig, PABConfig)):
        return value
    if not isinstance(value, str):
        raise ValueError(f"cache={value!r} is not allowed: use {FORMS}")
    text = value.strip().lower()
    if text in ("", "none", "off"):
        return None
    method, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if method == "teacache" and 1 <= len(parts) <= 2:
            return TeaCacheConfig(float(parts[0]), parts[1] if len(parts) == 2 else "auto")
        if method == "pab" and len(parts) <= 2:
            kwargs = {}
            if parts:
                intervals = [int(v) for v in parts[0].split(",")]
                if len(intervals) != 3:
                    raise ValueError("pab takes three intervals: spatial,temporal,cross")
                kwargs.update(zip((f"{k}_interval" for k in ATTENTION_KINDS), intervals))
            if len(parts) == 2:
                low, high = parts[1].split("-")
                kwargs["timestep_range"] = (float(low), float(high))
            return PABConfig(**kwargs)
    except ValueError as err:
        if "Config" in str(err):  # a value of the right form out of range: the config says why
            raise ValueError(f"cache={value!r} is not allowed: {err}") from None
    raise ValueError(f"cache={value!r} is not allowed: use {FORMS}")


# --------------------------------------------------------------------------------------------
# What a cache saved
# --------------------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """Counts over every clip a cache ran for.

    forwards: transformer calls (one per sampling step); rows: the rows of those calls (2B per
    step under guidance); rows_computed: rows that ran the block stack (TeaCache skips the
    others); attention: kind -> [computed, total] attention calls (PAB).
    """

    method: str = ""
    forwards: int = 0
    rows: int = 0
    rows_computed: int = 0
    attention: dict[str, list[int]] = field(default_factory=dict)

    @property
    def rows_skipped(self) -> int:
        return self.rows - self.rows_computed

    @property
    def block_stack_reduction(self) -> float:
        """rows / rows_computed: how many times fewer block-stack evaluations than uncached."""
        return self.rows / self.rows_computed if self.rows_computed else math.inf if self.rows else 1.0

    def summary(self) -> str:
        """One line, e.g. "step cache teacache:0.1: block stack ran for 24 of 40 rows (16 skipped, 1.67x fewer)"."""
        line = (f"step cache {self.method}: block stack ran for {self.rows_computed} of {self.rows} rows x steps "
                f"({self.rows_skipped} skipped, {self.block_stack_reduction:.2f}x fewer)")
        if self.attention:
            parts = [f"{k} {c}/{t}" for k, (c, t) in self.attention.items()]
            line += "; attention computed " + ", ".join(parts)
        return line


# --------------------------------------------------------------------------------------------
# Per-clip states (what the STDiT3 hooks call)
# --------------------------------------------------------------------------------------------


def _rows(t, index: torch.Tensor):
    """Rows `index` of a tensor, or of every tensor in nested lists / tuples (None stays None)."""
    if t is None:
        return None
    if isinstance(t, (list, tuple)):
        return type(t)(_rows(v, index) for v in t)
    return t[index]


def _mask_changed(previous, x_mask, rows: int) -> torch.Tensor | None:
    """[rows] bool: rows whose frame mask differs from the previous step's; None: all of them."""
    if (previous is None) != (x_mask is None):
        return None
    if x_mask is None:
        return torch.zeros(rows, dtype=torch.bool)
    if previous.shape != x_mask.shape:
        return None
    return (previous != x_mask).any(1).cpu()


class TeaCacheState:
    """The TeaCache decisions and residuals of one clip (see the module docstring)."""

    def __init__(self, config: TeaCacheConfig, polynomial: Sequence[float], num_steps: int, stats: CacheStats):
        self.threshold = float(config.threshold)
        self.polynomial = tuple(float(c) for c in polynomial)
        self.num_steps = num_steps
        self.stats = stats
        self.step = 0
        self.accumulated: list[float] = []
        self.previous: torch.Tensor | None = None  # modulated input [R, T, S, C] of the last step
        self.residual: torch.Tensor | None = None  # blocks(x) - x [R, N, C] of each row's last computed step
        self.x_mask: torch.Tensor | None = None

    def rescale(self, d: float) -> float:
        out = 0.0
        for c in self.polynomial:  # Horner
            out = out * d + c
        return out

    def decide(self, modulated: torch.Tensor, x_mask, shape) -> list[bool]:
        """Which rows compute at this step (and the bookkeeping of the indicator)."""
        R = modulated.shape[0]
        step, self.step = self.step, self.step + 1
        changed = _mask_changed(self.x_mask, x_mask, R)
        fresh = (
            self.threshold <= 0 or step == 0 or step >= self.num_steps - 1 or changed is None
            or self.previous is None or self.previous.shape != modulated.shape
            or self.residual is None or tuple(self.residual.shape) != tuple(shape)
        )
        if fresh:
            compute = [True] * R
            self.accumulated = [0.0] * R
        else:
            prev = self.previous.float()
            d = ((modulated.float() - prev).abs().flatten(1).mean(1) / prev.abs().flatten(1).mean(1)).tolist()
            changed = changed.tolist()
            compute = []
            for b in range(R):
                self.accumulated[b] += self.rescale(d[b])
                compute.append(changed[b] or not self.accumulated[b] < self.threshold)
        self.accumulated = [0.0 if c else a for c, a in zip(compute, self.accumulated)]
        self.previous, self.x_mask = modulated, x_mask
        return compute

    def run_blocks(self, model, x, y, y_valid, t_mlp, T, S, x_mask=None, t0_mlp=None, rope=None, text_kv=None):
        """`model.run_blocks` on the rows that need it; the others reuse their residual. x [R, T*S, C];
        text_kv: the per-generation cross-attention keys / values (rows first) or None."""
        R, N, C = x.shape
        block = model.spatial_blocks[0]
        shift, scale = block.modulation(t_mlp, x_mask, t0_mlp)[:2]
        modulated = t2i_modulate(block.norm1(x).view(R, T, S, C), shift, scale)  # [R, T, S, C]
        compute = self.decide(modulated, x_mask, x.shape)
        n = sum(compute)
        self.stats.forwards += 1
        self.stats.rows += R
        self.stats.rows_computed += n
        if n == R:  # the plain call, on the whole batch
            out = model.run_blocks(x, y, y_valid, t_mlp, T, S, x_mask, t0_mlp, rope, text_kv)
            self.residual = out - x
            return out
        out = x + self.residual
        if n:
            index = torch.tensor([b for b in range(R) if compute[b]], device=x.device)
            part = model.run_blocks(x[index], y[index], _rows(y_valid, index), t_mlp[index], T, S,
                                    _rows(x_mask, index), _rows(t0_mlp, index), rope, _rows(text_kv, index))  # fmt: skip
            out[index] = part
            self.residual[index] = part - x[index]
        return out


class PABState:
    """The attention outputs of one clip and which of them the current step reuses."""

    def __init__(self, config: PABConfig, timesteps: Sequence[float], stats: CacheStats):
        self.config = config
        self.timesteps = [float(t) for t in timesteps]
        self.stats = stats
        self.step = 0
        self.reuse = dict.fromkeys(ATTENTION_KINDS, False)
        self.last_computed = dict.fromkeys(ATTENTION_KINDS, -(10**9))
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}
        self.x_mask = None
        self.shape = None
        for kind in ATTENTION_KINDS:
            stats.attention.setdefault(kind, [0, 0])

    def run_blocks(self, model, x, y, y_valid, t_mlp, T, S, x_mask=None, t0_mlp=None, rope=None, text_kv=None):
        """Decide this step's broadcasts, then the plain block stack (the blocks call `attention`)."""
        step, self.step = self.step, self.step + 1
        low, high = self.config.timestep_range
        inside = step < len(self.timesteps) and low <= self.timesteps[step] <= high
        changed = _mask_changed(self.x_mask, x_mask, x.shape[0])
        fresh = changed is None or bool(changed.any()) or self.shape != tuple(x.shape)
        for kind in ATTENTION_KINDS:
            reuse = inside and not fresh and step - self.last_computed[kind] < self.config.interval(kind)
            self.reuse[kind] = reuse
            if not reuse:
                self.last_computed[kind] = step
        self.x_mask, self.shape = x_mask, tuple(x.shape)
        self.stats.forwards += 1
        self.stats.rows += x.shape[0]
        self.stats.rows_computed += x.shape[0]
        return model.run_blocks(x, y, y_valid, t_mlp, T, S, x_mask, t0_mlp, rope, text_kv)

    def attention(self, block, kind: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The block's attention output of `kind`: this step's `compute()`, or the broadcast one."""
        key = (id(block), kind)
        counts = self.stats.attention[kind]
        counts[1] += 1
        if self.reuse[kind] and key in self.outputs:
            return self.outputs[key]
        counts[0] += 1
        out = self.outputs[key] = compute()
        return out


# --------------------------------------------------------------------------------------------
# Attaching a state to a transformer for one clip
# --------------------------------------------------------------------------------------------


def check_supported(transformer, config: CacheConfig) -> None:
    """A clear error for models and set-ups the cache does not support."""
    if not hasattr(transformer, "spatial_blocks") or not hasattr(transformer, "step_cache"):
        raise ValueError(f"cache={config.spec!r}: step caching is supported for v1.2 models (STDiT3), not "
                         f"{type(transformer).__name__}; leave cache out")
    if getattr(transformer, "sequence_parallel", None) is not None:
        raise ValueError(f"cache={config.spec!r} is not supported with sequence parallelism (decisions would differ "
                         "between ranks); leave cache out or run in one process")


@contextmanager
def attach(transformer, config: CacheConfig | None, *, num_steps: int, timesteps: Sequence[float],
           stats: CacheStats | None = None):
    """A fresh cache state on `transformer` (and its blocks, for PAB) while inside; yields it
    (None when `config` is None: nothing changes). `num_steps`: transformer calls of the clip
    (the first and last always compute); `timesteps`: the model time of each call (PAB's window).
    `stats` (a `CacheStats`) accumulates the counts."""
    if config is None:
        yield None
        return
    check_supported(transformer, config)
    stats = CacheStats(config.spec) if stats is None else stats
    stats.method = stats.method or config.spec
    blocks = [*transformer.spatial_blocks, *transformer.temporal_blocks]
    if isinstance(config, TeaCacheConfig):
        state = TeaCacheState(config, config.polynomial(transformer), num_steps, stats)
    else:
        state = PABState(config, timesteps, stats)
    previous = transformer.step_cache, [b.attention_cache for b in blocks]
    transformer.step_cache = state
    if isinstance(state, PABState):
        for b in blocks:
            b.attention_cache = state
    try:
        yield state
    finally:
        transformer.step_cache = previous[0]
        for b, value in zip(blocks, previous[1]):
            b.attention_cache = value


__all__ = [
    "ATTENTION_KINDS",
    "CacheStats",
    "OPEN_SORA_V1_2_COEFFICIENTS",
    "PABConfig",
    "PABState",
    "TeaCacheConfig",
    "TeaCacheState",
    "attach",
    "check_supported",
    "parse_cache",
]
