"""The one timer that looks at every SSE stream (heartbeats, stuck writes): each stream once per period,
one slot per tick, and no timer left running once the last stream has gone. The ticks are driven by
hand, so nothing here depends on how fast the machine is."""

from __future__ import annotations

from runbell.service.http.sse import Sweep


class Looked:
    """Stands in for an EventStream: the two members the sweep uses; counts its visits."""

    def __init__(self) -> None:
        self.slot: set = set()
        self.visits = 0

    def look(self, now: float) -> None:
        self.visits += 1


def added(sweep: Sweep, n: int) -> list[Looked]:
    streams = [Looked() for _ in range(n)]
    for stream in streams:
        sweep.add(stream)  # type: ignore[arg-type]  # a stand-in with the same members
    return streams


async def test_every_stream_is_looked_at_once_per_period_one_slot_per_tick() -> None:
    sweep = Sweep(every=3600)  # its own timer never fires during the test
    streams = added(sweep, 3 * Sweep.SLOTS + 1)
    assert sorted(len(slot) for slot in sweep.slots) == [3] * (Sweep.SLOTS - 1) + [4]  # dealt round-robin
    for _ in range(2 * Sweep.SLOTS):
        before = [s.visits for s in streams]
        sweep._tick()
        looked = [s for s, b in zip(streams, before) if s.visits == b + 1]
        assert looked and all(s.slot is looked[0].slot for s in looked)  # one slot per tick
        assert len(looked) == len(looked[0].slot)
    assert [s.visits for s in streams] == [2] * len(streams)  # two periods: each stream twice


async def test_the_timer_stops_with_the_last_stream_and_starts_again_with_the_next() -> None:
    sweep = Sweep(every=3600)
    (first,) = added(sweep, 1)
    assert sweep._timer is not None
    sweep.discard(first)  # type: ignore[arg-type]
    sweep.discard(first)  # type: ignore[arg-type]  # twice is harmless
    assert sweep.count == 0
    for _ in range(Sweep.SLOTS):
        sweep._tick()  # the pending tick fires: it schedules no other
    assert sweep._timer is None and first.visits == 0  # a stream gone is not looked at
    (second,) = added(sweep, 1)
    assert sweep._timer is not None
    for _ in range(Sweep.SLOTS):
        sweep._tick()
    assert second.visits == 1


class Broken(Looked):
    def look(self, now: float) -> None:
        super().look(now)
        raise RuntimeError("a bug in one stream's look")


async def test_one_stream_whose_look_fails_stops_neither_the_others_nor_the_timer() -> None:
    sweep = Sweep(every=3600)
    broken = Broken()
    sweep.add(broken)  # type: ignore[arg-type]
    others = added(sweep, Sweep.SLOTS - 1)
    same_slot = added(sweep, 1)[0]  # dealt into the broken one's slot
    assert same_slot.slot is broken.slot
    for _ in range(Sweep.SLOTS):
        sweep._tick()  # never raises to the loop (it would stop the timer for every stream)
    assert sweep._timer is not None, "the timer goes on"
    assert broken.visits == 1 and same_slot.visits == 1 and [s.visits for s in others] == [1] * len(others)
