"""CPU scheduling of our background work (Linux; a no-op where unsupported): it must show in
the event loop's latency as little as possible, without being starved.

One source for the policy the WAL's file thread (`walsync`) and the SQLite flush process
(`store.flush_child`) both run under.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["background_process", "no_wakeup_preemption"]


def no_wakeup_preemption() -> None:
    """SCHED_BATCH for the calling thread: the same share of CPU, but waking it does not
    preempt the waker. Without it the loop thread, holding the GIL, was descheduled at every
    `notify` for the woken WAL file thread, which then only waited for that GIL (py-spy --gil:
    `Condition.notify` 12 % of the loop's samples; 2 % with it)."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, policy, os.sched_param(0))


def background_process(nice: int) -> None:
    """A whole process of background work: SCHED_BATCH and `nice` more niceness, so on a
    contended CPU it yields to the serving process; it still takes any idle core."""
    no_wakeup_preemption()
    with contextlib.suppress(OSError):
        os.nice(nice)
