"""fuse-elementwise: group elementwise ops with the reductions they feed or follow into
`ft.fusion` regions, one kernel each.

Op classes
----------
- compute ops: elementwise ops with tensor results (ft.cast aside), the reductions
  ft.sum/mean/amax/amin/prod/any/all/argmax/argmin, and ft.softmax/ft.log_softmax
  (reductions over their dim that keep the shape);
- cheap ops: ft.cast, the views ft.reshape/ft.transpose/ft.broadcast_to/ft.slice (step 1),
  and ft.constant literals that are scalars, 0-d or splats;
- joins: ft.concat, only with the option `concat` (a backend whose code generator writes
  a concatenation's pieces into their slices of its result turns it on);
- barriers: everything else.  ft.matmul, ft.conv, ft.torch_call, top-k/sort/gather/scatter/
  index ops, concat (without the option)/pad/flip, existing ft.fusion ops and ops on scalar
  sizes stay outside.
  A matmul's epilogue (bias, activation, residual) becomes a separate group after it;
  fusing epilogues into GEMM templates is future work for the codegen backends.

Grouping algorithm
------------------
1. Walk each function body in order.  Every compute op, and every cheap op or join reading
   a value of a grouped op, starts a group of its own, then merges with the group of each
   operand's producer, in operand order (a join also with the group producing the operand
   of a view grouped alone: stack's unsqueeze of a piece, which the piece's group refused
   as it changes the shape), when the merged group is valid (below) and merging creates
   no cycle: no path leads from one of the two groups to the other through an op outside
   both (paths through a third group count from every one of its members, since a group
   runs as one unit).  Groups without a compute op are dissolved again.
2. Cheap ops outside every group are cloned into each group that reads them (a view of an
   input is index math, a cast or a splat costs nothing to repeat); the original stays
   only while an op outside the groups still reads it.
3. Each group becomes one `ft.fusion` with `kind = "reduction"` if it holds a reduction,
   else "elementwise".  Its operands are the values its ops read from outside, in order of
   first use; its results are its members' results read outside the group, in member
   order.  Compute ops are never copied: a result needed outside is yielded.  A group
   whose results nothing reads is dead code and left as it is, for dce.
4. The block is sorted topologically, keeping the original order wherever dependences
   allow; ops with side effects (no PURE trait) keep their relative order.  Groups are
   numbered by the position of their first member: the i-th `ft.fusion` of a function is
   group i, and the same input always gives the same output.

A group is valid when
- it has an iteration shape S and a reduced dim set R: with reductions, S is the operand
  shape of every reduction and R the one set of dims every reduction reduces; without,
  every member's result has shape S and R is empty;
- every member's result has shape S, or (R non-empty) S with the R dims kept as 1 or
  dropped (its reduced shape);
- every member reading another member's value reads it at the same iteration point: each
  non-size-1 dim of the operand maps (by broadcasting, transposition, or a reshape that only
  adds or removes size-1 dims) to the result dim of the same axis of S.  A kernel walking the
  kept dims of S and, for each point, the reduced dims (a row-persistent reduction kernel)
  computes the whole group.  Slices and general reshapes apply to inputs only;
- it has at most `max-ops` members (0: no limit): its compute ops and the casts, views and
  joins that read a computed value, not the constants and the casts and views of other
  inputs cloned into it.

A group holding an ft.concat (a concat group) is valid when instead
- it holds one concat and no reduction;
- piece i, the members the concat's operand i is computed from (directly or through other
  members), is a valid group of that operand's shape P_i; its last member may be a reshape
  that only adds or removes size-1 dims (torch.stack's unsqueeze), then the others have the
  shape before that reshape;
- the rest, the concat and every member not in a piece (those reading the concat's result,
  and what they read besides), is a valid group of the concat's result shape S, reading
  piece members only through the concat.
The kernel walks each piece's shape in a loop nest of its own, writing the piece into its
slice of the concat's result, then S for the rest.  So no element is read out of bounds,
and no piece is computed at a point of another.

Shapes compare structurally: a dynamic dim matches a dynamic dim in the same place, and is
taken to be larger than 1 (torch.compile specialises sizes 0 and 1).

Invariants of the result (tests/test_fuse_elementwise.py checks them on random programs)
- semantics: every function computes exactly what it computed before (the reference
  backend runs `ft.fusion` regions op by op, so results are bit-identical);
- each region is isolated (it reads only its block arguments), holds only compute ops,
  casts, the four views, literal constants and (with `concat`) one concat, and reduces over
  one dim set of one shape;
- every yielded value has the group's shape S or its reduced shape, or a piece's shape;
- each compute op of the input appears exactly once in the output;
- the function stays acyclic and verifies; running the pass again changes nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from flagtree.errors import OptionsError
from flagtree.ir.attributes import DenseAttr
from flagtree.ir.core import Block, Module, Operation, OpResult, Region, Value
from flagtree.ir.opdef import ELEMENTWISE, PURE, TERMINATOR, has_trait
from flagtree.ir.ops.shape import unit_dim_map
from flagtree.ir.types import TensorType
from flagtree.passes.base import Pass, register_pass

REDUCTIONS = frozenset({
    "ft.sum", "ft.mean", "ft.amax", "ft.amin", "ft.prod", "ft.any", "ft.all", "ft.argmax", "ft.argmin",
})
SHAPE_KEEPING_REDUCTIONS = frozenset({"ft.softmax", "ft.log_softmax"})
VIEWS = frozenset({"ft.reshape", "ft.transpose", "ft.broadcast_to", "ft.slice"})

Shape = tuple[int | None, ...]
# Per dim of a value: the axis of the group's iteration shape it runs along, or None for a
# size-1 (broadcast or reduced) dim.
Labels = tuple[int | None, ...]


@register_pass
@dataclass(frozen=True)
class FuseElementwise(Pass):
    """Group elementwise ops, views and one reduction dim set per group into ft.fusion kernels."""

    name: ClassVar[str] = "fuse-elementwise"
    max_ops: int = 0
    concat: bool = False  # let ft.concat join the group computing its operands (see the module docstring)

    def __post_init__(self) -> None:
        if self.max_ops < 0:
            raise OptionsError(f"pass 'fuse-elementwise': max-ops must be 0 (no limit) or positive, "
                               f"not {self.max_ops}")

    def run(self, module: Module) -> bool:
        changed = False
        for func in module.functions:
            changed |= _fuse_block(func.regions[0].block, self.max_ops, self.concat)
        return changed


def is_reduction(op: Operation) -> bool:
    """Whether `op` is a reduction a fusion group may hold."""
    return op.name in REDUCTIONS or op.name in SHAPE_KEEPING_REDUCTIONS


def is_compute(op: Operation) -> bool:
    """Whether `op` is arithmetic a fusion group is built around."""
    if is_reduction(op):
        return True
    return has_trait(op, ELEMENTWISE) and op.name != "ft.cast" and _has_tensor_results(op)


def is_cheap(op: Operation) -> bool:
    """Whether `op` may be repeated in every group that reads it: casts, views, literals."""
    if op.name == "ft.cast":
        return _has_tensor_results(op)
    if op.name == "ft.slice":
        return op.attributes["step"] == 1
    if op.name in VIEWS:
        return True
    return op.name == "ft.constant" and _is_uniform_literal(op.attributes["value"])


def _has_tensor_results(op: Operation) -> bool:
    return bool(op.results) and all(isinstance(r.type, TensorType) for r in op.results)


def _is_uniform_literal(value: object) -> bool:
    """A scalar literal, or a dense literal whose elements all have the same bits."""
    if isinstance(value, (bool, int, float)):
        return True
    if not isinstance(value, DenseAttr):
        return False
    data = value.value.reshape(-1)
    if data.numel() <= 1:
        return True
    rows = data.contiguous().view(torch.uint8).reshape(data.numel(), -1)
    return bool((rows == rows[0]).all())


def reduced_dims(op: Operation) -> frozenset[int]:
    """The dims a reduction reduces, in [0, rank)."""
    rank = op.operands[0].type.rank
    if op.name in REDUCTIONS and "dims" in op.attributes:
        dims = op.attributes["dims"] or tuple(range(rank))
    else:
        dims = (op.attributes["dim"],)
    return frozenset(d % rank for d in dims) if rank else frozenset()


@dataclass(frozen=True)
class Domain:
    """A group's iteration shape and the dims its reductions reduce."""

    shape: Shape
    reduced: frozenset[int]
    has_reduction: bool

    def labels(self) -> dict[Shape, Labels]:
        """The shapes a member may have (full, reduced with kept 1s, reduced with dims dropped),
        each with the axis of the iteration shape every dim runs along."""
        full = tuple(axis if size != 1 else None for axis, size in enumerate(self.shape))
        labels: dict[Shape, Labels] = {}
        if self.reduced:
            kept = [axis for axis in range(len(self.shape)) if axis not in self.reduced]
            labels[tuple(self.shape[axis] for axis in kept)] = tuple(full[axis] for axis in kept)
            keepdim = tuple(1 if axis in self.reduced else size for axis, size in enumerate(self.shape))
            labels[keepdim] = tuple(None if axis in self.reduced else full[axis] for axis in range(len(full)))
        labels[self.shape] = full
        return labels


def group_domain(members: list[Operation], max_ops: int = 0) -> Domain | None:
    """The domain of a group of ops (in block order), or None when they do not form a valid
    group (see the module docstring)."""
    if max_ops and len(members) > max_ops:
        return None
    concats = [op for op in members if op.name == "ft.concat"]
    if concats:
        return _concat_domain(members, concats)
    return _fused_domain(members)


def _concat_domain(members: list[Operation], concats: list[Operation]) -> Domain | None:
    """The domain of a concat group: its rest's, when its pieces and its rest are valid."""
    if len(concats) > 1 or any(is_reduction(op) for op in members):
        return None
    concat = concats[0]
    piece_ids: set[int] = set()
    for operand in concat.operands:
        piece = _feeding(operand, members)
        if piece and not _is_valid_piece(piece, operand):
            return None
        piece_ids.update(id(op) for op in piece)
    rest = [op for op in members if id(op) not in piece_ids]
    reads_piece = any(_produced_by(v, piece_ids) for op in rest if op is not concat for v in op.operands)
    return None if reads_piece else _fused_domain(rest)


def _feeding(value: Value, members: list[Operation]) -> list[Operation]:
    """The members (in block order) `value` is computed from, its producer included."""
    member_ids = {id(op) for op in members}
    found: set[int] = set()
    pending = [value]
    while pending:
        current = pending.pop()
        if _produced_by(current, member_ids) and id(current.op) not in found:
            found.add(id(current.op))
            pending.extend(current.op.operands)
    return [op for op in members if id(op) in found]


def _produced_by(value: Value, op_ids: set[int]) -> bool:
    return isinstance(value, OpResult) and id(value.op) in op_ids


def _is_valid_piece(piece: list[Operation], operand: Value) -> bool:
    """Whether the members computing a concat operand form a group of its shape, possibly
    ending in a reshape that only adds or removes size-1 dims (see the module docstring)."""
    last = piece[-1]
    shape = operand.type.shape
    if last.name == "ft.reshape" and unit_dim_map(last.operands[0].type.shape, shape) is not None:
        piece, shape = piece[:-1], last.operands[0].type.shape
    if not piece:
        return True
    domain = _fused_domain(piece)
    return domain is not None and domain.shape == shape


def _fused_domain(members: list[Operation]) -> Domain | None:
    """The domain of a group without a concat, or None when it is not valid."""
    reductions = [op for op in members if is_reduction(op)]
    if reductions:
        shape = reductions[0].operands[0].type.shape
        reduced = reduced_dims(reductions[0])
        if any(r.operands[0].type.shape != shape or reduced_dims(r) != reduced for r in reductions[1:]):
            return None
    else:
        shape, reduced = members[0].results[0].type.shape, frozenset()
    domain = Domain(shape, reduced, bool(reductions))
    labels = domain.labels()
    if any(op.results[0].type.shape not in labels for op in members):
        return None
    member_ids = {id(op) for op in members}
    for op in members:
        for index, operand in enumerate(op.operands):
            reads_member = isinstance(operand, OpResult) and id(operand.op) in member_ids
            if reads_member and not _reads_same_point(op, index, labels):
                return None
    return domain


def _reads_same_point(op: Operation, index: int, labels: dict[Shape, Labels]) -> bool:
    """Whether every element of `op`'s result reads operand `index` along the same axes."""
    if is_reduction(op):
        return True  # group_domain checked that the operand has the iteration shape
    dim_map = _operand_dim_map(op, index)
    if dim_map is None:
        return False
    source = labels[op.operands[index].type.shape]
    target = labels[op.results[0].type.shape]
    return all(label is None or (dim is not None and target[dim] == label) for label, dim in zip(source, dim_map))


def _operand_dim_map(op: Operation, index: int) -> Sequence[int | None] | None:
    """For each dim of operand `index`, the result dim it becomes (None: a size-1 dim that
    broadcasts or disappears); None when the op moves elements across dims (slices, reshapes
    that split or merge dims)."""
    operand = op.operands[index].type.shape
    result = op.results[0].type.shape
    if op.name == "ft.transpose":
        dim_map: list[int | None] = [None] * len(operand)
        for result_dim, operand_dim in enumerate(op.attributes["perm"]):
            dim_map[operand_dim] = result_dim
        return dim_map
    if op.name == "ft.reshape":
        return unit_dim_map(operand, result)
    if op.name == "ft.slice":
        return None
    offset = len(result) - len(operand)
    return [dim + offset if size != 1 else None for dim, size in enumerate(operand)]


# ---------------------------------------------------------------- grouping


class _Group:
    def __init__(self, members: list[Operation]):
        self.members = members  # in block order


class _Grouper:
    """Step 1 of the algorithm: partition a block's fusible ops into groups."""

    def __init__(self, block: Block, max_ops: int, concat: bool):
        self.block = block
        self.max_ops = max_ops
        self.concat = concat
        self.position = {id(op): i for i, op in enumerate(block.ops)}
        self.successors = _successors(block)
        self.group_of: dict[int, _Group] = {}
        self.domains: dict[int, Domain] = {}

    def groups(self) -> list[tuple[_Group, Domain]]:
        """The groups holding a compute op, with their domains, by first member."""
        for op in self.block.ops:
            producers = self._producer_groups(op)
            if self.concat and op.name == "ft.concat":
                producers = self._concat_producer_groups(op, producers)
                if producers:
                    self._place(op, producers)
            elif is_compute(op) or (is_cheap(op) and producers):
                self._place(op, producers)
        unique = {id(group): group for group in self.group_of.values()}
        kept = [group for group in unique.values() if any(is_compute(op) for op in group.members)]
        kept.sort(key=lambda group: self.position[id(group.members[0])])
        return [(group, self.domains[id(group)]) for group in kept]

    def _producer_groups(self, op: Operation) -> list[_Group]:
        found: dict[int, _Group] = {}
        for operand in op.operands:
            if isinstance(operand, OpResult) and id(operand.op) in self.group_of:
                group = self.group_of[id(operand.op)]
                found.setdefault(id(group), group)
        return list(found.values())

    def _concat_producer_groups(self, concat: Operation, producers: list[_Group]) -> list[_Group]:
        """The groups a concat merges with: its operands' producers', and for an operand that
        is a view grouped alone (stack's unsqueeze of a piece: the piece's group refused it,
        as it changes the shape), the groups producing that view's operand, right after it."""
        found: dict[int, _Group] = {}
        for group in producers:
            found.setdefault(id(group), group)
            if len(group.members) == 1 and is_cheap(group.members[0]):
                for producer in self._producer_groups(group.members[0]):
                    found.setdefault(id(producer), producer)
        return list(found.values())

    def _place(self, op: Operation, producers: list[_Group]) -> None:
        single = _Group([op])
        self._record(single, group_domain([op]))
        limit = self.position[id(op)]
        for producer in producers:
            current = self.group_of[id(op)]
            if producer is not current:
                self._try_merge(producer, current, limit)

    def _record(self, group: _Group, domain: Domain) -> None:
        for member in group.members:
            self.group_of[id(member)] = group
        self.domains[id(group)] = domain

    def _try_merge(self, first: _Group, second: _Group, limit: int) -> None:
        members = sorted(first.members + second.members, key=lambda op: self.position[id(op)])
        domain = group_domain(members, self.max_ops)
        if domain is None:
            return
        if self._reaches_outside(first, second, limit) or self._reaches_outside(second, first, limit):
            return
        del self.domains[id(first)], self.domains[id(second)]
        self._record(_Group(members), domain)

    def _reaches_outside(self, source: _Group, target: _Group, limit: int) -> bool:
        """Whether a path leads from `source` to `target` through an op in neither.

        Only ops up to `limit` (the op being placed) are grouped yet; later ops lead only to
        later ops, so they never reach back into a group and the search skips them."""
        inside = {id(op) for op in source.members} | {id(op) for op in target.members}
        targets = {id(op) for op in target.members}
        pending = [s for op in source.members for s in self.successors[id(op)] if id(s) not in inside]
        seen: set[int] = set()
        while pending:
            op = pending.pop()
            if id(op) in seen or self.position[id(op)] > limit:
                continue
            group = self.group_of.get(id(op))
            for node in group.members if group else [op]:
                seen.add(id(node))
                for successor in self.successors[id(node)]:
                    if id(successor) in targets:
                        return True
                    if id(successor) not in inside:
                        pending.append(successor)
        return False


def _successors(block: Block) -> dict[int, list[Operation]]:
    """For each op of `block`: the ops of `block` that must run after it."""
    successors: dict[int, list[Operation]] = {id(op): [] for op in block.ops}
    for op, predecessors in _predecessors(block).items():
        for predecessor in predecessors:
            successors[id(predecessor)].append(op)
    return successors


def _predecessors(block: Block) -> dict[Operation, list[Operation]]:
    """For each op of `block`: the ops of `block` that must run before it (the producers of
    the values it, or an op nested in it, reads; and the previous op with side effects
    before one with side effects)."""
    predecessors: dict[Operation, list[Operation]] = {}
    last_impure: Operation | None = None
    for op in block.ops:
        found: dict[int, Operation] = {}
        for nested in op.walk():
            for operand in nested.operands:
                producer = _top_level(operand.op, block) if isinstance(operand, OpResult) else None
                if producer is not None and producer is not op:
                    found.setdefault(id(producer), producer)
        if not has_trait(op, PURE):
            if last_impure is not None:
                found.setdefault(id(last_impure), last_impure)
            last_impure = op
        predecessors[op] = list(found.values())
    return predecessors


def _top_level(op: Operation, block: Block) -> Operation | None:
    """The op of `block` that is or contains `op`; None if `op` is outside `block`."""
    while op.parent is not block:
        if op.parent is None or op.parent.parent is None or op.parent.parent.parent is None:
            return None
        op = op.parent.parent.parent
    return op


# ---------------------------------------------------------------- rewriting


def _fuse_block(block: Block, max_ops: int, concat: bool) -> bool:
    grouper = _Grouper(block, max_ops, concat)
    groups = [(group, domain) for group, domain in grouper.groups() if _is_read(group.members, block)]
    if not groups:
        return False
    grouped = {id(op) for group, _ in groups for op in group.members}
    cloned: dict[int, Operation] = {}
    for group, domain in groups:
        inputs = _cheap_inputs(group.members, grouped, block)
        cloned.update((id(op), op) for op in inputs)
        _outline(block, group.members, inputs, domain, grouper.position)
    _erase_unused(cloned.values(), block)
    _sort_topologically(block)
    return True


def _cheap_inputs(members: list[Operation], grouped: set[int], block: Block) -> list[Operation]:
    """The ungrouped cheap ops the members read, directly or through other such ops."""
    found: dict[int, Operation] = {}
    pending = [v for op in members for v in op.operands]
    while pending:
        value = pending.pop()
        if not isinstance(value, OpResult):
            continue
        producer = value.op
        fresh = id(producer) not in found and id(producer) not in grouped
        if fresh and producer.parent is block and is_cheap(producer):
            found[id(producer)] = producer
            pending.extend(producer.operands)
    return list(found.values())


def _outline(block: Block, members: list[Operation], inputs: list[Operation], domain: Domain,
             position: dict[int, int]) -> Operation:
    """Replace `members` by one ft.fusion holding them and copies of `inputs`."""
    member_ids = {id(op) for op in members}
    body_ops = sorted([*members, *inputs], key=lambda op: position[id(op)])
    produced = {id(r) for op in body_ops for r in op.results}
    outside_values = _first_uses(v for op in body_ops for v in op.operands if id(v) not in produced)
    yielded = [r for op in members for r in op.results if _read_outside(r, member_ids, block)]

    body = Block([v.type for v in outside_values])
    mapping: dict[int, Value] = {id(v): arg for v, arg in zip(outside_values, body.args)}
    for op in body_ops:
        copy = Operation(op.name, [mapping[id(v)] for v in op.operands], op.result_types, dict(op.attributes),
                         location=op.location)
        body.append(copy)
        mapping.update((id(old), new) for old, new in zip(op.results, copy.results))
    body.append(Operation("ft.yield", [mapping[id(r)] for r in yielded], location=members[-1].location))

    kind = "reduction" if domain.has_reduction else "elementwise"
    fusion = Operation("ft.fusion", outside_values, [r.type for r in yielded], {"kind": kind},
                       [Region([body])], members[0].location)
    block.insert_before(members[0], fusion)
    for old, new in zip(yielded, fusion.results):
        old.replace_all_uses_with(new)
    for op in reversed(members):
        op.erase()
    return fusion


def _is_read(members: list[Operation], block: Block) -> bool:
    """Whether anything outside `members` reads one of their results (else they are dead code)."""
    member_ids = {id(op) for op in members}
    return any(_read_outside(r, member_ids, block) for op in members for r in op.results)


def _first_uses(values: Iterable[Value]) -> list[Value]:
    unique: dict[int, Value] = {}
    for value in values:
        unique.setdefault(id(value), value)
    return list(unique.values())


def _read_outside(value: Value, member_ids: set[int], block: Block) -> bool:
    return any(id(_top_level(user, block)) not in member_ids for user, _ in value.uses)


def _erase_unused(ops: Iterable[Operation], block: Block) -> None:
    """Erase the originals of cloned cheap ops nothing reads any more, users before producers."""
    candidates = {id(op) for op in ops}
    for op in reversed(list(block.ops)):
        if id(op) in candidates and not any(r.uses for r in op.results):
            op.erase()


def _sort_topologically(block: Block) -> None:
    """Order `block` so every value is defined before use, staying as close to the current
    order as dependences allow; the terminator stays last."""
    ops = list(block.ops)
    terminator = ops.pop() if ops and has_trait(ops[-1], TERMINATOR) else None
    index = {id(op): i for i, op in enumerate(ops)}
    waiting = {id(op): 0 for op in ops}
    dependents: dict[int, list[Operation]] = {id(op): [] for op in ops}
    predecessors = _predecessors(block)
    for op in ops:
        for predecessor in predecessors[op]:
            if id(predecessor) in waiting:
                waiting[id(op)] += 1
                dependents[id(predecessor)].append(op)
    ready = [(index[id(op)], op) for op in ops if waiting[id(op)] == 0]
    heapq.heapify(ready)
    order: list[Operation] = []
    while ready:
        _, op = heapq.heappop(ready)
        order.append(op)
        for dependent in dependents[id(op)]:
            waiting[id(dependent)] -= 1
            if waiting[id(dependent)] == 0:
                heapq.heappush(ready, (index[id(dependent)], dependent))
    if len(order) != len(ops):
        stuck = next(op for op in ops if waiting[id(op)])
        raise RuntimeError(f"fuse-elementwise: the grouped block has a cycle through '{stuck.name}' at "
                           f"{stuck.location}; this is a bug in the grouping, please report it with the input IR")
    block.ops[:] = [*order, *([terminator] if terminator else [])]
