"""Which task each trainer batch trains: a deterministic function of the batch index (docs/tasks.md)."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.config import ConfigError

SCHEDULES = ("alternate", "mix")


class TaskSchedule:
    """Which task each trainer batch comes from: a deterministic function of the batch index.

    alternate: batch b trains task b mod n (file order).
    mix:       smooth weighted round-robin (each step every task gains its weight, the richest is chosen
               and pays the total): over any run of batches, task i's count stays within one of
               b * w_i / sum(w).
    """

    def __init__(self, weights: Sequence[float], schedule: str = "alternate", start_batch: int = 0) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"task_schedule: {schedule!r} is not one of {SCHEDULES}")
        if not weights or any(not w > 0 for w in weights):
            raise ConfigError(f"task weights must be > 0, got {list(weights)}")
        self.weights = [float(w) for w in weights]
        self.schedule = schedule
        self.batch = 0
        self._credit = [0.0] * len(self.weights)
        for _ in range(start_batch):  # replay: the schedule is a function of the batch index alone
            self.next()

    def next(self) -> int:
        """The task index of the next batch."""
        b = self.batch
        self.batch += 1
        if self.schedule == "alternate":
            return b % len(self.weights)
        total = sum(self.weights)
        for i, w in enumerate(self.weights):
            self._credit[i] += w
        best = max(range(len(self.weights)), key=lambda i: (self._credit[i], -i))
        self._credit[best] -= total
        return best
