"""Dead-letter positions: what the HTTP page cursors stand on.

A position must only grow and never be reused, through evictions, replays
(`pop`) and letters put back, so a cursor naming a letter that is gone still
says where the walk goes on.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.core.deadletters import DeadLetterStore
from ipc.codec import Message
from ipc.records import DeadLetter


def letter(mid: int) -> DeadLetter:
    return DeadLetter(Message(id=mid, recipient=f"r{mid}"), "rejected", 1)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 40)),
            st.tuples(st.just("pop"), st.integers(0, 40)),
        ),
        max_size=200,
    ),
    st.integers(1, 8),
)
def test_positions_only_grow_and_follow_the_store_order(
    ops: list[tuple[str, int]], limit: int
) -> None:
    store = DeadLetterStore(limit)
    seen: dict[int, int] = {}  # position -> message id, over the store's whole life
    for op, mid in ops:
        if op == "add":
            store.add(letter(mid))
        elif (dl := store.pop(mid)) is not None and mid % 2:
            store.put_back(mid, dl)  # a replay that could not queue it
        positioned = store.positioned()
        assert {run for (run, _), _ in positioned} <= {store.run}
        positions = [p for (_, p), _ in positioned]
        assert positions == sorted(set(positions))  # strictly growing, oldest first
        assert [dl for _, dl in positioned] == store.items()
        assert len(positioned) <= limit
        for (_, p), dl in positioned:
            assert seen.setdefault(p, dl.message.id) == dl.message.id  # never reused


def test_an_evicted_letters_position_is_not_given_again() -> None:
    store = DeadLetterStore(2)
    for mid in (1, 2, 3):
        store.add(letter(mid))
    assert [(p, dl.message.id) for (_, p), dl in store.positioned()] == [(2, 2), (3, 3)]
    dl = store.pop(2)
    assert dl is not None
    store.put_back(2, dl)
    assert [(p, dl.message.id) for (_, p), dl in store.positioned()] == [(3, 3), (4, 2)]
