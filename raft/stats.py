"""Figures a running node keeps about itself, for metrics: plain counters
and fixed-bucket histograms, cheap enough for the paths they sit on (a
bisect and two additions per observation) and with no dependency, so the
Raft library stays free of any metrics system. ``surfshard.observe.metrics``
exports them to Prometheus at scrape time."""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence

__all__ = ["LATENCY_BUCKETS", "SIZE_BUCKETS", "Histogram", "StageTracer"]

#: Seconds: 100 us to 10 s.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
#: Bytes: 1 KB to 10 GB.
SIZE_BUCKETS = tuple(float(10**k) for k in range(3, 11))


class Histogram:
    """Counts of observations at or below each bound (the last bucket is
    +Inf), their sum and their number: Prometheus's histogram, kept here."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        #: counts[i]: observations in (bounds[i-1], bounds[i]]; the last one is above every bound.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(upper bound, observations at or below it)]``, +Inf last."""
        out, running = [], 0
        for bound, n in zip([*map(repr, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class StageTracer:
    """When each sampled log entry passed each stage on this node
    (``time.monotonic()``: comparable between processes of one host), for
    the latency breakdown of ``benchmarks/breakdown.py``. Only every
    ``every``-th index is kept, and only the last ``keep`` of them, so a
    node can trace under full load."""

    __slots__ = ("every", "keep", "records")

    def __init__(self, every: int = 10, keep: int = 2000) -> None:
        self.every = max(1, every)
        self.keep = keep
        self.records: dict[int, dict[str, float]] = {}

    def mark(self, index: int, stage: str, when: float | None = None) -> None:
        if index % self.every:
            return
        record = self.records.get(index)
        if record is None:
            record = self.records[index] = {}
            if len(self.records) > self.keep:
                del self.records[next(iter(self.records))]
        if stage not in record:
            record[stage] = time.monotonic() if when is None else when

    def mark_range(self, first: int, last: int, stage: str) -> None:
        """``mark`` every sampled index in [first, last]."""
        start = first + (-first % self.every)
        now = time.monotonic()
        for index in range(start, last + 1, self.every):
            self.mark(index, stage, now)
