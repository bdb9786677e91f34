"""CPU scheduling of our background work (Linux; a no-op where unsupported): it must show in
the event loop's latency as little as possible, without being starved.

One source for the policy the WAL's file thread (`walsync`) and the SQLite flush process
(`store.flush_child`) both run under.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["BACKGROUND_NICE", "background_process", "idle_thread", "no_wakeup_preemption"]

#: niceness added to background work (the SQLite flush process)
BACKGROUND_NICE = 5


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


def idle_thread() -> None:
    """SCHED_IDLE for the calling thread (Linux schedules threads one by one): it runs only
    on CPU time no other thread wants, and the kernel preempts it the moment any normal
    thread (the event loop, woken by a request) becomes runnable on its CPU. For work that
    may wait: nice and SCHED_BATCH still let it hold a shared CPU for a 3 ms slice."""
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, policy, os.sched_param(0))
