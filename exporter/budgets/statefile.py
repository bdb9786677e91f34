"""The budgets state file's writer: encoding and the write run on a thread, never on the
event loop (a shared disk can stall a write for 100 ms), and only when the content changed.

`request` marks the state changed; the writer takes a capture (`snapshot.capture`: references
only, on the loop) when its write starts, so the requests of one loop pass (a flush dropping
several segments) share one capture and one write, and a write never lands after a newer one.
`close` writes the final state, refresh times included, and waits for it: what a restart
reads back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from exporter.budgets.snapshot import Encoder, State, write

__all__ = ["StateWriter"]

log = logging.getLogger(__name__)


class StateWriter:
    def __init__(self, path: Path, capture: Callable[[], State]) -> None:
        self.path = path
        self._capture = capture
        self._encoder = Encoder()
        self._dirty = False
        self._final = False
        self._task: asyncio.Task[None] | None = None
        self._content: bytes | None = None  # of the file last written
        self._whole: bytes | None = None
        self._failing = False
        self._closed = False
        #: its own thread: the loop's default executor may be gone at shutdown (or busy)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="budgets-state")
        #: files written (the tests count them)
        self.writes = 0

    def request(self, *, final: bool = False) -> None:
        """Write the state soon (if its content differs from the file's; `final`: if
        anything, refresh times included, does). Requests made before the write starts
        share one capture."""
        if self._closed:
            return
        self._dirty = True
        self._final = self._final or final
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="budgets-state")

    async def close(self) -> None:
        """Write the final state and wait for it (and any write in flight)."""
        self.request(final=True)
        self._closed = True
        try:
            while self._task is not None and not self._task.done():
                await asyncio.shield(self._task)
        finally:
            self._thread.shutdown(wait=False)

    async def written(self) -> None:
        """Wait until every request made so far is on disk (or has failed, logged)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # the other requests of this loop pass (a flush's drops)
        while self._dirty:
            final, self._dirty, self._final = self._final, False, False
            state = self._capture()  # on the loop: references only
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._thread, self._write, state, final)
            except OSError as exc:
                if not self._failing:
                    log.error(
                        "budgets: cannot write %s (%s); a restart with the database down "
                        "may read spend low until the first refresh",
                        self.path,
                        exc,
                    )
                self._failing = True
            except Exception:  # a bug must not stop later writes, nor the shutdown
                log.exception("budgets: writing %s failed", self.path)
                self._failing = True
            else:
                self._failing = False

    def _write(self, state: State, final: bool) -> None:
        """On the writer's thread (one at a time)."""
        content, whole = self._encoder.encode(state)
        if content == self._content and (not final or whole == self._whole):
            return
        write(self.path, whole)
        self._content, self._whole = content, whole
        self.writes += 1
