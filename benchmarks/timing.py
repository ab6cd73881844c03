"""Interleaved timing: every round runs each contender once, in a fresh random order, so that load
from other processes hits all of them alike and no contender always runs right after the same
other one (what a contender leaves behind, freed memory or evicted caches, shifts the next one's
time); results are medians and paired ratios."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timings:
    """Seconds per call for each contender, one entry per round."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, name: str, reference: str) -> float:
        """Median over rounds of (name / reference) in the same round: robust to slow drifts."""
        pairs = [a / b for a, b in zip(self.samples[name], self.samples[reference]) if b > 0]
        return statistics.median(pairs) if pairs else float("nan")


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 2,
                seed: int = 0) -> Timings:
    """Time each callable ``rounds`` times, interleaved in a random order per round (seeded), after
    ``warmup`` untimed rounds."""
    names = list(contenders)
    order = random.Random(seed)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    timings = Timings({name: [] for name in names})
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            contenders[name]()
            timings.samples[name].append(time.perf_counter() - start)
    return timings
