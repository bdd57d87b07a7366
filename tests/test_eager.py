"""start_eagerly: runs a coroutine now, and carries it on as a task only if it suspends."""

from __future__ import annotations

import asyncio

import pytest

from pyserver.app.eager import start_eagerly


def test_a_coroutine_that_never_waits_finishes_without_a_task() -> None:
    async def main() -> None:
        done: list[int] = []

        async def quick() -> None:
            done.append(1)

        assert start_eagerly(quick()) is None
        assert done == [1]

    asyncio.run(main())


def test_a_suspended_coroutine_is_carried_on_with_results_and_exceptions() -> None:
    async def main() -> None:
        steps: list[object] = []

        async def slow() -> None:
            steps.append("started")
            await asyncio.sleep(0.001)
            steps.append("slept")
            failing = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.001, failing.set_exception, ValueError("x"))
            with pytest.raises(ValueError):
                await failing
            answered = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(answered.set_result, 42)
            steps.append(await answered)
            await asyncio.sleep(0)
            steps.append("done")

        task = start_eagerly(slow())
        assert steps == ["started"]
        assert task is not None
        await task
        assert steps == ["started", "slept", 42, "done"]

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    async def main() -> None:
        seen: list[str] = []

        async def forever() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        task = start_eagerly(forever())
        assert task is not None
        await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled"]
        assert task.cancelled()

    asyncio.run(main())


def test_an_exception_before_the_first_suspension_reaches_the_caller() -> None:
    async def main() -> None:
        async def broken() -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError):
            start_eagerly(broken())

    asyncio.run(main())
