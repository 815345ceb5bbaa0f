"""eager.py and the stages' eager calls: no task where nothing waits; a task, and the same answers, where it does.

Sans-IO (no socket): the end-to-end tests (test_auth.py) run the eager
authentication stage against a real DNS server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop

from fastsmtp.eager import eager
from fastsmtp.events import Reply
from fastsmtp.stages import STAGE_FAILED, StepCall, StepRun, Verdict


def run(coro: Any) -> Any:
    return uvloop.run(coro)


def test_a_coroutine_that_never_waits_is_done_at_once_without_a_task() -> None:
    async def quick() -> int:
        return 5

    async def main() -> None:
        before = len(asyncio.all_tasks())
        fut = eager(quick())
        assert fut.done() and fut.result() == 5
        assert len(asyncio.all_tasks()) == before

    run(main())


def test_a_coroutine_that_waits_goes_on_as_a_task_from_where_it_stopped() -> None:
    steps: list[str] = []

    async def slow() -> int:
        steps.append("inline")
        await asyncio.sleep(0)  # a bare yield
        steps.append("after a bare yield")
        await asyncio.sleep(0.01)  # a future
        steps.append("after a future")
        return 7

    async def main() -> None:
        fut = eager(slow())
        assert steps == ["inline"] and not fut.done()
        assert await fut == 7
        assert steps == ["inline", "after a bare yield", "after a future"]

    run(main())


def test_an_exception_before_any_wait_is_the_futures_and_one_after_is_the_tasks() -> None:
    async def early() -> None:
        raise ValueError("early")

    async def late() -> None:
        await asyncio.sleep(0)
        raise KeyError("late")

    async def main() -> None:
        fut = eager(early())
        assert fut.done() and isinstance(fut.exception(), ValueError)
        with pytest.raises(KeyError):
            await eager(late())

    run(main())


async def _waits(seen: list[str]) -> None:
    """Waits long; says when it is cancelled, and when it ends."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        seen.append("cancelled")
        raise
    finally:
        seen.append("finally")


def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    seen: list[str] = []

    async def main() -> None:
        fut = eager(_waits(seen))
        await asyncio.sleep(0)
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut
        assert seen == ["cancelled", "finally"]

    run(main())


# -- StepRun: calls marked eager -------------------------------------------------------

REFUSE = Reply(550, "5.7.1", "no")


def _step(calls: tuple[StepCall, ...]) -> tuple[StepRun, list[Verdict]]:
    done: list[Verdict] = []
    return StepRun(calls, (), "192.0.2.1", done.append), done


def test_an_eager_call_that_ends_inline_answers_from_start_and_the_step_goes_on() -> None:
    async def tags() -> Verdict:
        return Verdict(None, b"X-A: 1\r\n")

    def sync() -> Verdict:
        return Verdict(None, b"X-B: 2\r\n")

    async def main() -> None:
        before = len(asyncio.all_tasks())
        step, done = _step((StepCall("a", tags, True, None, eager=True), StepCall("b", sync, False, None)))
        verdict = step.start()
        assert verdict == Verdict(None, b"X-B: 2\r\nX-A: 1\r\n")  # a later stage's above an earlier one's
        assert done == [] and len(asyncio.all_tasks()) == before

    run(main())


def test_an_eager_call_that_waits_answers_through_done_with_the_same_verdict() -> None:
    async def refuses_later() -> Reply:
        await asyncio.sleep(0.01)
        return REFUSE

    async def main() -> None:
        step, done = _step((StepCall("a", refuses_later, True, None, eager=True),))
        assert step.start() is None
        for _ in range(100):
            if done:
                break
            await asyncio.sleep(0.01)
        assert done == [Verdict(REFUSE)]

    run(main())


def test_an_eager_call_that_raises_inline_is_a_stage_failure() -> None:
    async def broken() -> Verdict:
        raise RuntimeError("broken")

    async def main() -> None:
        step, _ = _step((StepCall("a", broken, True, None, eager=True),))
        assert step.start() == Verdict(STAGE_FAILED)

    run(main())


def test_cancelling_a_step_cancels_its_eager_call_where_it_waits() -> None:
    seen: list[str] = []

    async def main() -> None:
        step, done = _step((StepCall("a", lambda: _waits(seen), True, None, eager=True),))
        assert step.start() is None
        await asyncio.sleep(0)
        step.cancel()
        for _ in range(10):
            await asyncio.sleep(0)
        assert seen == ["cancelled", "finally"] and done == []

    run(main())


def test_a_task_cancelled_before_its_first_step_still_cancels_the_coroutine_and_its_wait() -> None:
    seen: list[str] = []

    async def main() -> None:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def waits_on_gate() -> None:
            try:
                await gate
            finally:
                seen.append("told")

        fut = eager(waits_on_gate())
        fut.cancel()  # before the task ever ran
        with pytest.raises(asyncio.CancelledError):
            await fut
        assert seen == ["told"] and gate.cancelled()

    run(main())


def test_a_cancellation_before_any_wait_gives_a_cancelled_future() -> None:
    async def main() -> None:
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        gone.cancel()

        async def awaits_a_cancelled_future() -> None:
            await gone

        assert eager(awaits_a_cancelled_future()).cancelled()

    run(main())


def test_cancelling_a_step_before_its_task_ran_cancels_the_eager_call_too() -> None:
    seen: list[str] = []

    async def main() -> None:
        step, done = _step((StepCall("a", lambda: _waits(seen), True, None, eager=True),))
        assert step.start() is None
        step.cancel()  # at once: the step's task has not run a step yet
        for _ in range(10):
            await asyncio.sleep(0)
        assert seen == ["cancelled", "finally"] and done == []

    run(main())
