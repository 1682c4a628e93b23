"""`unit_dim_map` (flagtree/ir/ops/shape.py), shared by fuse-elementwise and the cpu emitter:
a reshape that only inserts or drops size-1 dims reads each element at the mapped index; any
other reshape gets None."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flagtree.ir.ops.shape import unit_dim_map

sizes = st.lists(st.integers(2, 4), min_size=0, max_size=4)


@st.composite
def with_unit_dims(draw, dims: list[int]) -> list[int]:
    """`dims` with size-1 dims inserted at random places."""
    shape = list(dims)
    for _ in range(draw(st.integers(0, 3))):
        shape.insert(draw(st.integers(0, len(shape))), 1)
    return shape


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dims=sizes)
def test_the_map_says_where_each_element_lands(data, dims):
    source = data.draw(with_unit_dims(dims))
    target = data.draw(with_unit_dims(dims))
    dim_map = unit_dim_map(tuple(source), tuple(target))
    assert dim_map is not None
    x = torch.arange(math.prod(source)).reshape(source)
    y = x.reshape(target)
    for flat in range(x.numel()):
        index = [int(i) for i in torch.unravel_index(torch.tensor(flat), source)] if source else []
        target_index = [0] * len(target)
        for source_dim, target_dim in enumerate(dim_map):
            if target_dim is None:
                assert source[source_dim] == 1
            else:
                target_index[target_dim] = index[source_dim]
        assert y[tuple(target_index)] == x[tuple(index)]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), dims=st.lists(st.integers(2, 4), min_size=2, max_size=4))
def test_a_reshape_that_merges_dims_has_no_map(data, dims):
    merged = [dims[0] * dims[1], *dims[2:]]
    assert unit_dim_map(tuple(data.draw(with_unit_dims(dims))), tuple(data.draw(with_unit_dims(merged)))) is None


def test_dynamic_dims_need_the_element_count_to_pin_them():
    assert unit_dim_map((None, 16), (None, 1, 16)) == (0, 2)
    assert unit_dim_map((None, None, 16), (None, None, 16, 1)) is None  # two `?`s: not provably the same
