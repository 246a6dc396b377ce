"""How often each requester may ask: a token bucket per requester, bounded in memory.

MQTT does not tell a subscriber who published a message, so a requester is named by what its
request carries: the reply topic without its last level (see `ReplyAddress.requester`). A requester
may send `burst` requests at once and `per_minute` on average; a request over the limit is refused.

At most `max_requesters` buckets are kept; the least recently seen is forgotten first, so a flood of
made-up reply topics cannot grow memory (a forgotten requester starts again with a full bucket; the
service's bounded question queue still caps the work).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

MAX_REQUESTERS = 1024
"""Buckets kept at most (about 100 bytes each)."""


@dataclass
class _Bucket:
    tokens: float
    """Requests the requester may still send now (refilled over time up to the burst)."""
    updated: float
    """When `tokens` was last refilled, in clock seconds."""


class RequestRateLimit:
    """`allow(requester)` says whether one more request from `requester` may be served now."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        max_requesters: int = MAX_REQUESTERS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._refill_per_s = per_minute / 60.0
        self._burst = burst
        self._max_requesters = max_requesters
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, requester: str) -> bool:
        """Take one request from `requester`'s bucket; False when the bucket is empty."""
        bucket = self._bucket(requester)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def exhausted(self, requester: str) -> bool:
        """Whether `requester`'s bucket is empty now (taking nothing from it)."""
        return self._bucket(requester).tokens < 1

    def _bucket(self, requester: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.pop(requester, None)
        if bucket is None:
            bucket = _Bucket(tokens=self._burst, updated=now)
        else:
            elapsed = now - bucket.updated
            bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._refill_per_s)
            bucket.updated = now
        self._buckets[requester] = bucket
        while len(self._buckets) > self._max_requesters:
            self._buckets.popitem(last=False)
        return bucket

    @property
    def requesters(self) -> int:
        """Buckets currently kept."""
        return len(self._buckets)
