"""The Triton kernels of `ft.attention` (flash-attention forward), as plain functions.

backends/triton/attention.py loads this file as a fresh module per backend and wraps the
kernels with the backend's `jit` (`triton.jit` on GPUs, Triton's interpreter on the CPU) and
the helpers (names starting with `_`) as Triton device functions, or rewritten like the
kernels for the interpreter.  Nothing here is decorated, nothing else imports it.

Both forward kernels run one program per query tile:

- A tile's BLOCK_M rows are PACK query heads of one GQA group × BLOCK_M/PACK consecutive
  query positions; all of them read the same KV head, so a K/V tile is loaded once for the
  PACK heads (MQA decode and sliding windows read K/V once per position range instead of
  once per head).  Row r holds head `r // POSITIONS`, position `r % POSITIONS`.
- Programs walk the tiles in chunks of `chunk_packs` head packs (whose K/V fit in L2) and,
  within a chunk, by query tile first, the longest causal rows first: the tail of the grid
  is made of the shortest tiles, and the programs running together share their K/V.
- Scores and softmax are f32, in base 2: scores are scaled by scale·log2(e) and
  exponentiated with exp2.  The max starts at the head's sink logit (denominator 1) or at
  -inf (denominator 0); a row whose visible scores are all -inf uses 0 as the max it
  subtracts (exp2(-inf - -inf) would be NaN) and a row with a zero denominator divides by 1,
  so a row that sees no key and has no sink is exactly 0.

`attention_forward`: online softmax over the keys any row of the tile can see, [lo, hi), in
BLOCK_N steps from lo (a window's first visible key, so a window costs window/BLOCK_N
blocks).  The range is cut into three phases: blocks at the window's start that some row
cannot fully see, blocks every row sees whole (no element mask, unmasked loads: most of the
work), and the blocks at the causal diagonal or the end of the keys; `tl.static_range` gives
each phase its own copy of the loop.  The qk head dim is read as two power-of-two column
blocks DQK1 + DQK2 (192 = 128 + 64: MLA pays no padding), v as one block of DV ≥ Dv columns.
Split-KV (SPLIT): program axis 1 cuts [lo, hi) into chunks of `split_blocks` blocks; each
split writes its unnormalised accumulator, max and denominator to f32 scratch and
`attention_combine` merges them (adding the sink).

`attention_forward_one_block`: for tiles whose visible keys fit one block of KEYS keys (a
sliding window, short sequences): exact softmax, with the head dims walked in CHUNK-wide
column blocks, S = Σ_c Q[:, c]·K[:, c]ᵀ, then O[:, c] = P·V[:, c] stored chunk by chunk.  Its
registers and shared memory do not grow with the head dim, so several programs share a
multiprocessor even at head dim 512 (DeepSeek-V4), where the online kernel's f32 output tile
alone fills half the register file.  For decode it also splits long key ranges KEYS at a time
across programs (SPLIT), merged by `attention_combine` like the online kernel's splits.

DOT_DTYPE is the inputs' type, except under Triton 3.6's interpreter with bf16 inputs: its
tl.dot multiplies bf16 bit patterns as integers, so the operands are widened to f32 first
(exact for bf16 values; the products and f32 sums are what a matrix unit computes).
"""

import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


def _tile(blocks, indices, chunk, REVERSE: tl.constexpr):
    """(block, index) of this program, on a 1-D grid of blocks × indices (query or key blocks;
    head packs, heads or batch·head indices): programs walk the indices in chunks of `chunk`
    and, within a chunk, one block of every index before the next block, from the last block
    when REVERSE.  So the heaviest causal blocks of a chunk start first, and the chunk's
    operands, sized to stay in L2, are shared by the programs running at once."""
    program = tl.program_id(0)
    per_chunk = chunk * blocks
    first = (program // per_chunk) * chunk
    here = tl.minimum(chunk, indices - first)
    index = program % per_chunk
    block = index // here
    if REVERSE:
        block = blocks - 1 - block
    return block, first + index % here


def _rows(m_tile, head_pack, group, kv_heads, Sq, BLOCK_M: tl.constexpr, PACK: tl.constexpr):
    """The tile's batch, KV head, and per row its query head, position and validity."""
    POSITIONS: tl.constexpr = BLOCK_M // PACK
    packs = group // PACK
    batch = (head_pack // (kv_heads * packs)).to(tl.int64)
    kv_head = ((head_pack // packs) % kv_heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    head = kv_head * group + (head_pack % packs) * PACK + rows // POSITIONS
    position = m_tile * POSITIONS + rows % POSITIONS
    return batch, kv_head, head, position, position < Sq


def _key_range(first_position, last_position, Skv, causal_offset, window, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr):
    """[lo, hi): the keys some position in [first_position, last_position] can see."""
    lo = first_position * 0
    hi = lo + Skv
    if WINDOW:
        lo = tl.maximum(first_position + causal_offset - window + 1, 0)
    if CAUSAL:
        hi = tl.maximum(tl.minimum(hi, last_position + causal_offset + 1), lo)
    return lo, hi


def _visible(key, position, row_valid, Skv, causal_offset, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Which keys each row sees under the causal offset and the window; `key` and `position`
    (with `row_valid`) come shaped to broadcast against each other: [1, keys] and [rows, 1]
    give a [rows, keys] answer, [keys, 1] and [1, rows] its transpose."""
    visible = (key < Skv) & row_valid
    if CAUSAL:
        visible = visible & (key <= position + causal_offset)
    if WINDOW:
        visible = visible & (position + causal_offset - key < window)
    return visible


def _clean_keys(lo, first_position, last_position, Skv, causal_offset, window, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[clean_lo, clean_hi): the key blocks (on the grid lo + j·BLOCK_N) that every position in
    [first_position, last_position] sees whole."""
    clean_lo = lo
    if WINDOW:
        partly_hidden = last_position + causal_offset - window  # the last key the last row cannot see
        clean_lo = tl.where(partly_hidden >= lo, lo + ((partly_hidden - lo) // BLOCK_N + 1) * BLOCK_N, lo)
    clean_limit = lo * 0 + Skv
    if CAUSAL:
        clean_limit = tl.minimum(clean_limit, first_position + causal_offset + 1)
    return clean_lo, lo + (tl.maximum(clean_limit - lo, 0) // BLOCK_N) * BLOCK_N


def _store_lse(lse, row, m, denominator, row_valid):
    """Store each row's natural-log log-sum-exp from its base-2 max and denominator (+inf for a
    row whose denominator is 0: it saw no key, and exp(s - lse) is then 0)."""
    value = tl.where(denominator > 0.0, (_usable_max(m) + tl.math.log2(tl.where(denominator > 0.0, denominator, 1.0)))
                     / LOG2E, float("inf"))
    tl.store(lse + row, value, mask=row_valid)


def _mask_scores(scores, visible, mask, mask_offsets, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """`scores` (already scaled to base 2) with the mask operand applied and hidden keys at -inf."""
    if HAS_MASK:
        mask_block = tl.load(mask + mask_offsets, mask=visible, other=0)
        if MASK_IS_BOOL:
            visible = visible & (mask_block != 0)
        else:
            scores = scores + mask_block.to(tl.float32) * LOG2E
    return tl.where(visible, scores, float("-inf"))


def _hidden_scores(scores, qk_scale, key, position, row_valid, Skv, causal_offset, window, mask, mask_offsets,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """`scores` scaled to base 2, the mask operand applied, and the keys a row does not see
    (causal offset, window) at -inf; `key` and `position` shaped as for _visible."""
    visible = _visible(key, position, row_valid, Skv, causal_offset, window, CAUSAL, WINDOW)
    return _mask_scores(scores * qk_scale, visible, mask, mask_offsets, HAS_MASK, MASK_IS_BOOL)


def _phase_range(phase: tl.constexpr, lo, clean_lo, clean_hi, hi):
    """[start, stop) of a block loop's phase: 0 before the blocks seen whole, 1 those, 2 after."""
    if phase == 0:
        return lo, clean_lo
    if phase == 1:
        return clean_lo, clean_hi
    return clean_hi, hi


def _initial_max(sinks, head, BLOCK_M: tl.constexpr, HAS_SINKS: tl.constexpr):
    """The running max and denominator before any key: the sink's logit and 1, or -inf and 0."""
    if HAS_SINKS:  # a sink of -inf adds nothing (and a row that sees no key then has denominator 0)
        m = tl.load(sinks + head).to(tl.float32) * LOG2E
        denominator = tl.where(m == float("-inf"), 0.0, tl.full([BLOCK_M], 1.0, tl.float32))
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        denominator = tl.zeros([BLOCK_M], tl.float32)
    return m, denominator


def _usable_max(m):
    """The max to subtract: 0 for rows that have seen only -inf (avoids -inf - -inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


def _load_block(ptrs, offset, mask, desc, batch, kv_head, start_n, column, ROWS: tl.constexpr, COLUMNS: tl.constexpr,
                BOUNDED: tl.constexpr, USE_TMA: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """A [ROWS, COLUMNS] block of K or V: through the tensor descriptor `desc` (the copy engine
    fills rows and columns past the tensor's end with 0), or at `ptrs + offset`, where `mask`
    (when BOUNDED) keeps the loads in bounds."""
    if USE_TMA:
        block = desc.load([batch, kv_head, start_n, column]).reshape(ROWS, COLUMNS)
    elif BOUNDED:
        block = tl.load(ptrs + offset, mask=mask, other=0.0)
    else:
        block = tl.load(ptrs + offset)
    return block.to(DOT_DTYPE)


def _block_scores(q1, q2, k1_ptrs, k2_ptrs, k1_desc, k2_desc, batch, kv_head, start_n, offset, in_range, cols1, cols2,
                  HEAD_DQK: tl.constexpr, BLOCK_N: tl.constexpr, DQK1: tl.constexpr, DQK2: tl.constexpr,
                  SPLIT_QK: tl.constexpr, BOUNDED: tl.constexpr, USE_TMA: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """q·kᵀ for the key block at `start_n` (f32, unscaled) and the block's first K columns.
    BOUNDED: keys past the end read as 0 (else every load is in bounds)."""
    k1 = _load_block(k1_ptrs, offset, in_range[:, None] & (cols1[None, :] < HEAD_DQK), k1_desc, batch, kv_head,
                     start_n, 0, BLOCK_N, DQK1, BOUNDED or DQK1 > HEAD_DQK, USE_TMA, DOT_DTYPE)
    scores = tl.dot(q1, tl.trans(k1), input_precision="ieee")
    if SPLIT_QK:
        k2 = _load_block(k2_ptrs, offset, in_range[:, None] & (cols2[None, :] < HEAD_DQK), k2_desc, batch, kv_head,
                         start_n, DQK1, BLOCK_N, DQK2, BOUNDED or DQK1 + DQK2 > HEAD_DQK, USE_TMA, DOT_DTYPE)
        scores = tl.dot(q2, tl.trans(k2), scores, input_precision="ieee")
    return scores, k1


def _load_chunk(rows, first_column, cols, row_valid, HEAD: tl.constexpr, stride_d):
    """Columns first_column + cols of the rows at `rows` (one pointer per row); rows past the end
    and columns past HEAD read as 0."""
    columns = first_column + cols
    return tl.load(rows[:, None] + columns[None, :] * stride_d, mask=row_valid[:, None] & (columns < HEAD)[None, :],
                   other=0.0)


def _online_softmax(scores, m_i, l_i, acc, qk_scale, SCALED: tl.constexpr):
    """One block's probabilities (unnormalised) and the running max, denominator and rescaled
    accumulator.  SCALED: `scores` are already scaled to base 2 and may hold -inf."""
    if SCALED:
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_use = _usable_max(m_new)
        p = tl.math.exp2(scores - m_use[:, None])
    else:  # one FMA per score, and every score is finite
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(scores * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


def attention_forward(
    q, k, v, mask, sinks, out, lse, partial_acc, partial_stats, k1_desc, k2_desc, v_desc,
    Sq, Skv, kv_heads, group, q_heads, head_packs, chunk_packs, scratch_rows,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_ms, stride_mn,
    stride_ob, stride_oh, stride_os, stride_od,
    qk_scale, causal_offset, window, split_blocks,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, DQK1: tl.constexpr, DQK2: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SINKS: tl.constexpr, KV_SHARED: tl.constexpr, SPLIT: tl.constexpr, USE_TMA: tl.constexpr,
    STORE_LSE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """DQK2: the width of the second qk column block, 16 and unused when the qk dim is one block.
    USE_TMA: K and V blocks come through the tensor descriptors k1_desc, k2_desc, v_desc
    (block shapes [1, 1, BLOCK_N, DQK1 / DQK2 / DV]) instead of pointer loads."""
    POSITIONS: tl.constexpr = BLOCK_M // PACK
    SPLIT_QK: tl.constexpr = DQK1 < HEAD_DQK
    m_tiles = tl.cdiv(Sq, POSITIONS)
    m_tile, head_pack = _tile(m_tiles, head_packs, chunk_packs, CAUSAL)
    batch, kv_head, head, position, row_valid = _rows(m_tile, head_pack, group, kv_heads, Sq, BLOCK_M, PACK)
    first_position = m_tile * POSITIONS
    last_position = tl.minimum(first_position + POSITIONS, Sq) - 1
    lo, hi = _key_range(first_position, last_position, Skv, causal_offset, window, CAUSAL, WINDOW)

    clean_lo, clean_hi = _clean_keys(lo, first_position, last_position, Skv, causal_offset, window, BLOCK_N, CAUSAL,
                                     WINDOW)
    if SPLIT:
        lo = lo + tl.program_id(1) * split_blocks * BLOCK_N
        hi = tl.maximum(tl.minimum(hi, lo + split_blocks * BLOCK_N), lo)
    clean_lo = tl.minimum(tl.maximum(clean_lo, lo), hi)
    clean_hi = tl.minimum(tl.maximum(clean_hi, clean_lo), hi)

    q_rows = q + batch * stride_qb + head * stride_qh + position.to(tl.int64) * stride_qs
    cols1 = tl.arange(0, DQK1)
    cols2 = DQK1 + tl.arange(0, DQK2)
    q1 = tl.load(q_rows[:, None] + cols1[None, :] * stride_qd, mask=row_valid[:, None] & (cols1[None, :] < HEAD_DQK),
                 other=0.0).to(DOT_DTYPE)
    q2 = tl.load(q_rows[:, None] + cols2[None, :] * stride_qd, mask=row_valid[:, None] & (cols2[None, :] < HEAD_DQK),
                 other=0.0).to(DOT_DTYPE)
    keys = tl.arange(0, BLOCK_N)
    batch32 = batch.to(tl.int32)
    kv_head32 = kv_head.to(tl.int32)
    k_start = k + batch * stride_kb + kv_head * stride_kh + lo.to(tl.int64) * stride_kn
    k1_ptrs = k_start + keys[:, None] * stride_kn + cols1[None, :] * stride_kd
    k2_ptrs = k_start + keys[:, None] * stride_kn + cols2[None, :] * stride_kd
    cols_v = tl.arange(0, DV)
    v_ptrs = (v + batch * stride_vb + kv_head * stride_vh + lo.to(tl.int64) * stride_vn
              + keys[:, None] * stride_vn + cols_v[None, :] * stride_vd)
    mask_offsets = (batch * stride_mb + head * stride_mh + position.to(tl.int64) * stride_ms
                    + lo.to(tl.int64) * stride_mn)[:, None] + keys[None, :] * stride_mn

    if SPLIT:  # the sink joins in attention_combine, once
        m_i, l_i = _initial_max(sinks, head, BLOCK_M, False)
    else:
        m_i, l_i = _initial_max(sinks, head, BLOCK_M, HAS_SINKS)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)

    for phase in tl.static_range(3):
        # 0: the window's partly hidden first blocks; 1: blocks every row sees whole; 2: diagonal and end
        masked = phase != 1
        start, stop = _phase_range(phase, lo, clean_lo, clean_hi, hi)
        if phase != 0 or WINDOW:
            for start_n in tl.range(start, stop, BLOCK_N):
                step = start_n - lo
                key = start_n + keys
                in_range = key < Skv
                scores, k1 = _block_scores(q1, q2, k1_ptrs, k2_ptrs, k1_desc, k2_desc, batch32, kv_head32, start_n,
                                           step * stride_kn, in_range, cols1, cols2, HEAD_DQK, BLOCK_N, DQK1, DQK2,
                                           SPLIT_QK, masked, USE_TMA, DOT_DTYPE)
                if masked or HAS_MASK:
                    scores = _hidden_scores(scores, qk_scale, key[None, :], position[:, None], row_valid[:, None], Skv,
                                            causal_offset, window, mask, mask_offsets + step * stride_mn, CAUSAL,
                                            WINDOW, HAS_MASK, MASK_IS_BOOL)
                p, m_i, l_i, acc = _online_softmax(scores, m_i, l_i, acc, qk_scale, masked or HAS_MASK)
                if KV_SHARED:
                    values = k1
                else:
                    values = _load_block(v_ptrs, step * stride_vn, in_range[:, None] & (cols_v[None, :] < HEAD_DV),
                                         v_desc, batch32, kv_head32, start_n, 0, BLOCK_N, DV, masked or DV > HEAD_DV,
                                         USE_TMA, DOT_DTYPE)
                # p is rounded to the input type, as the matrix unit reads it
                acc = tl.dot(p.to(q.dtype.element_ty).to(DOT_DTYPE), values, acc, input_precision="ieee")

    if SPLIT:
        scratch_row = tl.program_id(1).to(tl.int64) * scratch_rows + (batch * q_heads + head) * Sq + position
        tl.store(partial_acc + scratch_row[:, None] * DV + cols_v[None, :], acc, mask=row_valid[:, None])
        tl.store(partial_stats + scratch_row * 2, m_i, mask=row_valid)
        tl.store(partial_stats + scratch_row * 2 + 1, l_i, mask=row_valid)
    else:
        if STORE_LSE:
            _store_lse(lse, (batch * q_heads + head) * Sq + position, m_i, l_i, row_valid)
        result = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_rows = out + batch * stride_ob + head * stride_oh + position.to(tl.int64) * stride_os
        tl.store(o_rows[:, None] + cols_v[None, :] * stride_od, result.to(out.dtype.element_ty),
                 mask=row_valid[:, None] & (cols_v[None, :] < HEAD_DV))


def attention_forward_one_block(
    q, k, v, mask, sinks, out, lse, partial_acc, partial_stats,
    Sq, Skv, kv_heads, group, q_heads, head_packs, chunk_packs, scratch_rows,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_ms, stride_mn,
    stride_ob, stride_oh, stride_os, stride_od,
    qk_scale, causal_offset, window,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, KEYS: tl.constexpr, PACK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SINKS: tl.constexpr, SPLIT: tl.constexpr, DV: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """SPLIT: program axis 1 takes the tile's keys KEYS at a time, writing unnormalised partial
    results (to rows of DV columns) for attention_combine, as the online kernel's splits do."""
    POSITIONS: tl.constexpr = BLOCK_M // PACK
    m_tiles = tl.cdiv(Sq, POSITIONS)
    m_tile, head_pack = _tile(m_tiles, head_packs, chunk_packs, CAUSAL)
    batch, kv_head, head, position, row_valid = _rows(m_tile, head_pack, group, kv_heads, Sq, BLOCK_M, PACK)
    first_position = m_tile * POSITIONS
    last_position = tl.minimum(first_position + POSITIONS, Sq) - 1
    lo, hi = _key_range(first_position, last_position, Skv, causal_offset, window, CAUSAL, WINDOW)
    if SPLIT:
        lo = lo + tl.program_id(1) * KEYS
    key = lo + tl.arange(0, KEYS)
    key_valid = key < hi

    q_rows = q + batch * stride_qb + head * stride_qh + position.to(tl.int64) * stride_qs
    k_rows = k + batch * stride_kb + kv_head * stride_kh + key.to(tl.int64) * stride_kn
    v_rows = v + batch * stride_vb + kv_head * stride_vh + key.to(tl.int64) * stride_vn
    cols = tl.arange(0, CHUNK)
    scores = tl.zeros([BLOCK_M, KEYS], tl.float32)
    for c in tl.range(0, HEAD_DQK, CHUNK):
        q_chunk = _load_chunk(q_rows, c, cols, row_valid, HEAD_DQK, stride_qd).to(DOT_DTYPE)
        k_chunk = _load_chunk(k_rows, c, cols, key_valid, HEAD_DQK, stride_kd).to(DOT_DTYPE)
        scores = tl.dot(q_chunk, tl.trans(k_chunk), scores, input_precision="ieee")

    visible = _visible(key[None, :], position[:, None], row_valid[:, None], Skv, causal_offset, window, CAUSAL,
                       WINDOW) & key_valid[None, :]
    mask_offsets = (batch * stride_mb + head * stride_mh + position.to(tl.int64) * stride_ms)[:, None] \
        + key.to(tl.int64)[None, :] * stride_mn
    scores = _mask_scores(scores * qk_scale, visible, mask, mask_offsets, HAS_MASK, MASK_IS_BOOL)
    m_i, l_i = _initial_max(sinks, head, BLOCK_M, HAS_SINKS and not SPLIT)
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_use = _usable_max(m_new)
    p = tl.math.exp2(scores - m_use[:, None])
    l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(p, 1)
    if SPLIT:  # attention_combine normalises (and adds the sink)
        scratch_row = tl.program_id(1).to(tl.int64) * scratch_rows + (batch * q_heads + head) * Sq + position
        tl.store(partial_stats + scratch_row * 2, m_new, mask=row_valid)
        tl.store(partial_stats + scratch_row * 2 + 1, l_i, mask=row_valid)
        o_rows = partial_acc + scratch_row * DV
        o_column_stride = 1
    else:
        if STORE_LSE:
            _store_lse(lse, (batch * q_heads + head) * Sq + position, m_new, l_i, row_valid)
        p = p / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_rows = out + batch * stride_ob + head * stride_oh + position.to(tl.int64) * stride_os
        o_column_stride = stride_od
    p = p.to(q.dtype.element_ty).to(DOT_DTYPE)  # rounded to the input type, as the matrix unit reads it

    for c in tl.range(0, HEAD_DV, CHUNK):
        v_chunk = _load_chunk(v_rows, c, cols, key_valid, HEAD_DV, stride_vd).to(DOT_DTYPE)
        result = tl.dot(p, v_chunk, input_precision="ieee")
        tl.store(o_rows[:, None] + (c + cols)[None, :] * o_column_stride, result.to(o_rows.dtype.element_ty),
                 mask=row_valid[:, None] & (c + cols < HEAD_DV)[None, :])


def attention_combine(
    partial_acc, partial_stats, sinks, out, lse,
    splits, scratch_rows, Sq, q_heads,
    stride_ob, stride_oh, stride_os, stride_od,
    HEAD_DV: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """Merge the split-KV partials of one row (= (batch·Hq + head)·Sq + position), BLOCK_D columns,
    reading BLOCK_S splits per step: first the max over all splits (and the sink), then the sum."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    position = row % Sq
    head = (row // Sq) % q_heads
    batch = row // Sq // q_heads
    split_ids = tl.arange(0, BLOCK_S)
    m = float("-inf")
    if HAS_SINKS:
        sink = tl.load(sinks + head).to(tl.float32) * LOG2E
        m = sink
    for first in tl.range(0, splits, BLOCK_S):
        stats = partial_stats + ((first + split_ids) * scratch_rows + row) * 2
        m = tl.maximum(m, tl.max(tl.load(stats, mask=first + split_ids < splits, other=float("-inf")), 0))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    denominator = 0.0
    if HAS_SINKS:
        denominator = tl.math.exp2(sink - m_use)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for first in tl.range(0, splits, BLOCK_S):
        split = first + split_ids
        in_range = split < splits
        scratch_row = split * scratch_rows + row
        weight = tl.math.exp2(tl.load(partial_stats + scratch_row * 2, mask=in_range, other=float("-inf")) - m_use)
        denominator += tl.sum(weight * tl.load(partial_stats + scratch_row * 2 + 1, mask=in_range, other=0.0), 0)
        partial = tl.load(partial_acc + scratch_row[:, None] * DV + cols[None, :], mask=in_range[:, None], other=0.0)
        acc += tl.sum(weight[:, None] * partial, 0)
    if STORE_LSE:
        _store_lse(lse, row, m, denominator, tl.program_id(1) == 0)
    result = acc / tl.where(denominator > 0.0, denominator, 1.0)
    tl.store(out + batch * stride_ob + head * stride_oh + position * stride_os + cols * stride_od,
             result.to(out.dtype.element_ty), mask=cols < HEAD_DV)


# ------------------------------------------------------------------------------------- backward
def _load_tile(ptrs, row_valid, cols, HEAD: tl.constexpr, COLUMNS: tl.constexpr, BOUNDED: tl.constexpr,
               DOT_DTYPE: tl.constexpr):
    """A [rows, COLUMNS] tile at `ptrs`: rows past the end (when BOUNDED) and columns past HEAD read as 0."""
    if BOUNDED or COLUMNS > HEAD:
        tile = tl.load(ptrs, mask=row_valid[:, None] & (cols[None, :] < HEAD), other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile.to(DOT_DTYPE)


def attention_backward_kv(
    q, k, v, mask, grad_out, lse, delta, grad_k, grad_v,
    Sq, Skv, kv_heads, group, q_heads, batches, head_splits, chunk,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_ms, stride_mn,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    qk_scale, scale, causal_offset, window,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, DQK1: tl.constexpr, DQK2: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """grad_k and grad_v of one block of BLOCK_N keys of one KV head, summed over the query heads
    of its group (axis 1 also splits the group `head_splits` ways; each split writes its own
    partial sums, batch index split·batches + batch, which the caller adds up).  The qk head dim
    is two column blocks DQK1 + DQK2 as in the forward (DQK2 unused when DQK1 covers it)."""
    SPLIT_QK: tl.constexpr = DQK1 < HEAD_DQK
    key_block, index = _tile(tl.cdiv(Skv, BLOCK_N), batches * kv_heads * head_splits, chunk, False)
    start_n = key_block * BLOCK_N
    split = index % head_splits
    batch = (index // head_splits // kv_heads).to(tl.int64)
    kv_head = ((index // head_splits) % kv_heads).to(tl.int64)
    heads_per_split = group // head_splits
    key = start_n + tl.arange(0, BLOCK_N)
    key_valid = key < Skv
    cols1 = tl.arange(0, DQK1)
    cols2 = DQK1 + tl.arange(0, DQK2)
    cols_v = tl.arange(0, DV)
    k_rows = k + batch * stride_kb + kv_head * stride_kh + key.to(tl.int64)[:, None] * stride_kn
    k1 = _load_tile(k_rows + cols1[None, :] * stride_kd, key_valid, cols1, HEAD_DQK, DQK1, True, DOT_DTYPE)
    grad_k1 = tl.zeros([BLOCK_N, DQK1], tl.float32)
    if SPLIT_QK:
        k2 = _load_tile(k_rows + cols2[None, :] * stride_kd, key_valid, cols2, HEAD_DQK, DQK1 + DQK2, True,
                        DOT_DTYPE)
        grad_k2 = tl.zeros([BLOCK_N, DQK2], tl.float32)
    v_tile = _load_tile(v + batch * stride_vb + kv_head * stride_vh + key.to(tl.int64)[:, None] * stride_vn
                        + cols_v[None, :] * stride_vd, key_valid, cols_v, HEAD_DV, DV, True, DOT_DTYPE)
    grad_v_acc = tl.zeros([BLOCK_N, DV], tl.float32)

    # [lo, hi): the query rows that see some key of the block; [clean_lo, clean_hi) (on the grid
    # lo + j·BLOCK_M): row blocks that see every key of the block.
    lo = start_n * 0
    hi = lo + Sq
    clean_lo = lo
    clean_limit = lo + Sq
    if CAUSAL:
        lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        first_full = start_n + BLOCK_N - 1 - causal_offset
        clean_lo = tl.where(first_full > lo, lo + ((first_full - lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    if WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 - causal_offset + window)
        clean_limit = tl.minimum(clean_limit, start_n - causal_offset + window)
    hi = tl.maximum(hi, lo)
    clean_hi = lo + (tl.maximum(clean_limit - lo, 0) // BLOCK_M) * BLOCK_M
    clean_hi = tl.where(start_n + BLOCK_N > Skv, lo, clean_hi)
    clean_lo = tl.minimum(clean_lo, hi)
    clean_hi = tl.minimum(tl.maximum(clean_hi, clean_lo), hi)

    rows = tl.arange(0, BLOCK_M)
    for h in tl.range(0, heads_per_split):
        head = kv_head * group + split * heads_per_split + h
        q_head = q + batch * stride_qb + head * stride_qh
        g_head = grad_out + batch * stride_gb + head * stride_gh
        row_stats = (batch * q_heads + head) * Sq
        mask_head = batch * stride_mb + head * stride_mh
        for phase in tl.static_range(3):
            # 0: row blocks at the causal diagonal; 1: row blocks that see the whole key block; 2: the rest
            masked = phase != 1
            start, stop = _phase_range(phase, lo, clean_lo, clean_hi, hi)
            if phase != 0 or CAUSAL:
                for start_m in tl.range(start, stop, BLOCK_M):
                    position = start_m + rows
                    row_valid = position < Sq
                    q_rows = q_head + position.to(tl.int64)[:, None] * stride_qs
                    q1 = _load_tile(q_rows + cols1[None, :] * stride_qd, row_valid, cols1, HEAD_DQK, DQK1, masked,
                                    DOT_DTYPE)
                    g_tile = _load_tile(g_head + position.to(tl.int64)[:, None] * stride_gs + cols_v[None, :]
                                        * stride_gd, row_valid, cols_v, HEAD_DV, DV, masked, DOT_DTYPE)
                    lse2 = tl.load(lse + row_stats + position, mask=row_valid, other=float("inf")) * LOG2E
                    row_delta = tl.load(delta + row_stats + position, mask=row_valid, other=0.0)
                    scores_t = tl.dot(k1, tl.trans(q1), input_precision="ieee")  # [keys, rows]
                    if SPLIT_QK:
                        q2 = _load_tile(q_rows + cols2[None, :] * stride_qd, row_valid, cols2, HEAD_DQK,
                                        DQK1 + DQK2, masked, DOT_DTYPE)
                        scores_t = tl.dot(k2, tl.trans(q2), scores_t, input_precision="ieee")
                    if masked or HAS_MASK:  # p = exp2(s - lse), hidden keys at -inf first
                        offsets = mask_head + key.to(tl.int64)[:, None] * stride_mn \
                            + position.to(tl.int64)[None, :] * stride_ms
                        scores_t = _hidden_scores(scores_t, qk_scale, key[:, None], position[None, :],
                                                  row_valid[None, :], Skv, causal_offset, window, mask, offsets,
                                                  CAUSAL, WINDOW, HAS_MASK, MASK_IS_BOOL)
                        p_t = tl.math.exp2(scores_t - lse2[None, :])
                    else:
                        p_t = tl.math.exp2(scores_t * qk_scale - lse2[None, :])
                    grad_v_acc = tl.dot(p_t.to(q.dtype.element_ty).to(DOT_DTYPE), g_tile, grad_v_acc,
                                        input_precision="ieee")
                    grad_p_t = tl.dot(v_tile, tl.trans(g_tile), input_precision="ieee")
                    grad_s_t = p_t * (grad_p_t - row_delta[None, :])
                    grad_s_t = grad_s_t.to(q.dtype.element_ty).to(DOT_DTYPE)
                    grad_k1 = tl.dot(grad_s_t, q1, grad_k1, input_precision="ieee")
                    if SPLIT_QK:
                        grad_k2 = tl.dot(grad_s_t, q2, grad_k2, input_precision="ieee")

    out_batch = split * batches + batch
    grad_k_rows = grad_k + out_batch * stride_dkb + kv_head * stride_dkh + key.to(tl.int64)[:, None] * stride_dkn
    tl.store(grad_k_rows + cols1[None, :] * stride_dkd, (grad_k1 * scale).to(grad_k.dtype.element_ty),
             mask=key_valid[:, None] & (cols1[None, :] < HEAD_DQK))
    if SPLIT_QK:
        tl.store(grad_k_rows + cols2[None, :] * stride_dkd, (grad_k2 * scale).to(grad_k.dtype.element_ty),
                 mask=key_valid[:, None] & (cols2[None, :] < HEAD_DQK))
    tl.store(grad_v + out_batch * stride_dvb + kv_head * stride_dvh + key.to(tl.int64)[:, None] * stride_dvn
             + cols_v[None, :] * stride_dvd, grad_v_acc.to(grad_v.dtype.element_ty),
             mask=key_valid[:, None] & (cols_v[None, :] < HEAD_DV))


def attention_backward_q(
    q, k, v, mask, out, grad_out, lse, delta, grad_q,
    Sq, Skv, kv_heads, group, q_heads, batches, chunk,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_ms, stride_mn,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    qk_scale, scale, causal_offset, window,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, DQK1: tl.constexpr, DQK2: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """grad_q of BLOCK_M query rows of one head: the forward's key loop (same phases) with
    p recomputed from lse.  It also stores each row's D = Σ_d grad_out·out, which
    attention_backward_kv reads (so it runs first)."""
    SPLIT_QK: tl.constexpr = DQK1 < HEAD_DQK
    m_tiles = tl.cdiv(Sq, BLOCK_M)
    m_tile, index = _tile(m_tiles, batches * q_heads, chunk, CAUSAL)
    batch = (index // q_heads).to(tl.int64)
    head = (index % q_heads).to(tl.int64)
    kv_head = head // group
    first_position = m_tile * BLOCK_M
    last_position = tl.minimum(first_position + BLOCK_M, Sq) - 1
    position = first_position + tl.arange(0, BLOCK_M)
    row_valid = position < Sq
    cols1 = tl.arange(0, DQK1)
    cols2 = DQK1 + tl.arange(0, DQK2)
    cols_v = tl.arange(0, DV)
    q_rows = q + batch * stride_qb + head * stride_qh + position.to(tl.int64)[:, None] * stride_qs
    q1 = _load_tile(q_rows + cols1[None, :] * stride_qd, row_valid, cols1, HEAD_DQK, DQK1, True, DOT_DTYPE)
    acc1 = tl.zeros([BLOCK_M, DQK1], tl.float32)
    if SPLIT_QK:
        q2 = _load_tile(q_rows + cols2[None, :] * stride_qd, row_valid, cols2, HEAD_DQK, DQK1 + DQK2, True,
                        DOT_DTYPE)
        acc2 = tl.zeros([BLOCK_M, DQK2], tl.float32)
    g_tile = _load_tile(grad_out + batch * stride_gb + head * stride_gh + position.to(tl.int64)[:, None] * stride_gs
                        + cols_v[None, :] * stride_gd, row_valid, cols_v, HEAD_DV, DV, True, DOT_DTYPE)
    o_tile = _load_tile(out + batch * stride_ob + head * stride_oh + position.to(tl.int64)[:, None] * stride_os
                        + cols_v[None, :] * stride_od, row_valid, cols_v, HEAD_DV, DV, True, tl.float32)
    row_delta = tl.sum(o_tile * g_tile.to(tl.float32), 1)
    row_stats = (batch * q_heads + head) * Sq + position
    tl.store(delta + row_stats, row_delta, mask=row_valid)
    lse2 = tl.load(lse + row_stats, mask=row_valid, other=float("inf")) * LOG2E

    lo, hi = _key_range(first_position, last_position, Skv, causal_offset, window, CAUSAL, WINDOW)
    clean_lo, clean_hi = _clean_keys(lo, first_position, last_position, Skv, causal_offset, window, BLOCK_N, CAUSAL,
                                     WINDOW)
    clean_lo = tl.minimum(tl.maximum(clean_lo, lo), hi)
    clean_hi = tl.minimum(tl.maximum(clean_hi, clean_lo), hi)
    k_head = k + batch * stride_kb + kv_head * stride_kh
    v_head = v + batch * stride_vb + kv_head * stride_vh
    mask_rows = (batch * stride_mb + head * stride_mh + position.to(tl.int64) * stride_ms)[:, None]
    keys = tl.arange(0, BLOCK_N)
    for phase in tl.static_range(3):
        # 0: the window's partly hidden first blocks; 1: blocks every row sees whole; 2: diagonal and end
        masked = phase != 1
        start, stop = _phase_range(phase, lo, clean_lo, clean_hi, hi)
        if phase != 0 or WINDOW:
            for start_n in tl.range(start, stop, BLOCK_N):
                key = start_n + keys
                key_valid = key < Skv
                k_rows = k_head + key.to(tl.int64)[:, None] * stride_kn
                k1 = _load_tile(k_rows + cols1[None, :] * stride_kd, key_valid, cols1, HEAD_DQK, DQK1, masked,
                                DOT_DTYPE)
                v_tile = _load_tile(v_head + key.to(tl.int64)[:, None] * stride_vn + cols_v[None, :] * stride_vd,
                                    key_valid, cols_v, HEAD_DV, DV, masked, DOT_DTYPE)
                scores = tl.dot(q1, tl.trans(k1), input_precision="ieee")
                if SPLIT_QK:
                    k2 = _load_tile(k_rows + cols2[None, :] * stride_kd, key_valid, cols2, HEAD_DQK, DQK1 + DQK2,
                                    masked, DOT_DTYPE)
                    scores = tl.dot(q2, tl.trans(k2), scores, input_precision="ieee")
                if masked or HAS_MASK:  # p = exp2(s - lse), hidden keys at -inf first
                    scores = _hidden_scores(scores, qk_scale, key[None, :], position[:, None], row_valid[:, None], Skv,
                                            causal_offset, window, mask,
                                            mask_rows + key.to(tl.int64)[None, :] * stride_mn, CAUSAL, WINDOW,
                                            HAS_MASK, MASK_IS_BOOL)
                    p = tl.math.exp2(scores - lse2[:, None])
                else:
                    p = tl.math.exp2(scores * qk_scale - lse2[:, None])
                grad_p = tl.dot(g_tile, tl.trans(v_tile), input_precision="ieee")
                grad_s = p * (grad_p - row_delta[:, None])
                grad_s = grad_s.to(q.dtype.element_ty).to(DOT_DTYPE)
                acc1 = tl.dot(grad_s, k1, acc1, input_precision="ieee")
                if SPLIT_QK:
                    acc2 = tl.dot(grad_s, k2, acc2, input_precision="ieee")
    grad_q_rows = grad_q + batch * stride_dqb + head * stride_dqh + position.to(tl.int64)[:, None] * stride_dqs
    tl.store(grad_q_rows + cols1[None, :] * stride_dqd, (acc1 * scale).to(grad_q.dtype.element_ty),
             mask=row_valid[:, None] & (cols1[None, :] < HEAD_DQK))
    if SPLIT_QK:
        tl.store(grad_q_rows + cols2[None, :] * stride_dqd, (acc2 * scale).to(grad_q.dtype.element_ty),
                 mask=row_valid[:, None] & (cols2[None, :] < HEAD_DQK))


def attention_backward_q_one_block(
    q, k, v, mask, out, grad_out, lse, delta, grad_q,
    Sq, Skv, kv_heads, group, q_heads, head_packs, chunk_packs,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_ms, stride_mn,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_gb, stride_gh, stride_gs, stride_gd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    qk_scale, scale, causal_offset, window,
    HEAD_DQK: tl.constexpr, HEAD_DV: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, KEYS: tl.constexpr, PACK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """grad_q, and each row's D, of one tile of BLOCK_M rows (PACK query heads of a GQA group ×
    BLOCK_M / PACK positions) whose visible keys fit one block of KEYS, as in the one-block
    forward: q·kᵀ and grad_out·vᵀ are summed CHUNK columns at a time and grad_q is written CHUNK
    columns at a time, so no [rows, head dim] accumulator is held (DeepSeek-V4's 512)."""
    POSITIONS: tl.constexpr = BLOCK_M // PACK
    m_tiles = tl.cdiv(Sq, POSITIONS)
    m_tile, head_pack = _tile(m_tiles, head_packs, chunk_packs, CAUSAL)
    batch, kv_head, head, position, row_valid = _rows(m_tile, head_pack, group, kv_heads, Sq, BLOCK_M, PACK)
    first_position = m_tile * POSITIONS
    lo, hi = _key_range(first_position, tl.minimum(first_position + POSITIONS, Sq) - 1, Skv, causal_offset, window,
                        CAUSAL, WINDOW)
    key = lo + tl.arange(0, KEYS)
    key_valid = key < hi
    positions = position.to(tl.int64)
    q_rows = q + batch * stride_qb + head * stride_qh + positions * stride_qs
    g_rows = grad_out + batch * stride_gb + head * stride_gh + positions * stride_gs
    o_rows = out + batch * stride_ob + head * stride_oh + positions * stride_os
    k_rows = k + batch * stride_kb + kv_head * stride_kh + key.to(tl.int64) * stride_kn
    v_rows = v + batch * stride_vb + kv_head * stride_vh + key.to(tl.int64) * stride_vn
    cols = tl.arange(0, CHUNK)

    scores = tl.zeros([BLOCK_M, KEYS], tl.float32)
    for c in tl.range(0, HEAD_DQK, CHUNK):
        q_chunk = _load_chunk(q_rows, c, cols, row_valid, HEAD_DQK, stride_qd).to(DOT_DTYPE)
        k_chunk = _load_chunk(k_rows, c, cols, key_valid, HEAD_DQK, stride_kd).to(DOT_DTYPE)
        scores = tl.dot(q_chunk, tl.trans(k_chunk), scores, input_precision="ieee")
    grad_p = tl.zeros([BLOCK_M, KEYS], tl.float32)
    row_delta = tl.zeros([BLOCK_M], tl.float32)
    for c in tl.range(0, HEAD_DV, CHUNK):
        g_chunk = _load_chunk(g_rows, c, cols, row_valid, HEAD_DV, stride_gd).to(DOT_DTYPE)
        v_chunk = _load_chunk(v_rows, c, cols, key_valid, HEAD_DV, stride_vd).to(DOT_DTYPE)
        grad_p = tl.dot(g_chunk, tl.trans(v_chunk), grad_p, input_precision="ieee")
        o_chunk = _load_chunk(o_rows, c, cols, row_valid, HEAD_DV, stride_od).to(tl.float32)
        row_delta += tl.sum(o_chunk * g_chunk.to(tl.float32), 1)
    row_stats = (batch * q_heads + head) * Sq + position
    tl.store(delta + row_stats, row_delta, mask=row_valid)

    lse2 = tl.load(lse + row_stats, mask=row_valid, other=float("inf")) * LOG2E
    mask_offsets = (batch * stride_mb + head * stride_mh + positions * stride_ms)[:, None] \
        + key.to(tl.int64)[None, :] * stride_mn
    scores = _hidden_scores(scores, qk_scale, key[None, :], position[:, None], row_valid[:, None], Skv, causal_offset,
                            window, mask, mask_offsets, CAUSAL, WINDOW, HAS_MASK, MASK_IS_BOOL)
    p = tl.math.exp2(scores - lse2[:, None])
    grad_s = (p * (grad_p - row_delta[:, None])).to(q.dtype.element_ty).to(DOT_DTYPE)
    dq_rows = grad_q + batch * stride_dqb + head * stride_dqh + positions * stride_dqs
    for c in tl.range(0, HEAD_DQK, CHUNK):
        k_chunk = _load_chunk(k_rows, c, cols, key_valid, HEAD_DQK, stride_kd).to(DOT_DTYPE)
        share = tl.dot(grad_s, k_chunk, input_precision="ieee") * scale
        tl.store(dq_rows[:, None] + (c + cols)[None, :] * stride_dqd, share.to(grad_q.dtype.element_ty),
                 mask=row_valid[:, None] & (c + cols < HEAD_DQK)[None, :])
