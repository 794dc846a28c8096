"""The ready queues: per-recipient FIFOs per priority lane, and choosing the next message.

Order is kept per (lane, recipient); at most ``recipient_concurrency`` messages
of one recipient are in flight; retries whose backoff ended go first; a higher
lane wins, except that the starvation guard gives the lowest waiting lane a
turn after ``starvation_limit`` picks in a row.  Apart from fetching and
delivering because it is the one place those rules are decided.
"""

from __future__ import annotations

from engine.worker.delivery import Pending, RecipientLane
from engine.worker.state import WorkerState
from ipc.shard import LANES

_LANE_RANGE = range(LANES)


class Lanes(WorkerState):
    """Queueing fetched messages and handing them out in order."""

    def _queue(self, p: Pending, lane: int) -> None:
        st = self.lanes[lane].get(p.msg.recipient)
        if st is None:
            st = self.lanes[lane][p.msg.recipient] = RecipientLane((lane, p.msg.recipient))
        p.state = st
        st.queue.append(p)
        if st.wants_slot(self.limit):
            st.avail += 1
            self.ready[lane].append(st)
        self.wake.set()
        self._wake_runner()

    def _wake_runner(self, every: bool = False) -> None:
        """Hand new work to one idle runner (``every``: wake them all, e.g. to exit)."""
        idle = self.idle_runners
        while idle:
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)
                if not every:
                    return

    def next_pending(self) -> Pending | None:
        """Retries first, then the highest ready lane, with the starvation guard."""
        if self.due:
            return self.due.popleft()
        ready = self.ready
        # The highest and the lowest non-empty lane, without building a list.
        chosen = lowest = -1
        for lane in _LANE_RANGE:
            if ready[lane]:
                if chosen < 0:
                    chosen = lane
                lowest = lane
        if chosen < 0:
            return None
        if lowest == chosen:
            self.higher_streak = 0
        elif self.higher_streak >= self.config.starvation_limit:
            chosen = lowest  # the lowest waiting lane gets its turn
            self.higher_streak = 0
        else:
            self.higher_streak += 1
        st = ready[chosen].popleft()
        st.avail -= 1
        p = st.queue.popleft()
        st.busy += 1
        return p
