"""fuse-attention: rewrite softmax(scale·q·kᵀ + mask)·v subgraphs into one `ft.attention`.

A candidate is every `ft.softmax` and every manual softmax `exp(s - amax(s)) / sum(...)`.
From it the pass reads the scores back to their q·kᵀ matmul(s) and follows the
probabilities to their p·v matmul, proves the rewrite exact, and builds `ft.attention`
(operands and attributes per flagtree/ir/ops/attention.py) with the reshapes and
transposes that bring q, k and v to [B, H, S, D].  Anything it cannot prove is left
alone; `explain=true` (flagtree-opt --explain) prints one line per candidate: fused with
its attributes, or the constraint that failed, at the softmax's file:line.

Recognised
- scores `q @ kᵀ` through reshapes and unit-dim transposes that keep element order (bmm
  on merged batch dims, rank-2 [S, D] and rank-3 [H, S, D] spellings, einsum's views); k
  transposed anywhere on its way; the sum of two score products (MLA's absorbed
  `q_nope·c_kvᵀ + q_pe·k_peᵀ`) as one attention over the concatenated head dims; a
  matmul whose rows hold several heads (absorbed MLA's [b, s·h, t]) with heads as rows.
- scale: positive constant multiplies and divides on q, on k and on the scores, combined;
  none is 1.0.
- softmax: `ft.softmax` on the last dim, casts around it (fp32 upcast); the manual
  `exp(s - amax(s)) / sum(...)`; a sink column `softmax(cat([s, sink], -1))[..., :-1]`; a
  sink in the denominator `m = max(amax(s), sink); e = exp(s - m); e / (sum(e) + exp(sink - m))`.
- masks by `where` in either branch order (masked_fill imports as where) or as an
  additive `where(m, 0, fill)`, fill = -inf, the dtype's lowest value, or <= -1e9.
  affine_mask.py proves index masks (iota / tril / triu comparisons, and/or/not) equal to
  a causal band (upper_left or lower_right, static or symbolic offset) with an optional
  window; any other mask (a padding mask argument, a float bias, a band at another
  offset) becomes the mask operand, broadcast to rank 4.
- K / V repeated over query heads by broadcasting, expand + reshape or repeat_interleave
  (head h reads KV head h // group) are read without the repeat; a repeat in the other
  order (`repeat`, tiling) fuses with the repeat kept.
- MLA head dims (qk ≠ v), decode and chunked prefill against a KV cache.

Not fused (near misses, reported by explain): dropout or any other op between the
softmax and p·v; probabilities used elsewhere (returned weights, saved for backward); a
softmax over another dim; a scale that is a run-time tensor, or not positive; fills such
as -1e4 or 0 that do not hide a key exactly; an additive bias added after a finite fill
(it could undo the fill; a bias added before the fill is replaced by it and fuses); masks
applied before a reshape of the scores; score products scaled differently on q or k; a
softmax without its row maximum subtracted.

Deviations from eager, all at least as accurate: scores and softmax are computed in f32
(f64 for f64) whatever precision the spelling used; a row whose every key is masked
gives 0 (eager gives NaN for -inf, uniform weights for a finite fill); a key hidden by a
finite fill <= -1e9 gets weight 0 (eager: exp(fill + s - max), 0 unless |s| ~ 1e9).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from typing import ClassVar

from flagtree.ir.builder import Builder
from flagtree.ir.core import Location, Module, Operation, OpResult, Value
from flagtree.ir.types import ScalarType, TensorType
from flagtree.passes.affine_mask import (
    ALL_VISIBLE,
    TRUE,
    Formula,
    MaskAnalysis,
    Size,
    Sizes,
    Visibility,
    classify,
    conjoin,
    is_mask_fill,
    is_unit,
    map_formula,
    materialize,
    negate,
    product_of,
)
from flagtree.passes.base import Pass, register_pass
from flagtree.passes.canonicalize import holds_exactly
from flagtree.passes.rewrite import constant, fill_value, replace_op

_VIEWS = frozenset({"ft.reshape", "ft.transpose", "ft.broadcast_to"})


@register_pass
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Rewrite softmax(scale·q·kᵀ + mask)·v subgraphs into ft.attention (spellings in passes/fuse_attention.py)."""

    name: ClassVar[str] = "fuse-attention"
    explain: bool = False

    def run(self, module: Module) -> bool:
        decisions = fuse_attention(module)
        if self.explain:
            for decision in decisions:
                print(decision.line(), file=sys.stderr)
        return any(d.fused for d in decisions)


@dataclass(frozen=True)
class Decision:
    """What fuse-attention did with one candidate softmax."""

    location: Location
    candidate: str
    fused: bool
    detail: str

    def line(self) -> str:
        verdict = "fused into ft.attention" if self.fused else "not fused"
        return f"{_source_position(self.location)}: fuse-attention: {self.candidate} {verdict}: {self.detail}"


def _source_position(location: Location) -> str:
    if location.file:
        return f"{location.file}:{location.line}"
    return location.name or "<unknown location>"


class NearMiss(Exception):
    """A candidate that looks like attention but breaks a constraint (the message)."""


def fuse_attention(module: Module) -> list[Decision]:
    """Fuse every attention subgraph of `module` in place; one Decision per candidate softmax."""
    candidates = [(op, form) for op in module.walk() if (form := _candidate_form(op)) is not None]
    # A candidate an earlier fusion consumed has been erased (it has no parent block).
    return [_fuse_candidate(op, form) for op, form in candidates if op.parent is not None]


def _fuse_candidate(root: Operation, form: str) -> Decision:
    try:
        match = _Matcher(Sizes()).match(root, form)
    except NearMiss as miss:
        return Decision(root.location, form, False, str(miss))
    detail = match.describe()
    _Emitter(match, root.location).emit()
    return Decision(root.location, form, True, detail)


# --------------------------------------------------------------------------- candidates


def _candidate_form(op: Operation) -> str | None:
    """'ft.softmax', 'manual softmax' or None: whether `op` is a softmax to try."""
    if op.name == "ft.softmax":
        return "ft.softmax"
    if op.name == "ft.div" and _producer(op.operands[0], "ft.exp") is not None and _reads(op.operands[1], "ft.sum"):
        return "manual softmax"
    return None


def _producer(value: Value, *names: str) -> Operation | None:
    """The op defining `value` if it is one of `names`."""
    return value.op if isinstance(value, OpResult) and value.op.name in names else None


def _reads(value: Value, name: str) -> bool:
    """Whether `value` is `name`'s result or the sum of one with something else."""
    if _producer(value, name) is not None:
        return True
    total = _producer(value, "ft.add")
    return total is not None and any(_producer(o, name) is not None for o in total.operands)


def _last_dim(dims: tuple[int, ...], rank: int) -> bool:
    return len(dims) == 1 and dims[0] % rank == rank - 1


def _splat_number(value: Value) -> float | None:
    """The one number every element of `value` holds (a literal or ft.full, through views)."""
    while isinstance(value, OpResult) and value.op.name in ("ft.reshape", "ft.broadcast_to"):
        value = value.op.operands[0]
    number = fill_value(value)
    return float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else None


def _location_of(value: Value) -> str:
    return _source_position(value.op.location) if isinstance(value, OpResult) else "a function argument"


# ------------------------------------------------------------------------------ matching


@dataclass
class Keep:
    """One mask on the scores: keys stay visible where `tensor` says so.

    kind "keep": an i1 tensor, true = visible; "hide": an i1 tensor, true = hidden;
    "additive": a float tensor added to the scores (times `multiplier`).  `formula`
    is the affine_mask Formula of the visible set when the analysis could read it;
    `finite_fill`: it hides keys with a finite constant such as -1e9, not -inf."""

    tensor: Value
    kind: str
    formula: Formula | None = None
    multiplier: float = 1.0
    finite_fill: bool = False


@dataclass
class Scores:
    """The softmax input, read back to its score matmuls."""

    products: list[Operation]
    scale: float = 1.0
    keeps: list[Keep] = field(default_factory=list)


@dataclass
class Factor:
    """One mixed-radix digit of the flat batch index n of the scores [batch..., Sq, Skv].

    An operand reads its source at the digits it does not `broadcast` over; `head`: the
    digit belongs to the heads (else to the batch, the scores' first dim)."""

    size: Size
    broadcast: bool
    head: bool


@dataclass
class Operand:
    """How q, k or v reads its source: `source` holds [batch..., rows, cols] matrices
    (transposed when `swapped`) whose flat batch index is the non-broadcast factors."""

    source: Value
    factors: list[Factor]
    swapped: bool
    rows: Size
    cols: Size
    extra: Size
    scale: float = 1.0


@dataclass
class Match:
    """Everything needed to build the ft.attention."""

    value_product: Operation
    queries: list[Operand]
    keys: list[Operand]
    values: Operand
    batch: list[Size]
    rows: Size
    keys_count: Size
    scale: float
    visibility: Visibility
    masks: list[Keep]
    sinks: Value | None

    def describe(self) -> str:
        group = _stripped_group([*self.keys, self.values])
        kinds = sorted({"bool" if m.kind in ("keep", "hide") else "additive" for m in self.masks})
        parts = [f"causal={self.visibility.causal}", f"window={self.visibility.window}", f"scale={self.scale:.6g}",
                 f"mask={'+'.join(kinds) or 'none'}", f"sinks={'yes' if self.sinks is not None else 'no'}",
                 f"kv-group={group}"]
        if len(self.queries) > 1:
            parts.append("qk=concat of 2 products")
        return ", ".join(parts)


class _Matcher:
    def __init__(self, sizes: Sizes):
        self.sizes = sizes
        self.masks = MaskAnalysis(sizes)

    def match(self, root: Operation, form: str) -> Match:
        scores_value, probabilities, sink, sink_column = self._softmax(root, form)
        if scores_value.type.rank < 2:
            raise NearMiss(f"the softmax input has rank {scores_value.type.rank}; attention scores have a query "
                           f"and a key dim")
        batch = self.sizes.shape(scores_value)[:-2]
        rows, keys = self.sizes.dim(scores_value, -2), self.sizes.dim(scores_value, -1)
        scores = self._peel(scores_value, 1.0, True)
        _check_fills_hold(scores.keeps)
        value_product, value_rows = self._value_product(probabilities, sink_column, keys, scores_value)
        queries, key_operands = self._score_operands(scores.products, batch, rows, keys)
        extra = self._row_blocks(value_rows, rows, keys, batch, "the probabilities")
        # A constant factor on v would scale the result, not the scores: v keeps it.
        values = self._operand(value_product.operands[1], keys, self.sizes.dim(value_product.operands[1], -1),
                               extra, value_product, batch, False, peel_scale=False)
        _check_dtypes(scores.products[0], value_product)
        self._check_result_sizes(value_product)
        visibility, general = self._visibility(scores.keeps, scores_value, rows, keys)
        return Match(value_product, queries, key_operands, values, batch, rows, keys,
                     scores.scale * queries[0].scale * key_operands[0].scale, visibility, general,
                     self._sinks(sink, batch, scores_value) if sink is not None else None)

    def _score_operands(self, products: list[Operation], batch: list[Size], rows: Size,
                        keys: Size) -> tuple[list[Operand], list[Operand]]:
        """The q and k operands of each score product, all scaled alike."""
        queries, key_operands = [], []
        for product in products:
            extra = self._row_blocks(product.result, rows, keys, batch, "the q·kᵀ matmul")
            lhs, rhs = product.operands
            depth = self.sizes.dim(lhs, -1)
            queries.append(self._operand(lhs, rows, depth, extra, product, batch, True))
            key_operands.append(self._operand(rhs, depth, keys, extra, product, batch, False))
        if len({o.scale for o in queries}) > 1 or len({o.scale for o in key_operands}) > 1:
            raise NearMiss("the two score products are scaled differently on q or k")
        return queries, key_operands

    def _check_result_sizes(self, value_product: Operation) -> None:
        """The fused result is reshaped to the p·v matmul's type: its dynamic sizes must not need the matmul."""
        if any(symbol.value is value_product.result for size in self.sizes.shape(value_product.result)
               for monomial, _ in size.terms for symbol in monomial):
            raise NearMiss("the sizes of the p·v matmul's result are not known from its operands")

    # --------------------------------------------------------------------- softmax
    def _softmax(self, root: Operation, form: str) -> tuple[Value, Value, Value | None, bool]:
        """(scores, probabilities, sink logits or None, whether the sink is a concatenated column)."""
        if form == "ft.softmax":
            rank = root.result.type.rank
            if root.attributes["dim"] % max(rank, 1) != rank - 1:
                raise NearMiss(f"softmax over dim {root.attributes['dim']}, not the last (key) dim")
            scores = root.operands[0]
            joined = _producer(_through_casts(scores), "ft.concat")
            if joined is not None and joined.attributes["dim"] % rank == rank - 1:
                if len(joined.operands) != 2 or joined.operands[1].type.shape[-1] != 1:
                    raise NearMiss("the softmax input is a concatenation that is not [scores, one sink column]")
                return joined.operands[0], root.result, joined.operands[1], True
            return scores, root.result, None, False
        return (*self._manual_softmax(root), False)

    def _manual_softmax(self, root: Operation) -> tuple[Value, Value, Value | None]:
        numerator, denominator = root.operands
        exponent = _producer(numerator, "ft.exp")
        shifted = _producer(exponent.operands[0], "ft.sub")
        if shifted is None:
            raise NearMiss("the manual softmax exponentiates the scores without subtracting their row maximum")
        scores, row_max = shifted.operands
        sink = self._row_max_sink(row_max, scores)
        total = _producer(self._denominator(denominator, numerator, sink, row_max), "ft.sum")
        if not total.attributes["keepdim"] or not _last_dim(total.attributes["dims"], scores.type.rank):
            raise NearMiss("the manual softmax's sum is not taken over the last (key) dim with keepdim")
        if root.result.type != numerator.type:
            raise NearMiss("the manual softmax's division broadcasts its exponentials")
        return scores, root.result, sink

    def _row_max_sink(self, row_max: Value, scores: Value) -> Value | None:
        """The sink logit of `max(amax(scores), sink)`, None for a plain `amax(scores)`."""
        sink = None
        combined = _producer(row_max, "ft.maximum")
        if combined is not None:
            amaxes = [o for o in combined.operands if _producer(o, "ft.amax") is not None]
            if len(amaxes) != 1:
                raise NearMiss("the manual softmax subtracts a maximum that is not amax(scores) or max(amax, sink)")
            sink = next(o for o in combined.operands if o is not amaxes[0])
            row_max = amaxes[0]
        amax = _producer(row_max, "ft.amax")
        if amax is None or amax.operands[0] is not scores:
            raise NearMiss("the manual softmax subtracts something other than the row maximum of its scores")
        if not amax.attributes["keepdim"] or not _last_dim(amax.attributes["dims"], scores.type.rank):
            raise NearMiss("the manual softmax's maximum is not taken over the last (key) dim")
        return sink

    def _denominator(self, denominator: Value, numerator: Value, sink: Value | None, row_max: Value) -> Value:
        """The ft.sum of the denominator, after checking that the sink term (if any) is exp(sink - max)."""
        if sink is None:
            total = _producer(denominator, "ft.sum")
            if total is None or total.operands[0] is not numerator:
                raise NearMiss("the manual softmax divides by something other than the sum of its exponentials")
            return denominator
        plus = _producer(denominator, "ft.add")
        if plus is None:
            raise NearMiss("the manual softmax with a sink does not add exp(sink - max) to its denominator")
        sums = [o for o in plus.operands if _producer(o, "ft.sum") is not None and o.op.operands[0] is numerator]
        others = [o for o in plus.operands if o is not (sums[0] if sums else None)]
        term = _producer(others[0], "ft.exp") if sums and others else None
        difference = _producer(term.operands[0], "ft.sub") if term is not None else None
        if difference is None or difference.operands[0] is not sink or difference.operands[1] is not row_max:
            raise NearMiss("the sink's denominator term is not exp(sink - max)")
        return sums[0]

    # ---------------------------------------------------------------------- scores
    def _peel(self, value: Value, scale_after: float, in_layout: bool) -> Scores:
        """Read the scores back to their q·kᵀ matmul(s): casts, constant scales, masks,
        biases, and views that keep element order.  `scale_after` multiplies `value` before
        the softmax; `in_layout`: `value` still has the softmax input's layout."""
        if not isinstance(value, OpResult):
            raise NearMiss("the scores are a function argument, not a q·kᵀ matmul")
        op = value.op
        if op.name == "ft.matmul":
            return Scores([op])
        if op.name == "ft.cast" and op.operands[0].type.dtype.is_float:
            return self._peel(op.operands[0], scale_after, in_layout)
        if op.name in ("ft.mul", "ft.div"):
            return self._peel_scale(op, scale_after, in_layout)
        if op.name == "ft.where":
            return self._peel_where(op, scale_after, in_layout)
        if op.name == "ft.add":
            return self._peel_sum(op, scale_after, in_layout)
        if op.name in _VIEWS:
            if not self._keeps_order(op):
                raise NearMiss(f"the scores go through a {op.name} at {_location_of(value)} that reorders them")
            return self._peel(op.operands[0], scale_after, False)
        raise NearMiss(f"the scores come from {op.name} at {_location_of(value)}, not from a q·kᵀ matmul")

    def _peel_scale(self, op: Operation, scale_after: float, in_layout: bool) -> Scores:
        main, factor = self._scaled_operand(op)
        number = _splat_number(factor) if factor is not None else None
        if number is None:
            raise NearMiss(f"the scores are scaled by a tensor that is not a constant ({op.name} at "
                           f"{_location_of(op.result)}); ft.attention's scale is a number")
        if not (math.isfinite(number) and number > 0):
            raise NearMiss(f"the scores are scaled by {number}; only a positive finite scale keeps the masks")
        multiplier = number if op.name == "ft.mul" else 1.0 / number
        scores = self._peel(main, scale_after * multiplier, in_layout)
        scores.scale *= multiplier
        return scores

    @staticmethod
    def _scaled_operand(op: Operation) -> tuple[Value, Value | None]:
        """(the operand carrying the scores, the scaling operand) of an ft.mul / ft.div."""
        lhs, rhs = op.operands
        candidates = [(lhs, rhs)] + ([(rhs, lhs)] if op.name == "ft.mul" else [])
        for main, factor in candidates:
            if main.type == op.result.type and _splat_number(factor) is not None:
                return main, factor
        return (lhs, None) if lhs.type == op.result.type else (rhs, None)

    def _peel_where(self, op: Operation, scale_after: float, in_layout: bool) -> Scores:
        condition, if_true, if_false = op.operands
        dtype = op.result.type.dtype
        for main, fill, kind in ((if_true, if_false, "keep"), (if_false, if_true, "hide")):
            number = _splat_number(fill)
            if main.type == op.result.type and number is not None and is_mask_fill(number, dtype, scale_after):
                if not in_layout:
                    raise NearMiss("a mask is applied to the scores before a reshape; only masks on the softmax "
                                   "input's layout are understood")
                scores = self._peel(main, scale_after, in_layout)
                scores.keeps.append(Keep(condition, kind, self._formula(condition, kind),
                                         finite_fill=math.isfinite(number)))
                return scores
        fills = [n for n in (_splat_number(if_true), _splat_number(if_false)) if n is not None]
        what = f"the constant {fills[0]:g}" if fills else "a tensor"
        raise NearMiss(f"a where at {_location_of(op.result)} fills the scores with {what}, which does not hide a key "
                       f"exactly (a mask fill is -inf, the dtype's lowest value or a constant <= -1e9)")

    def _peel_sum(self, op: Operation, scale_after: float, in_layout: bool) -> Scores:
        first_miss = None
        for main, other in ((op.operands[0], op.operands[1]), (op.operands[1], op.operands[0])):
            if main.type != op.result.type:
                continue
            try:
                scores = self._peel(main, scale_after, in_layout)
            except NearMiss as miss:
                first_miss = first_miss or miss
                continue
            second = self._second_product(other, op.result, scale_after, in_layout)
            if second is not None:
                return self._combined(scores, second)
            if not in_layout:
                raise NearMiss("a bias is added to the scores before a reshape; only biases on the softmax input's "
                               "layout are understood")
            scores.keeps.append(self._bias(other, scale_after))
            return scores
        raise first_miss or NearMiss("an add whose operands both broadcast into the scores")

    def _second_product(self, other: Value, total: Value, scale_after: float, in_layout: bool) -> Scores | None:
        """`other`, added to the scores giving `total`, as a second score product (MLA's
        q_pe·k_peᵀ), or None if it is a bias."""
        if other.type != total.type:
            return None
        try:
            scores = self._peel(other, scale_after, in_layout)
        except NearMiss:
            return None
        return scores if not scores.keeps else None

    @staticmethod
    def _combined(first: Scores, second: Scores) -> Scores:
        if first.keeps or not math.isclose(first.scale, second.scale, rel_tol=1e-12):
            raise NearMiss("two score products with different scales or with a mask on one of them")
        return Scores(first.products + second.products, first.scale, [])

    def _bias(self, bias: Value, multiplier: float) -> Keep:
        """An additive bias: a mask (where(m, 0, fill) through views) or a general float tensor."""
        views: list[OpResult] = []
        inner = bias
        while isinstance(inner, OpResult) and inner.op.name in _VIEWS:
            views.append(inner)
            inner = inner.op.operands[0]
        chosen = _producer(inner, "ft.where")
        if chosen is not None:
            condition, if_true, if_false = chosen.operands
            dtype = chosen.result.type.dtype
            for zero, fill, kind in ((if_true, if_false, "keep"), (if_false, if_true, "hide")):
                number, filled = _splat_number(zero), _splat_number(fill)
                if number == 0.0 and filled is not None and is_mask_fill(filled, dtype, multiplier):
                    formula = self._formula(condition, kind)
                    if formula is not None:
                        formula = self._through_views(formula, views)
                    return Keep(bias, "additive", formula, multiplier, math.isfinite(filled))
        return Keep(bias, "additive", None, multiplier)

    def _formula(self, condition: Value, kind: str) -> Formula | None:
        """The visible set of a `kind` ("keep"/"hide") i1 mask, if the analysis reads it."""
        formula = self.masks.formula(condition)
        return formula if formula is None or kind == "keep" else negate(formula)

    def _through_views(self, formula: Formula, views: list[OpResult]) -> Formula | None:
        """`formula` moved through `views` (outermost first) to the axes of the outermost."""
        for view in reversed(views):
            axes = self.masks.view_axes(view.op.operands[0], view)
            formula = map_formula(formula, axes) if axes is not None else None
            if formula is None:
                return None
        return formula

    def _keeps_order(self, op: Operation) -> bool:
        """Whether the view `op` lists its operand's elements in the same (row-major) order."""
        source = op.operands[0]
        if op.name == "ft.reshape":
            return True
        in_shape, out_shape = self.sizes.shape(source), self.sizes.shape(op.result)
        if op.name == "ft.transpose":
            kept = [p for p in op.attributes["perm"] if not is_unit(in_shape[p])]
            return kept == sorted(kept)
        padded = [Size.of(1)] * (len(out_shape) - len(in_shape)) + in_shape
        return padded == out_shape

    # ---------------------------------------------------------------------- values
    def _value_product(self, probabilities: Value, sink_column: bool, keys: Size,
                       scores: Value) -> tuple[Operation, Value]:
        """The p·v matmul the probabilities feed (only it), and the probabilities as it reads them;
        `scores` is the softmax input."""
        value = probabilities
        sliced = not sink_column
        while True:
            users = value.uses
            if len(users) != 1:
                names = {u.name for u, _ in users}
                why = ("returned attention weights, or a training forward graph saving them for the backward "
                       "pass, where attention fuses before aot_autograd: always for SDPA, for this spelling "
                       "with static shapes" if "func.return" in names else "e.g. returned attention weights")
                listed = ", ".join(sorted(names)) or "nothing"
                raise NearMiss(f"the probabilities are used by {len(users)} ops ({listed}), not only by the p·v "
                               f"matmul ({why})")
            user, index = users[0]
            if user.name == "ft.cast" and user.result.type.dtype.is_float:
                value = user.result
            elif user.name == "ft.slice" and not sliced:
                self._check_sink_slice(user, keys)
                sliced, value = True, user.result
            elif user.name in _VIEWS and sliced and self._keeps_order(user):
                value = user.result
            elif user.name == "ft.matmul" and index == 0 and sliced:
                return user, value
            elif user.name == "ft.where" and _zeroes_unseen_rows(user, index, scores):
                value = user.result
            else:
                raise NearMiss(f"the probabilities go through {_describe_user(user, index)} before any p·v matmul")

    def _check_sink_slice(self, op: Operation, keys: Size) -> None:
        a = op.attributes
        rank = op.result.type.rank
        if a["dim"] % rank != rank - 1 or a["start"] != 0 or a["step"] != 1 or self.sizes.dim(op.result, -1) != keys:
            raise NearMiss("the softmax over [scores, sink column] is not sliced back to the scores' keys")

    # -------------------------------------------------------------------- operands
    def _row_blocks(self, product: Value, rows: Size, keys: Size, batch: list[Size], what: str) -> Size:
        """How many query blocks of `rows` rows a matmul operand or result's row dim holds
        (1 unless the matmul merges heads into its rows, as MLA's absorbed form does)."""
        shape = self.sizes.shape(product)
        if shape[-1] != keys:
            raise NearMiss(f"{what} has {shape[-1]} columns but the softmax has {keys} keys")
        extra = shape[-2].exact_div(rows) if not is_unit(rows) else shape[-2]
        if extra is None or product_of(shape[:-2]) * extra != product_of(batch):
            raise NearMiss(f"{what} [{', '.join(map(str, shape))}] does not hold the softmax's "
                           f"[{', '.join(map(str, [*batch, rows, keys]))}] scores in the same order")
        return extra

    def _operand(self, start: Value, rows: Size, cols: Size, extra: Size, product: Operation, batch: list[Size],
                 is_lhs: bool, peel_scale: bool = True) -> Operand:
        """Walk a matmul operand back to its source through views, broadcasts and (with
        `peel_scale`) constant scales, which join the attention's scale."""
        factors = [Factor(size, False, i > 0 or len(batch) == 1) for i, size in enumerate(batch)]
        product_batch = self.sizes.shape(product.result)[:-2] + ([] if is_unit(extra) else [extra])
        own = self.sizes.shape(start)[:-2]
        own = [Size.of(1)] * (len(product_batch) - len(own) - (0 if is_unit(extra) else 1)) + own
        own += [] if is_unit(extra) else [extra if is_lhs else Size.of(1)]
        factors = self._broadcast(factors, product_batch, own)
        if factors is None:
            raise NearMiss("cannot prove how a q·kᵀ or p·v matmul broadcasts its operands' batch dims")
        operand = Operand(start, factors, False, rows, cols, extra if is_lhs else Size.of(1))
        while (step := self._step_back(operand, peel_scale)):
            operand = step
        return operand

    def _step_back(self, operand: Operand, peel_scale: bool) -> Operand | None:
        value = operand.source
        if not isinstance(value, OpResult):
            return None
        op = value.op
        source = op.operands[0]
        rows, cols = (operand.cols, operand.rows) if operand.swapped else (operand.rows, operand.cols)
        if op.name == "ft.reshape":
            return replace(operand, source=source) if self._split(source, rows, cols, operand.extra) else None
        if op.name == "ft.transpose":
            return self._step_through_transpose(operand, op, rows, cols)
        if op.name == "ft.broadcast_to":
            split = self._split(value, rows, cols, operand.extra)
            if split is None:
                return None
            padded = [Size.of(1)] * (value.type.rank - source.type.rank) + self.sizes.shape(source)
            shape = self.sizes.shape(value)
            if any(padded[p] != shape[p] for p in range(split.first_matrix_dim, len(shape))):
                return None
            own = padded[:split.first_matrix_dim] + ([operand.extra] if split.merged_rows else [])
            factors = self._broadcast(operand.factors, split.batch, own)
            return None if factors is None else replace(operand, source=source, factors=factors)
        if op.name in ("ft.mul", "ft.div") and peel_scale:
            main, factor = self._scaled_operand(op)
            number = _splat_number(factor) if factor is not None else None
            if number is None or not (math.isfinite(number) and number > 0) or main.type != value.type:
                return None
            return replace(operand, source=main, scale=operand.scale * (number if op.name == "ft.mul" else 1 / number))
        return None

    def _step_through_transpose(self, operand: Operand, op: Operation, rows: Size, cols: Size) -> Operand | None:
        source = op.operands[0]
        perm = op.attributes["perm"]
        in_shape = self.sizes.shape(source)
        kept = [p for p in perm if not is_unit(in_shape[p])]
        if kept == sorted(kept):
            return replace(operand, source=source) if self._split(source, rows, cols, operand.extra) else None
        if operand.swapped or is_unit(rows) or is_unit(cols) or not is_unit(operand.extra):
            return None
        swapped = [*kept[:-2], kept[-1], kept[-2]]
        if swapped != sorted(swapped) or self._split(source, cols, rows, operand.extra) is None:
            return None
        return replace(operand, source=source, swapped=True)

    def _split(self, value: Value, rows: Size, cols: Size, extra: Size) -> _Split | None:
        return split_matrix(self.sizes.shape(value), rows, cols, extra)

    @staticmethod
    def _broadcast(factors: list[Factor], batch: list[Size], own: list[Size]) -> list[Factor] | None:
        """`factors` refined to `batch`'s dims, those a tensor with batch dims `own` (one per
        dim of `batch`, each 1 or equal) broadcasts over marked; None if unprovable."""
        aligned = align(factors, batch)
        if aligned is None:
            return None
        result = []
        for factor, dim in aligned:
            if dim is None or own[dim] == batch[dim]:
                result.append(factor)
            elif is_unit(own[dim]):
                result.append(replace(factor, broadcast=True))
            else:
                return None
        return result

    # ----------------------------------------------------------------------- masks
    def _visibility(self, keeps: list[Keep], scores: Value, rows: Size, keys: Size) -> tuple[Visibility, list[Keep]]:
        """The causal band the analysable masks prove, and the masks left for the mask operand."""
        band: list[Keep] = []
        general: list[Keep] = []
        for keep in keeps:
            if keep.formula is None or not self.masks.broadcasts_into(keep.tensor, keep.formula, scores):
                general.append(keep)
                continue
            found = classify(keep.formula, rows, keys)
            if found == ALL_VISIBLE:
                continue
            (band if isinstance(found, Visibility) else general).append(keep)
        combined: Formula | None = TRUE
        for keep in band:
            combined = conjoin(combined, keep.formula) if combined is not None else None
        found = classify(combined, rows, keys) if combined is not None else "too many mask regions"
        if isinstance(found, Visibility):
            return found, general
        return ALL_VISIBLE, general + band

    def _sinks(self, sink: Value, batch: list[Size], scores: Value) -> Value:
        """`sink` reduced to the view it is a broadcast of; checked to hold one logit per head."""
        while isinstance(sink, OpResult) and sink.op.name == "ft.broadcast_to":
            sink = sink.op.operands[0]
        shape = self.sizes.shape(sink)
        padded = [Size.of(1)] * (scores.type.rank - len(shape)) + shape
        full = [*batch, Size.of(1), Size.of(1)]
        heads = [i > 0 or len(batch) == 1 for i in range(len(batch))] + [False, False]
        for size, wanted, is_head in zip(padded, full, heads):
            if not (is_unit(size) or (is_head and size == wanted)):
                raise NearMiss("the sink logits vary with the batch or the query, not only with the head")
        return sink


def _check_fills_hold(keeps: list[Keep]) -> None:
    """A finite fill (-1e9) hides a key only if no additive bias added after it can add it back;
    a bias added before it (BLOOM's alibi, then masked_fill) is replaced by the fill.  `keeps`
    are in the order they apply to the scores."""
    filled = False
    for keep in keeps:
        if filled and keep.kind == "additive" and keep.formula is None:
            raise NearMiss("a bias is added after a mask with a finite fill (such as -1e9), and could undo it")
        filled = filled or keep.finite_fill


def _check_dtypes(score_product: Operation, value_product: Operation) -> None:
    """ft.attention computes q·kᵀ and p·v in one element type: one side's must hold the other's."""
    qk, v = score_product.operands[0].type.dtype, value_product.operands[1].type.dtype
    if not (holds_exactly(v, qk) or holds_exactly(qk, v)):
        raise NearMiss(f"q·kᵀ is computed in {qk} and p·v in {v}; neither type holds the other exactly")


def _through_casts(value: Value) -> Value:
    while isinstance(value, OpResult) and value.op.name == "ft.cast":
        value = value.op.operands[0]
    return value


def _zeroes_unseen_rows(where: Operation, index: int, scores: Value) -> bool:
    """Whether `where`, reading the probabilities as operand `index`, is torch's safe softmax:
    0 for the rows whose scores are all -inf (`where(not(any(scores != -inf)), 0, p)`, or as
    canonicalize leaves it, `where(any(...), p, 0)`).  ft.attention already gives a row that
    sees no key 0."""
    if index not in (1, 2) or _splat_number(where.operands[3 - index]) != 0.0:
        return False
    return _sees_a_key(where.operands[0], scores) == (index == 1)


def _sees_a_key(condition: Value, scores: Value) -> bool | None:
    """True if `condition` is "the row has a score above -inf", False if it is the negation,
    None if it is neither (read through logical_not, and any / all over the key dim)."""
    condition, negated = _unnegated(condition)
    reduction = _producer(condition, "ft.any", "ft.all")
    if reduction is None or not _reduces_keys(reduction, scores):
        return None
    element = _is_unmasked(reduction.operands[0], scores)
    if reduction.name == "ft.any":
        sees = True if element else None  # any(scores == -inf) says nothing about the row
    else:
        sees = False if element is False else None  # all(scores == -inf): the row sees nothing
    return None if sees is None else sees != negated


def _is_unmasked(condition: Value, scores: Value) -> bool | None:
    """True if `condition` is `scores != -inf` elementwise, False if `scores == -inf`, else None."""
    condition, negated = _unnegated(condition)
    compare = _producer(condition, "ft.eq", "ft.ne")
    if compare is None:
        return None
    lhs, rhs = compare.operands
    if (lhs is scores and _splat_number(rhs) == -math.inf) or (rhs is scores and _splat_number(lhs) == -math.inf):
        return (compare.name == "ft.ne") != negated
    return None


def _unnegated(condition: Value) -> tuple[Value, bool]:
    """`condition` with its chain of logical_nots taken off, and whether there was an odd number."""
    negated = False
    while (op := _producer(condition, "ft.logical_not")) is not None:
        condition, negated = op.operands[0], not negated
    return condition, negated


def _reduces_keys(reduction: Operation, scores: Value) -> bool:
    """Whether `reduction` reduces over the scores' last (key) dim only, keeping it."""
    rank = scores.type.rank
    return [d % rank for d in reduction.attributes["dims"]] == [rank - 1] and bool(reduction.attributes["keepdim"])


def _describe_user(user: Operation, index: int) -> str:
    if user.name == "ft.torch_call":
        return f"{user.attributes['target']} at {_source_position(user.location)} (dropout?)"
    if user.name == "ft.matmul":
        return f"the right operand of a matmul at {_source_position(user.location)}"
    return f"{user.name} at {_source_position(user.location)}"


@dataclass(frozen=True)
class _Split:
    """A tensor holding [batch..., rows, cols]: its dims before `first_matrix_dim` are batch
    dims; with `merged_rows` its row dim holds several row blocks, one more batch dim."""

    batch: list[Size]
    first_matrix_dim: int
    merged_rows: bool


def split_matrix(shape: list[Size], rows: Size, cols: Size, extra: Size) -> _Split | None:
    """How `shape` holds [batch..., rows, cols] matrices in row-major order (unit dims
    anywhere allowed); with `extra` != 1 the row dim may hold extra·rows rows."""
    end = len(shape)
    for size in (cols, rows):
        while end and is_unit(shape[end - 1]):
            end -= 1
        if is_unit(size):
            continue
        if end and shape[end - 1] == size:
            end -= 1
        elif size is rows and end and not is_unit(extra) and shape[end - 1] == extra * rows:
            return _Split([*shape[:end - 1], extra], end - 1, True)
        else:
            return None
    return _Split(shape[:end], end, False)


def align(factors: list[Factor], dims: list[Size]) -> list[tuple[Factor, int | None]] | None:
    """Refine the non-broadcast `factors` so each lies in one of `dims` (their product), and
    pair each factor with its dim (None for broadcast factors); None if the sizes do not nest."""
    result: list[tuple[Factor, int | None]] = []
    position = _next_dim(dims, 0)
    need = dims[position] if position < len(dims) else Size.of(1)
    for factor in factors:
        if factor.broadcast:
            result.append((factor, None))
            continue
        remaining = factor.size
        while not is_unit(remaining):
            if position >= len(dims):
                return None
            if remaining == need:
                piece, remaining, need = remaining, Size.of(1), Size.of(1)
            elif (quotient := need.exact_div(remaining)) is not None:
                piece, remaining, need = remaining, Size.of(1), quotient
            elif (quotient := remaining.exact_div(need)) is not None:
                piece, remaining, need = need, quotient, Size.of(1)
            else:
                return None
            result.append((replace(factor, size=piece), position))
            if is_unit(need):
                position = _next_dim(dims, position + 1)
                need = dims[position] if position < len(dims) else Size.of(1)
    return result if position >= len(dims) else None


def _next_dim(dims: list[Size], start: int) -> int:
    while start < len(dims) and is_unit(dims[start]):
        start += 1
    return start


def _stripped_group(operands: list[Operand]) -> Size:
    """The head group every KV operand can read without its repeat (1 if they disagree)."""
    groups = {_suffix_group(o.factors) for o in operands}
    return groups.pop() if len(groups) == 1 else Size.of(1)


def _suffix_group(factors: list[Factor]) -> Size:
    """The product of the trailing head factors an operand broadcasts over (its GQA group)."""
    group = Size.of(1)
    for factor in reversed(factors):
        if not (factor.head and factor.broadcast):
            break
        group = group * factor.size
    return group


# ------------------------------------------------------------------------------ emission


class _Emitter:
    """Builds the ft.attention for a Match before its p·v matmul and replaces that matmul."""

    def __init__(self, match: Match, location: Location):
        self.match = match
        anchor = match.value_product
        self.builder = Builder(anchor.parent, anchor, location)
        self.sizes_cache: dict[Size, Value] = {}
        self.sizes = Sizes()

    def emit(self) -> None:
        m = self.match
        group = _stripped_group([*m.keys, m.values])
        q = self._join([self._operand(o, Size.of(1), transposed=False) for o in m.queries])
        # k was read as the matmul's [D, Skv] operand; ft.attention takes [Skv, D].
        k = self._join([self._operand(o, group, transposed=True) for o in m.keys])
        v = self._operand(m.values, group, transposed=False)
        q, k, v, dtype = self._common_dtype(q, k, v)
        operands = [q, k, v]
        if m.masks:
            operands.append(self._mask())
        if m.sinks is not None:
            operands.append(self._sinks())
        attention = self.builder.value(
            "ft.attention", *operands, scale=float(m.scale), causal=m.visibility.causal, window=m.visibility.window,
            has_mask=bool(m.masks), has_sinks=m.sinks is not None)
        result = m.value_product.result
        if result.type.dtype != dtype:
            attention = self.builder.value("ft.cast", attention, result_type=TensorType(attention.type.shape,
                                                                                           result.type.dtype))
        replace_op(m.value_product, [self._reshape(attention, self.sizes.shape(result))])

    # -------------------------------------------------------------------- operands
    def _operand(self, operand: Operand, group: Size, transposed: bool) -> Value:
        """The operand as [B, H / group, rows, cols] (`transposed`: [.., cols, rows]), reading
        its source without the trailing `group` repeat over heads."""
        strip = len(operand.factors)
        while not is_unit(group) and strip and operand.factors[strip - 1].head and operand.factors[strip - 1].broadcast:
            strip -= 1
        kept = operand.factors[:strip]
        rows, cols = (operand.cols, operand.rows) if operand.swapped else (operand.rows, operand.cols)
        read = self._reshape(operand.source, [Size.of(1) if f.broadcast else f.size for f in kept] + [rows, cols])
        if any(f.broadcast for f in kept):
            read = self._broadcast(read, [f.size for f in kept] + [rows, cols])
        batch = product_of([f.size for f in kept if not f.head])
        heads = product_of([f.size for f in kept if f.head])
        read = self._reshape(read, [batch, heads, rows, cols])
        if operand.swapped != transposed:
            read = self.builder.value("ft.transpose", read, perm=(0, 1, 3, 2))
        return read

    def _join(self, parts: list[Value]) -> Value:
        return parts[0] if len(parts) == 1 else self.builder.value("ft.concat", *parts, dim=3)

    def _common_dtype(self, q: Value, k: Value, v: Value) -> tuple[Value, Value, Value, ScalarType]:
        """q, k, v cast to one element type that holds both q's and v's exactly."""
        qk_type, v_type = q.type.dtype, v.type.dtype
        if qk_type == v_type:
            return q, k, v, qk_type
        if holds_exactly(v_type, qk_type):
            return self._cast(q, v_type), self._cast(k, v_type), v, v_type
        return q, k, self._cast(v, qk_type), qk_type

    def _cast(self, value: Value, dtype: ScalarType) -> Value:
        return self.builder.value("ft.cast", value, result_type=TensorType(value.type.shape, dtype))

    # ------------------------------------------------------------------------ masks
    def _mask(self) -> Value:
        """The general masks as one rank-4 operand: i1 when all are boolean, else float."""
        m = self.match
        booleans = [self._boolean(keep) for keep in m.masks if keep.kind != "additive"]
        biases = [self._scaled(keep) for keep in m.masks if keep.kind == "additive"]
        if len({b.type.dtype for b in biases}) > 1:
            widest = ScalarType("f64" if any(b.type.dtype.name == "f64" for b in biases) else "f32")
            biases = [self._cast(b, widest) for b in biases]
        boolean = _fold(self.builder, "ft.logical_and", booleans)
        mask = _fold(self.builder, "ft.add", biases)
        if mask is None:
            mask = boolean
        elif boolean is not None:
            hidden = constant(self.builder, TensorType((), mask.type.dtype), -math.inf)
            mask = self.builder.value("ft.where", boolean, mask, hidden)
        return self._as_rank4(mask)

    def _boolean(self, keep: Keep) -> Value:
        if keep.kind == "keep":
            return keep.tensor
        negated = _producer(keep.tensor, "ft.logical_not", "ft.bitwise_not")
        if negated is not None:
            return negated.operands[0]
        return self.builder.value("ft.logical_not", keep.tensor)

    def _scaled(self, keep: Keep) -> Value:
        if keep.multiplier == 1.0:
            return keep.tensor
        factor = constant(self.builder, TensorType((), keep.tensor.type.dtype), keep.multiplier)
        return self.builder.value("ft.mul", keep.tensor, factor)

    def _as_rank4(self, mask: Value) -> Value:
        """A mask broadcastable to the scores [batch..., Sq, Skv] as [B, H, Sq, Skv] (dims 1 where it broadcasts)."""
        m = self.match
        shape = self.sizes.shape(mask)
        rank = len(m.batch) + 2
        padded = [Size.of(1)] * (rank - len(shape)) + shape
        mask = self._reshape(mask, padded)
        groups = [[0], list(range(1, len(m.batch)))] if len(m.batch) >= 2 else [[], list(range(len(m.batch)))]
        expanded = list(padded)
        for group in groups:
            if not all(is_unit(padded[d]) for d in group) and any(padded[d] != m.batch[d] for d in group):
                for d in group:
                    expanded[d] = m.batch[d]
        if expanded != padded:
            mask = self._broadcast(mask, expanded)
        dims = [product_of([expanded[d] for d in group]) for group in groups]
        return self._reshape(mask, dims + expanded[-2:])

    def _sinks(self) -> Value:
        m = self.match
        heads = product_of(m.batch[1:] if len(m.batch) >= 2 else m.batch)
        sink = m.sinks
        shape = self.sizes.shape(sink)
        rank = len(m.batch) + 2
        padded = [Size.of(1)] * (rank - len(shape)) + shape
        sink = self._reshape(sink, padded)
        head_dims = range(1, len(m.batch)) if len(m.batch) >= 2 else range(len(m.batch))
        expanded = [m.batch[d] if d in head_dims else Size.of(1) for d in range(rank)]
        if expanded != padded:
            sink = self._broadcast(sink, expanded)
        return self._reshape(sink, [heads])

    # ------------------------------------------------------------------------ views
    def _reshape(self, value: Value, sizes: list[Size]) -> Value:
        if self.sizes.shape(value) == sizes:
            return value
        return self._sized("ft.reshape", value, sizes)

    def _broadcast(self, value: Value, sizes: list[Size]) -> Value:
        return self._sized("ft.broadcast_to", value, sizes)

    def _sized(self, name: str, value: Value, sizes: list[Size]) -> Value:
        shape = tuple(s.constant for s in sizes)
        dynamic = [materialize(s, self.builder, self.sizes_cache) for s in sizes if s.constant is None]
        return self.builder.value(name, value, *dynamic, result_type=TensorType(shape, value.type.dtype))


def _fold(builder: Builder, name: str, values: list[Value]) -> Value | None:
    result = None
    for value in values:
        result = value if result is None else builder.value(name, result, value)
    return result
