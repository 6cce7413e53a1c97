"""Length buckets: group chains of similar length into batches under a residue budget.

A batch's cost is its padded size, ``batch size x longest chain``. Chains wait in the bucket
of their length (bucket edges grow by ``BUCKET_GROWTH``); a bucket is released as a batch as
soon as one more chain would pass ``max_tokens`` or ``batch_size``. At most one partial batch
waits per bucket, so the memory held does not grow with the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Generic, TypeVar

from ..errors import InputError

__all__ = ["BUCKET_GROWTH", "LengthBucketer"]

T = TypeVar("T")
BUCKET_GROWTH = 1.25  #: upper edge / lower edge of a bucket: <= 25% padding inside a batch
MIN_BUCKET = 32  #: chains up to this length share the first bucket


class LengthBucketer(Generic[T]):
    """``add(item, length)`` yields the batches (lists of items) that became full;
    ``flush()`` yields the rest, shortest bucket first."""

    def __init__(self, max_tokens: int, batch_size: int):
        if max_tokens < 1 or batch_size < 1:
            raise InputError(f"max_tokens and batch_size must be >= 1, got {max_tokens} and {batch_size}")
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self._buckets: dict[int, tuple[list[T], int]] = {}  # bucket -> (items, longest length)

    @staticmethod
    def bucket(length: int) -> int:
        return 0 if length <= MIN_BUCKET else 1 + int(math.log(length / MIN_BUCKET, BUCKET_GROWTH))

    def add(self, item: T, length: int) -> Iterator[list[T]]:
        key = self.bucket(length)
        items, longest = self._buckets.get(key, ([], 0))
        if items and ((len(items) + 1) * max(longest, length) > self.max_tokens or len(items) == self.batch_size):
            yield items
            items, longest = [], 0
        items.append(item)
        self._buckets[key] = (items, max(longest, length))

    def flush(self) -> Iterator[list[T]]:
        for key in sorted(self._buckets):
            items, _ = self._buckets.pop(key)
            if items:
                yield items

    @property
    def pending(self) -> int:
        """Items waiting in partial batches."""
        return sum(len(items) for items, _ in self._buckets.values())
