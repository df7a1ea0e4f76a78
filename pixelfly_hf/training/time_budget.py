"""--max_train_minutes: a clock of training time that runs only while training does, against a limit."""
import math
import time


class TimeBudget:
    """Seconds spent training, counted between start() and stop() (so evaluation and checkpoints do not count),
    against a limit of `minutes` (none: no limit). A resumed run starts from the seconds its checkpoint had spent.

    Under several processes each keeps its own clock: decide to stop on a reduction of `exhausted` over them (the
    training loop does it in its logging reduction), so that every process stops at the same step."""

    def __init__(self, minutes=None, spent=0.0):
        self.limit = minutes * 60 if minutes else math.inf
        self.spent = spent
        self._started = None

    def start(self):
        self._started = time.perf_counter()

    def stop(self):
        """Stop the clock; returns the seconds since start(), which are added to `spent`."""
        elapsed = time.perf_counter() - self._started
        self._started = None
        self.spent += elapsed
        return elapsed

    @property
    def exhausted(self):
        return self.spent >= self.limit
