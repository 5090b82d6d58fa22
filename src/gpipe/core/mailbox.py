"""Mailboxes between the device loops of one process: ``send`` drops a value under its key
(kind, stage, micro-batch), ``recv`` waits for it.

Both runtimes use it: the one-process pipe between its worker threads, the distributed
transport for the values its own devices pass each other. The invariant: every ``recv`` is
bounded by ``timeout`` (then it raises ``TimeoutError`` naming the value and the stage) and
returns early with :class:`gpipe.core.executor.Aborted` once the step is aborted.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from gpipe.core.executor import Aborted

__all__ = ["QueueTransport"]


class QueueTransport:
    """In-process transport: ``send`` drops a value in a mailbox, ``recv`` waits for it."""

    def __init__(self, timeout: float = 300.0) -> None:
        self.timeout = timeout
        self._cv = threading.Condition()
        self._box: dict[tuple[str, int, int], Any] = {}
        self._aborted = False

    def send(self, kind: str, stage: int, microbatch: int, value: Any) -> None:
        with self._cv:
            self._box[(kind, stage, microbatch)] = value
            self._cv.notify_all()

    def recv(self, kind: str, stage: int, microbatch: int) -> Any:
        key = (kind, stage, microbatch)
        deadline = time.monotonic() + self.timeout
        with self._cv:
            while key not in self._box:
                if self._aborted:
                    raise Aborted()
                left = deadline - time.monotonic()
                if left <= 0:
                    what = "activation" if kind == "act" else "gradient"
                    raise TimeoutError(
                        f"waited {self.timeout:.0f}s for the {what} of micro-batch {microbatch} "
                        f"for stage {stage}"
                    )
                self._cv.wait(left)
            return self._box.pop(key)

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        """Wake every waiting ``recv`` with :class:`Aborted`."""
        with self._cv:
            self._aborted = True
            self._cv.notify_all()

    def reset(self) -> None:
        """Forget undelivered values and the abort flag (start of a step)."""
        with self._cv:
            self._box.clear()
            self._aborted = False
