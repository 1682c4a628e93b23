"""SignatureCache (flagtree/runtime/signatures.py): launch records per call signature, the least
recently used forgotten beyond `capacity` — so a decode loop whose KV cache grows every step
does not keep one record per step ever taken."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flagtree.runtime.signatures import SignatureCache


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 5), operations=st.lists(st.tuples(st.booleans(), st.integers(0, 8)), max_size=40))
def test_it_behaves_like_a_dict_that_forgets_the_least_recently_used(capacity, operations):
    cache: SignatureCache[int] = SignatureCache(capacity)
    model: dict[int, int] = {}  # insertion order = recency, oldest first
    for store, key in operations:
        if store:
            model.pop(key, None)
            model[key] = key * 10
            cache[key] = key * 10
            while len(model) > capacity:
                del model[next(iter(model))]
        else:
            expected = model.get(key)
            if expected is not None:
                model[key] = model.pop(key)
            assert cache.get(key) == expected
        assert len(cache) == len(model) <= capacity
        assert all(k in cache for k in model)


def test_a_growing_kv_cache_keeps_at_most_capacity_attention_launches():
    from flagtree.backends.interpret import InterpretBackend
    from flagtree.backends.triton.attention import FlashAttention

    backend = InterpretBackend()
    attention = FlashAttention(backend.name, backend.jit, backend.capabilities())
    attention._launches = SignatureCache(3)
    q = torch.randn(1, 2, 1, 16)
    for keys in range(1, 8):  # one decode step per length
        k, v = torch.randn(1, 2, keys, 16), torch.randn(1, 2, keys, 16)
        out = attention(q, k, v, scale=0.25, causal="lower_right", window=0)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25))
    assert len(attention._launches) == 3
