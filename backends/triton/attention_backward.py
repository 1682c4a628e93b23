"""`ft.attention_grad` on the Triton backends (cuda, rocm, interpret): flash-attention backward kernels.

The lowering writes one plan line per op,

    buf9, buf10, buf11 = flash_attention_backward(buf1, buf2, buf3, buf7, buf8, buf6, scale=0.125,
                                                  causal='upper_left', window=0)

calling a `FlashAttentionBackward` of the backend, which launches two kernels of
attention_kernel.py: `attention_backward_q` (per block of query rows: grad_q, and each row's
D = Σ grad_out·out) and then `attention_backward_kv` (per block of keys of one KV head:
grad_k and grad_v, the group's query heads summed in registers, no atomics).  Both
recompute p = exp(s − lse) from the forward's lse instead of reading a saved [Sq, Skv]
matrix, skip the blocks no row sees (causal, window) and mask only the blocks at the edges.
Seven products per visible block instead of five, yet faster here than adding grad_q
atomically from the KV kernel (FA2/FA3's way): on an H200 that variant took 1.7× as long
(995 against 579 µs, bf16 16×128 causal, length 4096; 13.4 against 7.0 ms at 16384), its
f32 atomics (a [BLOCK_M, D] tile per step) costing more than the two products they save.
Adding the tile through a tensor-descriptor reduction (the copy engine) instead measured the
same as atomics with the best tile: 527 against 494 µs at 4096, 7.0 against 7.2 ms at 16384,
5.9 against 4.9 ms for MLA — the KV kernel's fifth product and the transpose of grad_s, not
the adds, are what cost (results/attention_backward_fused_grad_q_h200_2026-11-29.json).
Both kernels run on a 1-D grid that starts one block of every head (a chunk of heads whose
operands fit in L2) before the next block, so the heaviest causal blocks start first
(`chunk_count`).  When the KV kernel's programs would leave most multiprocessors idle (MQA:
one KV head for many query heads) the group is split across programs, each writing f32
partial sums that are added afterwards.

Where a window keeps the keys a tile of query rows sees within one block (DeepSeek-V4's 128),
grad_q may come from `attention_backward_q_one_block` instead: like the one-block forward it
packs a GQA group's heads into the tile's rows, sums q·kᵀ and grad_out·vᵀ over CHUNK columns
at a time and writes grad_q CHUNK columns at a time, so at head dim 512 it needs no
[rows, 512] accumulator (V4's backward on an H200: 3.03 → 2.53 ms).  It is one more tuned
candidate of the Q kernel, not a rule.

The qk head dim is held as two power-of-two column blocks as in the forward (192 = 128 + 64),
the v head dim padded to a power of two (≥ 16); dims above MAX_HEAD_DIM, f64 and
dynamic head dims raise UnsupportedRegion (the op then runs its reference, counted).
Configurations come from the target's capabilities like the forward's, and on a GPU each
kernel's is timed once per shape class and remembered (`attention-tuning` namespace).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from flagtree.backends.base import Capabilities
from flagtree.backends.lowering import UnsupportedRegion
from flagtree.backends.triton.attention import (
    MIN_DOT,
    ONE_BLOCK_MAX_KEYS,
    SUPPORTED_DTYPES,
    ConfigTuner,
    benchmark_ms,
    chunk_count,
    dot_dtype,
    dtype_name,
    kernels_for,
    power_of_two_at_least,
    qk_column_blocks,
    strides_of,
    write_attention_call,
)
from flagtree.backends.triton.fixed_launch import FixedLaunch
from flagtree.backends.triton.library import Jit
from flagtree.ir.core import Operation
from flagtree.ir.ops.attention import sink_gradient
from flagtree.ir.types import TensorType
from flagtree.runtime.plan import PlanWriter
from flagtree.runtime.signatures import SignatureCache

MAX_HEAD_DIM = 512
# f32 registers per thread for the kernel's accumulators: MLA's KV kernel (grad_k 192 + grad_v 128
# columns) needs 160 for 64 keys on 4 warps or 128 keys on 8; on an H200 those took its KV
# kernel from 5035 to 3001-3134 µs against the best tile under a 128 limit
# (benchmarks/results/attention_backward_tiles_relaxed_h200_2026-11-29.json).
MAX_ACCUMULATOR_REGISTERS = 160
MAX_SCORE_REGISTERS = 64  # f32 registers per thread for the two [rows, keys] tiles of one step
_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}

# (BLOCK_M, BLOCK_N, num_warps, num_stages), most promising first: the fastest of an H200 sweep
# of every fitting tile (bf16, causal, head dims 128 and 192/128, length 4096), then the
# fastest for head dim 512 (DeepSeek-V4's MQA with window 128, the same sweep:
# benchmarks/results/attention_backward_tiles_*), then small shared memories.
# The KV kernel holds a block of keys and walks query rows; the Q kernel the reverse.
_KV_TILES = ((64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (64, 64, 8, 3), (64, 32, 4, 2), (32, 128, 8, 3),
             (64, 64, 8, 2), (16, 64, 4, 3), (16, 32, 4, 2), (32, 32, 8, 1), (16, 16, 4, 2), (32, 16, 8, 2),
             (16, 16, 8, 2), (16, 16, 4, 1))
_Q_TILES = ((128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 2), (64, 32, 4, 4), (64, 32, 4, 3), (128, 64, 8, 2),
            (128, 32, 8, 3), (32, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 8, 2), (16, 16, 4, 2),
            (16, 16, 4, 1))
# (BLOCK_M, num_warps, num_stages, columns per step) of the one-block Q kernel, most promising first.
_Q_ONE_BLOCK_TILES = ((64, 8, 2, 64), (64, 8, 3, 64), (64, 8, 1, 64), (32, 4, 2, 64), (16, 4, 2, 64))
TUNED_CANDIDATES = 6


@dataclass(frozen=True)
class BackwardClass:
    """What a backward kernel's configuration depends on: one tuning entry per class and kernel."""

    kernel: str  # "kv" | "q"
    dtype: str
    head_dqk: int
    head_dv: int
    causal: bool
    window: bool
    has_mask: bool
    group: int
    query_bucket: int  # Sq rounded up to a power of two
    key_bucket: int  # Skv rounded up to a power of two
    window_size: int = 0  # the window attribute (0: none)

    @property
    def max_pack(self) -> int:
        """The largest power of two dividing the group: that many heads share each K/V tile."""
        return self.group & -self.group

    def one_block_keys(self, positions: int) -> int | None:
        """The keys the one-block Q kernel holds for tiles of `positions` positions: every key
        they see, where a window keeps those few; None where it does not apply."""
        if not self.window_size:
            return None
        keys = max(MIN_DOT, power_of_two_at_least(min(self.key_bucket, self.window_size + positions - 1)))
        return keys if keys <= ONE_BLOCK_MAX_KEYS else None

    @property
    def dqk(self) -> int:
        """The columns the kernels hold for the qk head dim: two power-of-two blocks (192 = 128 + 64)."""
        return sum(qk_column_blocks(self.head_dqk))

    @property
    def dv(self) -> int:
        return max(MIN_DOT, power_of_two_at_least(self.head_dv))


@dataclass(frozen=True)
class BackwardConfig:
    """One launch configuration; with dim_chunk > 0 the one-block Q kernel (block_n is then the
    number of keys it holds, pack the query heads of a GQA group in a tile)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pack: int = 1
    dim_chunk: int = 0


def backward_fits(config: BackwardConfig, shape: BackwardClass, caps: Capabilities) -> bool:
    """Whether the kernel's tiles fit the target's shared memory and its f32 tiles the registers."""
    threads = config.num_warps * caps.warp_size
    if config.dim_chunk:  # two [rows, keys] f32 tiles; each step loads a chunk of rows and of keys
        shared = max(config.num_stages, 1) * (config.block_m + config.block_n) * config.dim_chunk \
            * _ELEMENT_BYTES[shape.dtype]
        return (2 * config.block_m * config.block_n / threads <= MAX_SCORE_REGISTERS
                and shared <= caps.shared_memory_bytes and threads <= caps.max_threads_per_block)
    width = shape.dqk + shape.dv
    # The kv kernel keeps a key block (K, V and both gradients) and streams query rows; q the reverse.
    held, streamed = (config.block_n, config.block_m) if shape.kernel == "kv" else (config.block_m, config.block_n)
    accumulators = held * (shape.dqk + shape.dv if shape.kernel == "kv" else shape.dqk) / threads
    scores = 2 * config.block_m * config.block_n / threads
    shared = (held + max(config.num_stages, 1) * streamed) * width * _ELEMENT_BYTES[shape.dtype]
    return (accumulators <= MAX_ACCUMULATOR_REGISTERS and scores <= MAX_SCORE_REGISTERS
            and shared <= caps.shared_memory_bytes and threads <= caps.max_threads_per_block)


def backward_candidates(shape: BackwardClass, caps: Capabilities) -> list[BackwardConfig]:
    """The configurations of one backward kernel that fit the target, most promising first;
    tiles longer than the sequences they cover are dropped unless nothing else fits."""
    tiles = _KV_TILES if shape.kernel == "kv" else _Q_TILES
    fitting = [c for c in (BackwardConfig(*t) for t in tiles) if backward_fits(c, shape, caps)]
    useful = [c for c in fitting if c.block_m <= max(shape.query_bucket, MIN_DOT)
              and c.block_n <= max(shape.key_bucket, MIN_DOT)]
    one_block = _one_block_candidates(shape, caps) if shape.kernel == "q" else []
    return one_block + (useful or fitting)


def _one_block_candidates(shape: BackwardClass, caps: Capabilities) -> list[BackwardConfig]:
    """The one-block Q kernel's configurations that fit, where the keys a tile sees fit one block."""
    configs = []
    for block_m, warps, stages, chunk in _Q_ONE_BLOCK_TILES:
        pack = min(shape.max_pack, block_m)
        keys = shape.one_block_keys(block_m // pack)
        if keys is not None:
            configs.append(BackwardConfig(block_m, keys, warps, stages, pack, chunk))
    return [c for c in configs if backward_fits(c, shape, caps)]


def head_split_count(programs: int, group: int, caps: Capabilities) -> int:
    """How many ways the KV kernel splits each group of query heads: the smallest power of two
    dividing the group that gives every multiprocessor a program (1 when the keys already do)."""
    multiprocessors = dict(caps.extra).get("multiprocessors", 1)
    splits = 1
    while programs * splits < multiprocessors and group % (2 * splits) == 0:
        splits *= 2
    return splits


def unsupported_reason(op: Operation, caps: Capabilities) -> str | None:
    """Why the backward kernels cannot run `op` on `caps`' target, or None."""
    q, _, v = (o.type for o in op.operands[:3])
    if not all(isinstance(t, TensorType) for t in (q, v)):
        return "q, k and v must be tensors"
    if q.dtype.name not in SUPPORTED_DTYPES or q.dtype.name not in caps.dtypes:
        return f"the flash-attention backward takes f32, f16 or bf16 that {caps.target} computes natively, " \
               f"not {q.dtype.name}"
    if q.shape[3] is None or v.shape[3] is None:
        return "the head dims must be static (they choose the kernels' tiles)"
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        return f"head dims {q.shape[3]}/{v.shape[3]}: the backward kernels take at most {MAX_HEAD_DIM}"
    for kernel in ("kv", "q"):
        shape = BackwardClass(kernel, q.dtype.name, q.shape[3], v.shape[3], False, False, False, 1, 2**16, 2**16)
        if not backward_candidates(shape, caps):
            return f"no {kernel} backward tile for head dims {q.shape[3]}/{v.shape[3]} fits {caps.target}"
    return None


class FlashAttentionBackward:
    """`ft.attention_grad` for one backend and target, called from launch plans.

    Like the forward, a call's sizes, strides and constexprs are worked out once per signature
    (shapes, strides, dtypes, attributes) and replayed; configurations once per shape class.
    """

    def __init__(self, backend: str, jit: Jit, caps: Capabilities,
                 measure: Callable[[Callable[[], Any]], float] | None = None):
        self.backend = backend
        self.jit = jit
        self.caps = caps
        self.tuner = ConfigTuner(backend, caps, measure or benchmark_ms, BackwardConfig)
        self._chosen: dict[BackwardClass, BackwardConfig] = {}
        self._plans: SignatureCache[_BackwardPlan] = SignatureCache()

    def __repr__(self) -> str:
        return f"FlashAttentionBackward({self.backend}, {self.caps.target})"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
                 lse: torch.Tensor, mask: torch.Tensor | None = None, sinks: torch.Tensor | None = None, *,
                 scale: float, causal: str, window: int, head_splits: int | None = None,
                 configs: tuple[BackwardConfig, BackwardConfig] | None = None) -> tuple[torch.Tensor, ...]:
        """(grad_q, grad_k, grad_v), plus grad_sinks with `sinks`; `head_splits` overrides how the
        KV kernel splits GQA groups, `configs` (the Q kernel's, the KV kernel's) the tuned
        configurations.  The kernels need nothing of the sinks: the lse holds them."""
        tensors = _Tensors(q, k, v, out, grad_out, lse.contiguous(), mask)
        signature = (*((t.shape, t.stride()) for t in tensors[:5]), q.dtype, q.device,
                     None if mask is None else (mask.shape, mask.stride(), mask.dtype), scale, causal, window)
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plans[signature] = _BackwardPlan(self, tensors, scale, causal, window)
        delta = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)  # the Q kernel writes every row
        if q.numel() == 0 or k.numel() == 0:  # no kernel runs; with no keys the output, hence D, is 0
            delta.zero_()
            grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        else:
            q_config = configs[0] if configs else self._config(plan, "q", tensors, delta)
            grad_q = plan.query_gradient(tensors, delta, q_config)
            kv_config = configs[1] if configs else self._config(plan, "kv", tensors, delta)
            grads = (grad_q, *plan.key_gradients(tensors, delta, kv_config, head_splits))
        if sinks is None:
            return grads
        return *grads, sink_gradient(sinks, tensors.lse, delta).to(sinks.dtype)

    def _config(self, plan: _BackwardPlan, kernel: str, tensors: _Tensors, delta: torch.Tensor) -> BackwardConfig:
        """The kernel's configuration for the plan's class: the first candidate, or on a GPU the
        fastest (the KV kernel is timed on the D the Q kernel stored in `delta`)."""
        shape = plan.shapes[kernel]
        config = self._chosen.get(shape)
        if config is None:
            candidates = backward_candidates(shape, self.caps)
            if not candidates:
                raise UnsupportedRegion(f"no flash-attention backward tile fits {self.caps.target} for {shape}")
            if tensors.q.device.type == "cpu":  # Triton's interpreter is not timed
                config = candidates[0]
            else:
                run = plan.key_gradients if kernel == "kv" else plan.query_gradient

                def prepare(config: BackwardConfig) -> Callable[[], Any]:
                    return functools.partial(run, tensors, delta, config)

                config = self.tuner.best(shape, candidates[:TUNED_CANDIDATES], prepare)
            self._chosen[shape] = config
        return config


class _Tensors(NamedTuple):
    """One backward call's inputs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    grad_out: torch.Tensor
    lse: torch.Tensor
    mask: torch.Tensor | None


class _BackwardPlan:
    """The launches of one call signature: sizes, strides and constexprs of both kernels, worked
    out once from the first call's tensors; each call passes its own."""

    def __init__(self, owner: FlashAttentionBackward, t: _Tensors, scale: float, causal: str, window: int):
        self.caps = owner.caps
        self.kernels = kernels_for(owner.backend, owner.jit)
        batch, q_heads, sq, head_dqk = t.q.shape
        kv_heads, skv, head_dv = t.k.shape[1], t.k.shape[2], t.v.shape[3]
        self.batch, self.q_heads, self.sq, self.kv_heads, self.skv = batch, q_heads, sq, kv_heads, skv
        self.group = q_heads // kv_heads
        mask_strides = t.mask.expand(batch, q_heads, sq, skv).stride() if t.mask is not None else (0, 0, 0, 0)
        self.common = dict(
            Sq=sq, Skv=skv, kv_heads=kv_heads, group=self.group, q_heads=q_heads,
            **strides_of("q", t.q.stride()), **strides_of("k", t.k.stride()), **strides_of("v", t.v.stride()),
            **strides_of("m", mask_strides), **strides_of("g", t.grad_out.stride()),
            qk_scale=scale * math.log2(math.e), scale=scale, causal_offset=skv - sq if causal == "lower_right" else 0,
            window=window, HEAD_DQK=head_dqk, HEAD_DV=head_dv, CAUSAL=causal != "none", WINDOW=window > 0,
            HAS_MASK=t.mask is not None, MASK_IS_BOOL=t.mask is not None and t.mask.dtype == torch.bool,
            DOT_DTYPE=dot_dtype(self.kernels, t.q.dtype),
        )
        # the looped kernels hold whole rows: the qk head dim as two power-of-two blocks, v's padded
        self.column_blocks = dict(DQK1=qk_column_blocks(head_dqk)[0], DQK2=qk_column_blocks(head_dqk)[1] or MIN_DOT,
                                  DV=max(MIN_DOT, power_of_two_at_least(head_dv)))
        self.out_strides = strides_of("o", t.out.stride())
        # the K/V of one KV head, and the q and grad_out of one query head: the bytes a program streams
        self.kv_bytes = skv * (head_dqk + head_dv) * t.k.element_size()
        self.q_bytes = sq * (head_dqk + head_dv) * t.q.element_size()
        self._launches: dict[tuple, FixedLaunch] = {}  # per kernel, configuration (and head splits)
        self.shapes = {kernel: BackwardClass(kernel, dtype_name(t.q.dtype), head_dqk, head_dv, causal != "none",
                                             window > 0, t.mask is not None, self.group, power_of_two_at_least(sq),
                                             power_of_two_at_least(skv), window) for kernel in ("kv", "q")}

    def key_gradients(self, t: _Tensors, delta: torch.Tensor, config: BackwardConfig,
                      head_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """grad_k and grad_v, from the D of each row in `delta`."""
        key_blocks = -(-self.skv // config.block_n)
        splits = head_splits or head_split_count(key_blocks * self.batch * self.kv_heads, self.group, self.caps)
        if self.group % splits:
            raise ValueError(f"{splits} head splits do not divide the GQA group of {self.group}")
        if splits == 1:
            grad_k, grad_v = torch.empty_like(t.k), torch.empty_like(t.v)
        else:
            grad_k = torch.empty((splits * self.batch, *t.k.shape[1:]), dtype=torch.float32, device=t.k.device)
            grad_v = torch.empty((splits * self.batch, *t.v.shape[1:]), dtype=torch.float32, device=t.v.device)
        launch = self._launches.get(("kv", config, splits))
        if launch is None:
            launch = self._launches[("kv", config, splits)] = self._key_launch(config, key_blocks, splits,
                                                                               grad_k.stride(), grad_v.stride())
        launch(q=t.q, k=t.k, v=t.v, mask=t.mask, grad_out=t.grad_out, lse=t.lse, delta=delta, grad_k=grad_k,
               grad_v=grad_v)
        if splits == 1:
            return grad_k, grad_v
        return (grad_k.view(splits, *t.k.shape).sum(0).to(t.k.dtype),
                grad_v.view(splits, *t.v.shape).sum(0).to(t.v.dtype))

    def query_gradient(self, t: _Tensors, delta: torch.Tensor, config: BackwardConfig) -> torch.Tensor:
        """grad_q, and each row's D into `delta`: the looped Q kernel, or the one-block one."""
        grad_q = torch.empty_like(t.q, memory_format=torch.contiguous_format)
        launch = self._launches.get(("q", config))
        if launch is None:
            launch = self._launches[("q", config)] = self._query_launch(config, grad_q.stride())
        launch(q=t.q, k=t.k, v=t.v, mask=t.mask, out=t.out, grad_out=t.grad_out, lse=t.lse, delta=delta,
               grad_q=grad_q)
        return grad_q

    def _key_launch(self, config: BackwardConfig, key_blocks: int, splits: int, grad_k_strides: tuple[int, ...],
                    grad_v_strides: tuple[int, ...]) -> FixedLaunch:
        """The KV kernel's launch with `config` over `key_blocks` blocks of keys, each GQA group split
        `splits` ways."""
        indices = self.batch * self.kv_heads * splits
        return FixedLaunch(self.kernels.backward_kv, (key_blocks * indices,), dict(
            batches=self.batch, head_splits=splits,
            chunk=chunk_count(self.q_bytes * self.group // splits, indices, self.caps), **self.common,
            **self.column_blocks, **strides_of("dk", grad_k_strides), **strides_of("dv", grad_v_strides),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
            num_stages=config.num_stages))

    def _query_launch(self, config: BackwardConfig, grad_q_strides: tuple[int, ...]) -> FixedLaunch:
        """The looped Q kernel's launch with `config`, or the one-block one's."""
        fixed = dict(**self.common, **self.out_strides, **strides_of("dq", grad_q_strides),
                     num_warps=config.num_warps, num_stages=config.num_stages)
        if config.dim_chunk:
            head_packs = self.batch * self.q_heads // config.pack
            positions = config.block_m // config.pack
            return FixedLaunch(self.kernels.backward_q_one_block, (-(-self.sq // positions) * head_packs,), dict(
                **fixed, head_packs=head_packs,
                chunk_packs=chunk_count(self.kv_bytes * config.pack // self.group, head_packs, self.caps),
                CHUNK=config.dim_chunk, BLOCK_M=config.block_m, KEYS=config.block_n, PACK=config.pack))
        indices = self.batch * self.q_heads
        return FixedLaunch(self.kernels.backward_q, (-(-self.sq // config.block_m) * indices,), dict(
            **fixed, **self.column_blocks, batches=self.batch,
            chunk=chunk_count(self.kv_bytes // self.group, indices, self.caps), BLOCK_M=config.block_m,
            BLOCK_N=config.block_n))


@functools.cache
def flash_attention_backward(backend: str, jit: Jit, caps: Capabilities) -> FlashAttentionBackward:
    """The backend's FlashAttentionBackward for `caps` (one per process, so tuning is shared)."""
    return FlashAttentionBackward(backend, jit, caps)


def attention_grad_lowering(backend: str, jit: Jit, caps: Capabilities) -> Callable[[Operation, PlanWriter,
                                                                                    list[str]], list[str]]:
    """The OpLowering of ft.attention_grad for a Triton backend."""

    def lower(op: Operation, writer: PlanWriter, operands: list[str]) -> list[str]:
        problem = unsupported_reason(op, caps)
        if problem:
            raise UnsupportedRegion(problem)
        callee = writer.bind("flash_attention_backward", flash_attention_backward(backend, jit, caps))
        return write_attention_call(writer, callee, op, operands, tensors=6)

    return lower
