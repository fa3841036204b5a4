"""InterruptEscalation (kernel/sandbox/interrupts.py) on a real event loop, with a clock the test moves."""

from __future__ import annotations

import asyncio

from capsule_kernel.kernel.sandbox.interrupts import SECOND_AFTER_SECONDS, InterruptEscalation


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def escalation(grace: float, clock: Clock) -> tuple[InterruptEscalation, list[tuple[asyncio.Future, str]]]:
    stops: list[tuple[asyncio.Future, str]] = []
    return InterruptEscalation(lambda: grace, lambda cell, why: stops.append((cell, why)), clock), stops


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_a_second_press_stops_but_a_bounce_and_the_kernels_own_repeat_do_not():
    async def scenario() -> None:
        clock = Clock()
        escalate, stops = escalation(60.0, clock)
        loop, cell = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()
        escalate.interrupted(cell, loop, by_user=True)
        clock.now += SECOND_AFTER_SECONDS / 5  # a double click
        escalate.interrupted(cell, loop, by_user=True)
        clock.now += 1.0
        escalate.interrupted(cell, loop, by_user=False)  # pool.py saying it again
        await settle()
        assert stops == []
        escalate.interrupted(cell, loop, by_user=True)
        await settle()
        assert [(stopped is cell, "second interrupt" in why) for stopped, why in stops] == [(True, True)]

    asyncio.run(scenario())


def test_the_grace_stops_a_cell_still_running_and_spares_one_that_ended():
    async def scenario() -> None:
        escalate, stops = escalation(0.05, Clock())
        loop = asyncio.get_running_loop()
        running, ended = loop.create_future(), loop.create_future()
        escalate.interrupted(running, loop, by_user=True)
        escalate.interrupted(ended, loop, by_user=True)
        await settle()
        ended.set_result({})  # it heeded the interrupt
        for _ in range(200):
            if stops:
                break
            await asyncio.sleep(0.01)
        assert [(stopped is running, "within 0.05 s" in why) for stopped, why in stops] == [(True, True)]
        assert "what that cell did is lost" in stops[0][1]

    asyncio.run(scenario())


def test_a_new_cell_starts_afresh():
    async def scenario() -> None:
        clock = Clock()
        escalate, stops = escalation(60.0, clock)
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        escalate.interrupted(first, loop, by_user=True)
        first.set_result({})
        clock.now += 5.0
        escalate.interrupted(second, loop, by_user=True)  # the next cell's first press
        await settle()
        assert stops == []

    asyncio.run(scenario())
