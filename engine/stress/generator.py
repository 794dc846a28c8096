"""`MessageGenerator`: the agents' traffic as a stream, with counts instead of records.

Agents ``Agent-1`` .. ``Agent-N`` each send ``messages_per_agent`` messages,
interleaved round by round as concurrent senders would be.  Agent ``a``'s
message ``i`` has type ``types[(i + a) % len(types)]``, so the mix is even and
every count is known in closed form before the run (the progress bar's total)
and checkable after it.  Direct and onboarding messages go to a random other
agent (seeded); a broadcast goes to every agent, the sender included, as
``Engine.broadcast`` does, and counts as N generated messages.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

MESSAGE_TYPES: tuple[str, ...] = ("direct", "broadcast", "hard_onboard", "soft_onboard")
BROADCAST = "broadcast"


class GeneratedMessage(NamedTuple):
    """One message an agent sends; ``recipient`` is "" for a broadcast (every agent)."""

    kind: str
    sender: str
    recipient: str
    fan_out: int  # engine messages it becomes: 1, or the number of agents for a broadcast


def agent_name(index: int) -> str:
    """``Agent-1`` for index 0: agents are numbered from 1, as users name them."""
    return f"Agent-{index + 1}"


def parse_types(types: Sequence[str]) -> tuple[str, ...]:
    """Check message type names (duplicates dropped, order kept) or raise ValueError."""
    out: list[str] = []
    for t in types:
        name = t.strip().lower().replace("-", "_")
        if name not in MESSAGE_TYPES:
            raise ValueError(f"unknown message type {t!r}: expected {', '.join(MESSAGE_TYPES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"at least one message type is needed: {', '.join(MESSAGE_TYPES)}")
    return tuple(out)


class MessageGenerator:
    """An iterator over the agents' messages; holds counters only, never the messages.

    ``messages_per_agent=None`` makes it endless (soak runs stop it by time).
    ``generated``, ``by_type``, ``sent`` and ``received`` count what has been
    yielded so far, fan-out included; ``planned_*`` say what a full run yields.
    """

    def __init__(
        self,
        agents: int,
        messages_per_agent: int | None,
        message_types: Sequence[str] = MESSAGE_TYPES,
        *,
        seed: int = 0,
    ) -> None:
        if agents < 1:
            raise ValueError(f"agents must be >= 1, got {agents}")
        if messages_per_agent is not None and messages_per_agent < 0:
            raise ValueError(f"messages_per_agent must be >= 0, got {messages_per_agent}")
        self.agents = agents
        self.messages_per_agent = messages_per_agent
        self.types = parse_types(message_types)
        self.names = [agent_name(a) for a in range(agents)]
        self.generated = 0
        self.by_type = dict.fromkeys(self.types, 0)
        self.sent = [0] * agents  # per sender, fan-out included
        self.received = [0] * agents  # per recipient
        self._rng = random.Random(seed)
        self._rounds = (
            itertools.count() if messages_per_agent is None else iter(range(messages_per_agent))
        )
        self._round = 0
        self._agent = agents  # forces the first __next__ to start round 0

    def __iter__(self) -> Iterator[GeneratedMessage]:
        return self

    def __next__(self) -> GeneratedMessage:
        if self._agent >= self.agents:
            self._round = next(self._rounds)  # StopIteration ends the stream
            self._agent = 0
        a = self._agent
        self._agent += 1
        kind = self.types[(self._round + a) % len(self.types)]
        sender = self.names[a]
        n = self.agents
        if kind == BROADCAST:
            self.sent[a] += n
            for r in range(n):
                self.received[r] += 1
            msg = GeneratedMessage(kind, sender, "", n)
        else:
            r = a
            if n > 1:
                r = self._rng.randrange(n - 1)
                r += r >= a  # any agent but the sender
            self.sent[a] += 1
            self.received[r] += 1
            msg = GeneratedMessage(kind, sender, self.names[r], 1)
        self.by_type[kind] += msg.fan_out
        self.generated += msg.fan_out
        return msg

    # -- what a full run yields, before it runs ------------------------------------
    def planned_by_type(self) -> dict[str, int] | None:
        """Messages per type a full run generates (fan-out included); None if endless."""
        m = self.messages_per_agent
        if m is None:
            return None
        t = len(self.types)
        out = dict.fromkeys(self.types, 0)
        for index, kind in enumerate(self.types):
            sends = 0
            for a in range(self.agents):
                first = (index - a) % t  # the first round in which agent a sends this type
                sends += 0 if first >= m else (m - 1 - first) // t + 1
            out[kind] = sends * (self.agents if kind == BROADCAST else 1)
        return out

    def planned_total(self) -> int | None:
        """Messages a full run generates (fan-out included); None if endless."""
        planned = self.planned_by_type()
        return None if planned is None else sum(planned.values())
