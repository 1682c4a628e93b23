"""`ft.attention` on the Triton backends (cuda, rocm, interpret): a flash-attention forward kernel.

The lowering writes one plan line per op,

    buf7 = flash_attention(buf1, buf2, buf3, scale=0.125, causal='lower_right', window=0)

(plus `mask=` and `sinks=` when the op has them), calling a `FlashAttention` object of the
backend: it picks a configuration, allocates the output and launches the kernels of
attention_kernel.py (see there for the algorithm).  Ops the kernel cannot run (f64, a head
dim with no configuration that fits the target, dynamic head dims) raise UnsupportedRegion
and run through the reference implementation, counted as fallbacks.

Configurations (BLOCK_M, BLOCK_N, the GQA head pack, warps, pipeline stages) come from the
target's capabilities: the candidates are those whose tiles fit its shared memory and whose
accumulators fit its registers, in order of preference; the first is the default.  On a GPU
the candidates are timed once per shape class (dtype, head dims, causal/window/mask, GQA
group, K = V, query-length bucket) and the fastest is remembered in memory and on disk, in
the `attention-tuning` namespace of flagtree's cache.  Tensors on the CPU (the interpret
backend) are never timed.  Long key ranges with too few programs to fill the GPU (decode)
split the keys across programs and merge the partial results (split-KV).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flagtree.backends.base import Capabilities
from flagtree.backends.lowering import UnsupportedRegion
from flagtree.backends.triton.fixed_launch import FixedLaunch
from flagtree.backends.triton.library import Jit, versions
from flagtree.ir.core import Operation
from flagtree.ir.types import TensorType
from flagtree.runtime.cache import DiskCache, cache_key
from flagtree.runtime.plan import PlanWriter
from flagtree.runtime.signatures import SignatureCache

logger = logging.getLogger("flagtree")

KERNEL_FILE = Path(__file__).with_name("attention_kernel.py")
TUNING_NAMESPACE = "attention-tuning"
SUPPORTED_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_ELEMENT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
MAX_HEAD_DIM = 512
MIN_DOT = 16  # the smallest tl.dot extent
MAX_ACCUMULATOR_REGISTERS = 128  # f32 registers per thread for the output tile
MAX_SCORE_REGISTERS = 64  # f32 registers per thread for one block of scores
MIN_BLOCKS_PER_SPLIT = 4
SPLIT_PROGRAMS_PER_MULTIPROCESSOR = 4  # split-KV aims at this many programs per multiprocessor (latency hiding)
TUNED_CANDIDATES = 6
MAX_QUERY_BUCKET = 2**16  # longer query ranges share one tuning entry (measured: 4096 and 16384 tune differently)
COMBINE_SPLITS = 32  # split-KV partials merged per step
COMBINE_COLUMNS = 64
ONE_BLOCK_MAX_KEYS = 256  # the one-block kernel holds a tile's scores for this many keys at most
DECODE_QUERY_ROWS = 64  # query rows per KV head (Sq · group) up to which the one-block kernel splits long key ranges
ONE_BLOCK_CHUNK = 64  # head-dim columns per step of the one-block kernel
LARGE_HEAD_DIM = 256  # from here the one-block kernel is preferred where it applies
DEFAULT_L2_BYTES = 48 * 2**20  # for targets that do not report their L2 size (an H100 has 50 MiB)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, tensor descriptors) of the online kernel, most
# promising first on a big-shared-memory GPU (the six fastest on an H200 for head dims 128 and
# 192/128, within 10% of each other), then smaller tiles for large head dims, small shared
# memories and decode.
_PREFERRED_TILES = (
    (128, 64, 8, 3, False), (128, 128, 8, 3, False), (64, 64, 4, 3, True), (128, 128, 8, 3, True),
    (128, 64, 8, 4, False), (128, 64, 8, 3, True), (64, 64, 4, 3, False), (128, 64, 8, 2, False),
    (128, 128, 8, 2, False), (64, 64, 8, 2, False), (64, 32, 8, 2, False), (64, 128, 4, 2, False),
    (64, 32, 4, 2, False), (64, 16, 8, 2, False), (32, 32, 4, 2, False), (32, 16, 4, 2, False),
    (16, 64, 4, 3, False), (16, 32, 4, 2, False), (16, 16, 4, 2, False), (16, 16, 4, 1, False),
)
TMA_MAX_COLUMNS = 256  # a tensor descriptor's tile is at most 256 elements wide
# (BLOCK_M, num_warps, num_stages) of the one-block kernel, most promising first (an H200 sweep
# of every fitting one for DeepSeek-V4's head dim 512: 64 rows fastest for prefill, 16 rows with
# 8 warps for decode; results/attention_tiles_v4_h200_2026-11-29.json).
_PREFERRED_ONE_BLOCK_TILES = ((64, 4, 3), (64, 8, 3), (16, 8, 3), (64, 4, 2), (128, 8, 3), (32, 4, 3), (16, 4, 2))


# ---------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class AttentionClass:
    """What a configuration depends on: one autotuning entry per class."""

    dtype: str  # "f32" | "f16" | "bf16"
    head_dqk: int
    head_dv: int
    causal: bool
    window: bool
    has_mask: bool
    group: int  # query heads per KV head
    kv_shared: bool  # k and v are the same tensor (one load serves both)
    query_bucket: int  # query rows per KV head (Sq · group) rounded up to a power of two, ≤ MAX_QUERY_BUCKET
    key_bucket: int  # Skv rounded up to a power of two, ≤ 2 · ONE_BLOCK_MAX_KEYS (longer is all alike)
    window_size: int  # the window attribute (0: none)

    @property
    def element_bytes(self) -> int:
        return _ELEMENT_BYTES[self.dtype]

    @property
    def qk_blocks(self) -> tuple[int, int]:
        return qk_column_blocks(self.head_dqk)

    @property
    def v_block(self) -> int:
        return max(MIN_DOT, 1 << (self.head_dv - 1).bit_length())

    @property
    def max_pack(self) -> int:
        """The largest power of two dividing the group: that many heads share each K/V tile."""
        return self.group & -self.group

    def one_block_keys(self, positions: int) -> int | None:
        """The key block of the one-block kernel for tiles of `positions` query positions: one that
        holds every key a tile can see, or, for decode-sized queries, ONE_BLOCK_MAX_KEYS keys per
        program of a split-KV launch; None where it does not apply."""
        span = min(self.key_bucket, self.window_size + positions - 1) if self.window_size else self.key_bucket
        keys = power_of_two_at_least(span)
        if keys <= ONE_BLOCK_MAX_KEYS:
            return keys
        return ONE_BLOCK_MAX_KEYS if self.query_bucket <= DECODE_QUERY_ROWS else None


@dataclass(frozen=True)
class AttentionConfig:
    """One launch configuration: the online kernel, or the one-block kernel when dim_chunk > 0
    (block_n is then the number of keys it holds)."""

    block_m: int
    block_n: int
    pack: int  # query heads of one GQA group in a tile (the tile holds block_m / pack positions)
    num_warps: int
    num_stages: int
    dim_chunk: int = 0
    tma: bool = False  # online kernel: K/V blocks through tensor descriptors (the copy engine) instead of pointers


def qk_column_blocks(head_dqk: int) -> tuple[int, int]:
    """The qk head dim as two power-of-two column blocks: the largest power of two ≤ Dqk,
    then the remainder rounded up (0 when Dqk is a power of two): 192 → (128, 64)."""
    first = max(MIN_DOT, 1 << (head_dqk.bit_length() - 1))
    rest = head_dqk - first
    return first, (max(MIN_DOT, 1 << (rest - 1).bit_length()) if rest > 0 else 0)


def attention_class(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: str, window: int,
                    has_mask: bool) -> AttentionClass:
    """The shape class of one call."""
    group = q.shape[1] // max(k.shape[1], 1)
    return AttentionClass(
        dtype=dtype_name(q.dtype), head_dqk=q.shape[3], head_dv=v.shape[3], causal=causal != "none",
        window=window > 0, has_mask=has_mask, group=group, kv_shared=_kv_shared(k, v),
        query_bucket=min(power_of_two_at_least(q.shape[2] * group), MAX_QUERY_BUCKET),
        key_bucket=min(power_of_two_at_least(k.shape[2]), 2 * ONE_BLOCK_MAX_KEYS), window_size=window,
    )


def power_of_two_at_least(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in SUPPORTED_DTYPES.items() if d == dtype)


def _kv_shared(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether one K tile load can serve as the V tile too (DeepSeek-V4's K = V)."""
    if k.shape != v.shape or k.stride() != v.stride() or k.data_ptr() != v.data_ptr():
        return False
    head_dim = k.shape[3]
    return head_dim >= MIN_DOT and head_dim & (head_dim - 1) == 0


# --------------------------------------------------------------------------------------- configs
def shared_memory_bytes(config: AttentionConfig, shape: AttentionClass) -> int:
    """An estimate of the kernel's shared memory: `num_stages` copies of what one loop step
    loads (Q chunk and K chunk, or K and V tiles), plus the online kernel's Q tile."""
    stages = max(config.num_stages, 1)
    if config.dim_chunk:
        return stages * (config.block_m + config.block_n) * config.dim_chunk * shape.element_bytes
    qk_width = sum(shape.qk_blocks)
    kv_width = qk_width + (0 if shape.kv_shared else shape.v_block)
    return (config.block_m * qk_width + stages * config.block_n * kv_width) * shape.element_bytes


def fits(config: AttentionConfig, shape: AttentionClass, caps: Capabilities) -> bool:
    """Whether `config`'s tiles fit the target's shared memory and its f32 tiles (output
    accumulator, scores) the registers (limits found compiling for Hopper: beyond them ptxas spills)."""
    threads = config.num_warps * caps.warp_size
    output_columns = config.dim_chunk or shape.v_block
    accumulator = config.block_m * output_columns / threads
    scores = config.block_m * config.block_n / threads
    if config.tma and max(*shape.qk_blocks, shape.v_block) > TMA_MAX_COLUMNS:
        return False
    if config.dim_chunk:  # the whole key block's scores, one output chunk at a time
        registers = scores <= 2 * MAX_SCORE_REGISTERS and accumulator <= MAX_SCORE_REGISTERS
    else:
        registers = accumulator <= MAX_ACCUMULATOR_REGISTERS and accumulator + 2 * scores <= 3 * MAX_SCORE_REGISTERS
    return (shared_memory_bytes(config, shape) <= caps.shared_memory_bytes and registers
            and threads <= caps.max_threads_per_block)


def candidate_configs(shape: AttentionClass, caps: Capabilities) -> list[AttentionConfig]:
    """The configurations that fit the target, most promising first (the first is the default).

    Tiles taller than the query rows available to them are dropped (a decode tile of 128 rows
    with one query would be mostly padding), unless nothing smaller fits.  Where a tile's keys
    fit one block, one-block configurations come first for large head dims, after the first
    online ones otherwise.
    """
    online = _fitting([AttentionConfig(m, n, min(shape.max_pack, m), w, s, tma=tma)
                       for m, n, w, s, tma in _PREFERRED_TILES], shape, caps)
    pointers = [c for c in online if not c.tma]
    if pointers:  # the default runs everywhere: tensor descriptors are only ever timed against it
        online.remove(pointers[0])
        online.insert(0, pointers[0])
    one_block = []
    for block_m, warps, stages in _PREFERRED_ONE_BLOCK_TILES:
        pack = min(shape.max_pack, block_m)
        keys = shape.one_block_keys(block_m // pack)
        if keys is not None:
            chunk = min(ONE_BLOCK_CHUNK, power_of_two_at_least(max(shape.head_dqk, shape.head_dv, MIN_DOT)))
            one_block.append(AttentionConfig(block_m, max(keys, MIN_DOT), pack, warps, stages, chunk))
    one_block = _fitting(one_block, shape, caps)
    if max(shape.head_dqk, shape.head_dv) >= LARGE_HEAD_DIM:
        return one_block + online
    return online[:3] + one_block + online[3:]


def _fitting(configs: list[AttentionConfig], shape: AttentionClass, caps: Capabilities) -> list[AttentionConfig]:
    fitting = [c for c in configs if fits(c, shape, caps)]
    useful = [c for c in fitting if c.block_m <= max(shape.query_bucket, MIN_DOT)]
    return useful or fitting


def chunk_count(bytes_per_index: int, indices: int, caps: Capabilities) -> int:
    """How many of a kernel's head (pack) indices the grid walks together, one tile of each before
    the next (attention_kernel._tile): all of them when the K/V (or q) bytes they stream fit in
    most of L2, so the heaviest causal tiles of every head start first; else as many as fill an
    eighth of L2, which the programs running at once then share.  H200 (60 MiB L2), bf16 causal:
    16×128 heads at length 4096 forward 169 → 152 µs, backward 584 → 497 µs against the previous
    24 MiB chunks / per-head order; MLA's 128 heads forward 1551 → 1457 µs; length 16384 within
    noise (benchmarks/results/attention_{,backward_}order_h200_2026-11-29.json)."""
    l2_bytes = dict(caps.extra).get("l2_bytes") or DEFAULT_L2_BYTES
    if bytes_per_index * indices <= 0.8 * l2_bytes:
        return max(indices, 1)
    return min(max(l2_bytes // 8 // max(bytes_per_index, 1), 1), indices)


def split_count(programs: int, key_blocks: int, min_blocks: int, caps: Capabilities) -> int:
    """How many programs share each tile's key range: up to SPLIT_PROGRAMS_PER_MULTIPROCESSOR
    programs per multiprocessor when the tiles alone fill less than one program each, with at
    least `min_blocks` key blocks per split."""
    multiprocessors = dict(caps.extra).get("multiprocessors", 1)
    if programs >= multiprocessors:
        return 1
    target = -(-SPLIT_PROGRAMS_PER_MULTIPROCESSOR * multiprocessors // programs)
    return max(1, min(target, key_blocks // min_blocks))


def min_split_blocks(config: AttentionConfig, shape: AttentionClass) -> int:
    """The fewest key blocks per split for which the f32 partial results a split writes and the
    merge reads back stay under a quarter of the K/V bytes the split reads."""
    scratch = 8 * config.block_m * shape.v_block
    kv_per_block = config.block_n * (sum(shape.qk_blocks) + (0 if shape.kv_shared else shape.v_block)) \
        * shape.element_bytes
    return max(MIN_BLOCKS_PER_SPLIT, -(-4 * scratch // kv_per_block))


# ------------------------------------------------------------------------------------ the kernel
@dataclass(frozen=True)
class AttentionKernels:
    forward: Any
    one_block: Any
    combine: Any
    backward_q: Any
    backward_kv: Any
    backward_q_one_block: Any
    interpreted: bool


@functools.cache
def kernels_for(backend: str, jit: Jit) -> AttentionKernels:
    """attention_kernel.py loaded as a module of its own for `backend` (the interpreter rebinds
    the module's `tl`), its kernels wrapped by the backend's `jit` and its helpers made callable
    from them: Triton device functions for compiled kernels, rewritten like the kernels for the
    interpreter."""
    import triton
    from triton.runtime.interpreter import FunctionRewriter, InterpretedFunction

    name = "flagtree_attention_kernel_" + "".join(c if c.isalnum() else "_" for c in backend)
    spec = importlib.util.spec_from_file_location(name, KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernels = AttentionKernels(*(jit(getattr(module, f"attention_{name}"), []) for name in (
        "forward", "forward_one_block", "combine", "backward_q", "backward_kv", "backward_q_one_block")), False)
    interpreted = isinstance(kernels.forward, InterpretedFunction)
    for helper_name, helper in list(vars(module).items()):
        if helper_name.startswith("_") and inspect.isfunction(helper) and helper.__module__ == name:
            setattr(module, helper_name, FunctionRewriter(helper).rewrite_ast() if interpreted else triton.jit(helper))
    return dataclasses.replace(kernels, interpreted=interpreted)


class FlashAttention:
    """`ft.attention` for one backend and target, called from launch plans.

    A call's launches (configuration, grid, sizes, strides, constexprs) depend only on its
    tensors' shapes, strides and dtypes and the op's attributes: they are worked out once per
    such signature and replayed, so a call costs little more than Triton's own launches.
    """

    def __init__(self, backend: str, jit: Jit, caps: Capabilities,
                 measure: Callable[[Callable[[], Any]], float] | None = None):
        self.backend = backend
        self.jit = jit
        self.caps = caps
        self.tuner = ConfigTuner(backend, caps, measure or benchmark_ms)
        self._chosen: dict[AttentionClass, AttentionConfig] = {}
        self._launches: SignatureCache[_Launch] = SignatureCache()

    def __repr__(self) -> str:
        return f"FlashAttention({self.backend}, {self.caps.target})"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                 sinks: torch.Tensor | None = None, *, scale: float, causal: str, window: int,
                 with_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The attention, and with `with_lse` also each row's log-sum-exp (see ft.attention)."""
        signature = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device,
                     k.data_ptr() == v.data_ptr(), _aligned(k) and _aligned(v),
                     None if mask is None else (mask.shape, mask.stride(), mask.dtype), sinks is None, scale, causal,
                     window, with_lse)
        launch = self._launches.get(signature)
        if launch is None:
            shape = attention_class(q, k, v, causal, window, mask is not None)
            config = self._config(shape, q, k, v, mask, sinks, scale, causal, window)
            launch = self._plan(shape, q, k, v, mask, sinks, scale, causal, window, config, None, with_lse)
            self._launches[signature] = launch
        return launch(q, k, v, mask, sinks)

    def _config(self, shape: AttentionClass, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, sinks: torch.Tensor | None, scale: float, causal: str,
                window: int) -> AttentionConfig:
        """The configuration of `shape`: the first candidate, or on a GPU the fastest one."""
        config = self._chosen.get(shape)
        if config is None:
            candidates = candidate_configs(shape, self.caps)
            if not candidates:
                raise UnsupportedRegion(f"no flash-attention tile fits {self.caps.target} for {shape}")

            def prepare(config: AttentionConfig) -> Callable[[], torch.Tensor]:
                launch = self._plan(shape, q, k, v, mask, sinks, scale, causal, window, config, None)
                return functools.partial(launch, q, k, v, mask, sinks)

            # Triton's interpreter (CPU tensors) is not timed: its speed says nothing about a GPU's.
            config = candidates[0] if q.device.type == "cpu" else self.tuner.best(shape, candidates, prepare)
            self._chosen[shape] = config
        return config

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            sinks: torch.Tensor | None, *, scale: float, causal: str, window: int, config: AttentionConfig,
            splits: int | None = None, with_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Launch with `config`; the online kernel splits the keys `splits` ways (None: as many as
        fill the target)."""
        shape = attention_class(q, k, v, causal, window, mask is not None)
        launch = self._plan(shape, q, k, v, mask, sinks, scale, causal, window, config, splits, with_lse)
        return launch(q, k, v, mask, sinks)

    def _plan(self, shape: AttentionClass, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None, sinks: torch.Tensor | None, scale: float, causal: str, window: int,
              config: AttentionConfig, splits: int | None, with_lse: bool = False) -> _Launch:
        batch, q_heads, sq, head_dqk = q.shape
        kv_heads, skv, head_dv = k.shape[1], k.shape[2], v.shape[3]
        group = q_heads // kv_heads
        if q_heads % kv_heads or group % config.pack:
            raise ValueError(f"{config}: {q_heads} query heads over {kv_heads} KV heads do not form packs of "
                             f"{config.pack}")
        kernels = kernels_for(self.backend, self.jit)
        out_shape = (batch, q_heads, sq, head_dv)
        out_strides = torch.empty(out_shape, device="meta").stride()
        head_packs = batch * q_heads // config.pack
        kv_bytes = skv * (head_dqk + (0 if shape.kv_shared else head_dv)) * q.element_size()
        expanded_mask = mask.expand(batch, q_heads, sq, skv) if mask is not None else None  # broadcast: stride 0
        constants = dict(
            Sq=sq, Skv=skv, kv_heads=kv_heads, group=group, q_heads=q_heads, head_packs=head_packs,
            chunk_packs=chunk_count(kv_bytes * config.pack // group, head_packs, self.caps),
            scratch_rows=batch * q_heads * sq,
            **strides_of("q", q.stride()), **strides_of("k", k.stride()), **strides_of("v", v.stride()),
            **strides_of("m", expanded_mask.stride() if mask is not None else (0, 0, 0, 0)),
            **strides_of("o", out_strides),
            qk_scale=scale * math.log2(math.e), causal_offset=skv - sq if causal == "lower_right" else 0,
            window=window, HEAD_DQK=head_dqk, HEAD_DV=head_dv, BLOCK_M=config.block_m, PACK=config.pack,
            DV=shape.v_block, CAUSAL=causal != "none", WINDOW=window > 0, HAS_MASK=mask is not None,
            MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool, HAS_SINKS=sinks is not None,
            STORE_LSE=with_lse, DOT_DTYPE=dot_dtype(kernels, q.dtype), num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        positions = config.block_m // config.pack
        programs = -(-sq // positions) * head_packs
        key_range = min(skv, window + positions - 1) if window else skv
        descriptors = None
        if config.dim_chunk:
            kernel = kernels.one_block
            splits = max(1, -(-key_range // config.block_n))
            constants.update(KEYS=config.block_n, CHUNK=config.dim_chunk)
        else:
            kernel = kernels.forward
            key_blocks = max(-(-key_range // config.block_n), 1)
            if splits is None:
                splits = split_count(programs, key_blocks, min_split_blocks(config, shape), self.caps)
            split_blocks = -(-key_blocks // splits)
            splits = -(-key_blocks // split_blocks)
            qk1, qk2 = shape.qk_blocks
            if config.tma:
                descriptors = (config.block_n, (qk1, qk2, shape.v_block))
                _descriptors(k, v, *descriptors)  # raises here, once, when these tensors cannot have descriptors
            constants.update(split_blocks=split_blocks, DQK1=qk1, DQK2=qk2 or MIN_DOT, BLOCK_N=config.block_n,
                             KV_SHARED=shape.kv_shared, USE_TMA=config.tma)
        constants["SPLIT"] = splits > 1
        columns = min(COMBINE_COLUMNS, shape.v_block)
        combine = dict(splits=splits, scratch_rows=constants["scratch_rows"], Sq=sq, q_heads=q_heads,
                       **strides_of("o", out_strides),
                       HEAD_DV=head_dv, DV=shape.v_block, BLOCK_S=COMBINE_SPLITS, BLOCK_D=columns,
                       HAS_SINKS=sinks is not None, STORE_LSE=with_lse, num_warps=4)
        return _Launch(FixedLaunch(kernel, (programs, splits), constants), out_shape, splits, shape.v_block,
                       descriptors, not config.dim_chunk,
                       FixedLaunch(kernels.combine, (constants["scratch_rows"], shape.v_block // columns), combine),
                       with_lse)


@dataclass
class _Launch:
    """The launches of one call signature; calling it with that signature's tensors runs them."""

    attention: FixedLaunch  # the online or one-block kernel
    out_shape: tuple[int, int, int, int]
    splits: int
    v_block: int
    descriptors: tuple[int, tuple[int, int, int]] | None  # (BLOCK_N, column widths) when K/V use descriptors
    online: bool  # the online kernel (which takes descriptor arguments)
    combine: FixedLaunch  # merges the splits' partial results (when splits > 1)
    with_lse: bool  # also return each row's log-sum-exp, [B, Hq, Sq] f32

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 sinks: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(self.out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(self.out_shape[:3], dtype=torch.float32, device=q.device) if self.with_lse else None
        if out.numel() == 0:
            return (out, lse.fill_(math.inf)) if self.with_lse else out
        if sinks is not None:
            sinks = sinks.contiguous()
        partial_acc = partial_stats = None
        if self.splits > 1:
            rows = self.attention.fixed["scratch_rows"]
            partial_acc = torch.empty((self.splits, rows, self.v_block), dtype=torch.float32, device=q.device)
            partial_stats = torch.empty((self.splits, rows, 2), dtype=torch.float32, device=q.device)
        extra = {}
        if self.online:
            k1, k2, vd = _descriptors(k, v, *self.descriptors) if self.descriptors else (None, None, None)
            extra = {"k1_desc": k1, "k2_desc": k2, "v_desc": vd}
        self.attention(q=q, k=k, v=v, mask=mask, sinks=sinks, out=out, lse=lse, partial_acc=partial_acc,
                       partial_stats=partial_stats, **extra)
        if self.splits > 1:
            self.combine(partial_acc=partial_acc, partial_stats=partial_stats, sinks=sinks, out=out, lse=lse)
        return (out, lse) if self.with_lse else out


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, widths: tuple[int, int, int]) -> tuple[Any, ...]:
    """Tensor descriptors of K (first and second column block) and V, for tiles of `block_n` keys."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    for t in (k, v):
        aligned = t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
        if t.stride(-1) != 1 or not aligned or max(widths) > TMA_MAX_COLUMNS:
            raise ValueError(f"tensor descriptors need a contiguous last dim, 16-byte aligned strides and tiles of "
                             f"at most 256 columns; got strides {t.stride()} and tile widths {widths}")
    k1, k2, dv = widths
    return (TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, block_n, k1]),
            TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, block_n, k2]) if k2 else None,
            TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, block_n, dv]))


def strides_of(prefix: str, strides: tuple[int, ...]) -> dict[str, int]:
    """`stride_<prefix>b/h/s/d` of a [batch, heads, seq, dim] tensor's strides."""
    return {f"stride_{prefix}{axis}": stride for axis, stride in zip(_STRIDE_AXES[prefix], strides)}


_STRIDE_AXES = {"q": "bhsd", "k": "bhnd", "v": "bhnd", "m": "bhsn", "o": "bhsd", "g": "bhsd", "dq": "bhsd",
                "dk": "bhnd", "dv": "bhnd"}


def dot_dtype(kernels: AttentionKernels, dtype: torch.dtype) -> Any:
    """The type tl.dot's operands are given in: the inputs', except bf16 under Triton's
    interpreter, whose tl.dot would multiply bf16 bit patterns as integers (widened to f32)."""
    import triton.language as tl

    if dtype == torch.bfloat16 and kernels.interpreted:
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def benchmark_ms(function: Callable[[], Any]) -> float:
    import triton.testing

    return triton.testing.do_bench(function, warmup=10, rep=40)


class ConfigTuner:
    """The fastest configuration per shape class: timed once, then remembered in memory and on disk.

    Shape classes and configurations are frozen dataclasses (the forward's AttentionClass and
    AttentionConfig, the backward's in attention_backward.py); `config_type` rebuilds a stored one.
    """

    def __init__(self, backend: str, caps: Capabilities, measure: Callable[[Callable[[], Any]], float],
                 config_type: type = AttentionConfig):
        self.backend = backend
        self.caps = caps
        self.measure = measure
        self.config_type = config_type
        self.cache = DiskCache(TUNING_NAMESPACE)

    def best(self, shape: Any, candidates: list[Any], prepare: Callable[[Any], Callable[[], Any]]) -> Any:
        """The winner for `shape` stored on disk, else the fastest of the first candidates and
        stored; `prepare(config)` gives the call to time (built outside the timing)."""
        unit = type(shape).__name__ + json.dumps(dataclasses.asdict(shape), sort_keys=True)
        key = cache_key(unit, self.backend, self.caps, {}, versions())
        stored = self.cache.load(key, ".json")
        if stored is not None:
            return self.config_type(**json.loads(stored))
        config = self._time(shape, candidates, prepare)
        self.cache.store(key, json.dumps(dataclasses.asdict(config)), ".json")
        return config

    def _time(self, shape: Any, candidates: list[Any], prepare: Callable[[Any], Callable[[], Any]]) -> Any:
        times: dict[AttentionConfig, float] = {}
        for config in candidates[:TUNED_CANDIDATES]:
            try:
                times[config] = self.measure(prepare(config))
            except Exception as e:  # a candidate Triton cannot build here (out of resources, ...) is skipped
                logger.info("flagtree attention tuning: %s skipped for %s: %s: %s", config, shape,
                            type(e).__name__, e)
        if not times:
            raise UnsupportedRegion(f"no flash-attention configuration runs on {self.caps.target} for {shape}")
        best = min(times, key=times.__getitem__)
        logger.info("flagtree attention tuning: %s -> %s (%.3f ms of %d timed)", shape, best, times[best],
                    len(times))
        return best


# ------------------------------------------------------------------------------------- lowering
def unsupported_reason(op: Operation, caps: Capabilities) -> str | None:
    """Why the kernel cannot run `op` on `caps`' target, or None."""
    q, k, v = (o.type for o in op.operands[:3])
    if not all(isinstance(t, TensorType) for t in (q, k, v)):
        return "q, k and v must be tensors"
    dtype = q.dtype.name
    if dtype not in SUPPORTED_DTYPES or dtype not in caps.dtypes:
        return f"the flash-attention kernel takes f32, f16 or bf16 that {caps.target} computes natively, not {dtype}"
    head_dqk, head_dv = q.shape[3], v.shape[3]
    if head_dqk is None or head_dv is None:
        return "the head dims must be static (they choose the kernel's tiles)"
    if max(head_dqk, head_dv) > MAX_HEAD_DIM:
        return f"head dims {head_dqk}/{head_dv}: the kernel takes at most {MAX_HEAD_DIM}"
    attrs = op.attributes
    shape = AttentionClass(dtype, head_dqk, head_dv, attrs["causal"] != "none", attrs["window"] > 0, attrs["has_mask"],
                           group=1, kv_shared=False, query_bucket=MAX_QUERY_BUCKET, key_bucket=2 * ONE_BLOCK_MAX_KEYS,
                           window_size=attrs["window"])
    if not candidate_configs(shape, caps):
        return f"no tile for head dims {head_dqk}/{head_dv} fits {caps.target}'s {caps.shared_memory_bytes} bytes " \
               "of shared memory"
    return None


@functools.cache
def flash_attention(backend: str, jit: Jit, caps: Capabilities) -> FlashAttention:
    """The backend's FlashAttention for `caps` (one per process, so tuning is shared by all plans)."""
    return FlashAttention(backend, jit, caps)


def write_attention_call(writer: PlanWriter, callee: str, op: Operation, operands: list[str],
                         tensors: int) -> list[str]:
    """The plan line calling `callee` for an ft.attention or ft.attention_grad `op`: its first
    `tensors` operands, then mask=, sinks= (when it has them), its attributes as keywords."""
    attributes = op.attributes
    keywords = [f"mask={operands[tensors]}"] if attributes["has_mask"] else []
    if attributes["has_sinks"]:
        keywords.append(f"sinks={operands[-1]}")
    keywords += [f"scale={attributes['scale']!r}", f"causal={attributes['causal']!r}", f"window={attributes['window']}"]
    if attributes.get("with_lse", False):
        keywords.append("with_lse=True")
    results = [writer.new_buffer() for _ in op.results]
    writer.line(f"{', '.join(results)} = {callee}({', '.join([*operands[:tensors], *keywords])})")
    return results


def attention_lowering(backend: str, jit: Jit, caps: Capabilities) -> Callable[[Operation, PlanWriter, list[str]],
                                                                              list[str]]:
    """The OpLowering of ft.attention for a Triton backend."""

    def lower(op: Operation, writer: PlanWriter, operands: list[str]) -> list[str]:
        problem = unsupported_reason(op, caps)
        if problem:
            raise UnsupportedRegion(problem)
        return write_attention_call(writer, writer.bind("flash_attention", flash_attention(backend, jit, caps)), op,
                                    operands, tensors=3)

    return lower
