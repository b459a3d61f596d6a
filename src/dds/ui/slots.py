"""The edit queue: a fixed number of slots on the shared model, first come first served.

The page's edit handler joins the queue as soon as Edit is clicked, so a waiting edit can say
how many edits are ahead of it and be cancelled before it runs any step (Gradio's own queue
would hold it out of reach until its turn).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(eq=False)
class Ticket:
    """One edit's place in the queue."""

    key: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False


class EditQueue:
    """`slots` edits run at once; the others wait in the order they joined."""

    def __init__(self, slots: int = 1):
        self.slots = int(slots)
        self._cond = threading.Condition()
        self._waiting: list[Ticket] = []
        self._running = 0

    def join(self, key: str) -> Ticket:
        ticket = Ticket(key)
        with self._cond:
            self._waiting.append(ticket)
        return ticket

    def ahead(self, ticket: Ticket) -> int:
        """Edits running or waiting before `ticket` (0 once it runs)."""
        with self._cond:
            if ticket.started or ticket not in self._waiting:
                return 0
            return self._running + self._waiting.index(ticket)

    def _can_start(self, ticket: Ticket) -> bool:
        return self._waiting.index(ticket) < self.slots - self._running

    def wait(self, ticket: Ticket, timeout: float) -> bool:
        """Take a slot for `ticket` if its turn comes within `timeout` s (True), else False.
        A cancelled ticket never starts: it leaves the queue."""
        with self._cond:
            if ticket.started:
                return True
            self._cond.wait_for(lambda: ticket.cancelled.is_set() or self._can_start(ticket),
                                timeout)
            if ticket.cancelled.is_set():
                self._leave(ticket)
                return False
            if not self._can_start(ticket):
                return False
            self._waiting.remove(ticket)
            self._running += 1
            ticket.started = True
            self._cond.notify_all()
            return True

    def cancel(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out of the queue; False if it already runs."""
        with self._cond:
            if ticket.started:
                return False
            ticket.cancelled.set()
            self._leave(ticket)
            return True

    def done(self, ticket: Ticket) -> None:
        """The ticket's edit ended (or was abandoned): free its slot or its place."""
        with self._cond:
            if ticket.started:
                ticket.started = False
                self._running -= 1
            self._leave(ticket)

    def _leave(self, ticket: Ticket) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)
        self._cond.notify_all()
