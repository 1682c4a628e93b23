"""What kernels remember per call signature, bounded.

Kernel wrappers (the cpu backend's compiled kernels, the Triton attention kernels) work out a
call's launch once per signature — shapes, strides, dtypes — and replay it.  Under dynamic
shapes some loops see a new signature on every call: a decode loop's KV cache grows by one
key per step.  `SignatureCache` keeps the most recently used `capacity` entries, so such a
loop costs one launch record per step while it runs, not one per step ever taken.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from contextlib import suppress
from typing import Generic, TypeVar

Entry = TypeVar("Entry")
SIGNATURE_CACHE_ENTRIES = 256  # a model's distinct static shapes fit; a growing KV cache cycles through


class SignatureCache(Generic[Entry]):
    """A mapping from call signatures to launch records that forgets the least recently used."""

    def __init__(self, capacity: int = SIGNATURE_CACHE_ENTRIES):
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()

    def get(self, signature: Hashable) -> Entry | None:
        entry = self._entries.get(signature)
        if entry is not None:
            with suppress(KeyError):  # another thread may have evicted it meanwhile
                self._entries.move_to_end(signature)
        return entry

    def __setitem__(self, signature: Hashable, entry: Entry) -> None:
        self._entries[signature] = entry
        self._entries.move_to_end(signature)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, signature: Hashable) -> bool:
        return signature in self._entries
