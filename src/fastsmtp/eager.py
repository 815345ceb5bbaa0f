"""Coroutines started inline: a task only from their first real wait.

Rules of this module:
- ``eager(coro)`` runs ``coro`` at once, in the caller's frame, up to its
  first suspension.  One that ends without waiting (every DNS answer in
  the cache, the common case for authentication) gives a future that is
  already done: no task is made, and no loop turn passes before its
  result is used.  One that waits goes on as a task from where it stopped,
  as Python 3.12's eager task factory does.
- The inline part runs outside any task: ``asyncio.current_task()`` is
  None there, so ``asyncio.timeout`` cannot be used in it (it raises).
  Callers start eagerly only code that needs no timeout until it waits,
  and say so where they do.
- Cancelling the task cancels the coroutine where it waits, as for any
  task, even before the task's first step (then the wait it stopped at is
  cancelled and the coroutine told, by the task's done callback); the
  future of a finished one ignores ``cancel()``.
"""

from __future__ import annotations

import asyncio
import inspect
import types
from typing import Any, Coroutine, Generator, TypeVar

__all__ = ["eager"]

_T = TypeVar("_T")


def eager(coro: Coroutine[Any, Any, _T], loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[_T]:
    """``coro`` run inline up to its first wait: a done future if it never waits, else its task."""
    if loop is None:
        loop = asyncio.get_running_loop()
    try:
        waiting = coro.send(None)
    except StopIteration as stop:
        done: asyncio.Future[_T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except asyncio.CancelledError:  # cancelled before any wait: so is its future, as a task would be
        cancelled: asyncio.Future[_T] = loop.create_future()
        cancelled.cancel()
        return cancelled
    except Exception as exc:  # raised before any wait: the future holds it, as a task's would
        failed: asyncio.Future[_T] = loop.create_future()
        failed.set_exception(exc)
        return failed
    task = loop.create_task(_go_on(coro, waiting))
    task.add_done_callback(lambda t: _dropped(t, coro, waiting))
    return task


def _dropped(task: asyncio.Task[Any], coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
    """A task cancelled before its first step never ran _go_on: cancel the wait, and tell the coroutine."""
    if not task.cancelled() or inspect.getcoroutinestate(coro) != inspect.CORO_SUSPENDED:
        return  # it ended, or _resume already handed it the cancellation
    if isinstance(waiting, asyncio.Future):
        waiting.cancel()
    try:
        coro.throw(asyncio.CancelledError())
    except BaseException:  # it ended (the cancellation, or anything its cleanup raised): as a task's would
        return
    coro.close()  # it waits again after a cancellation: nobody will resume it


async def _go_on(coro: Coroutine[Any, Any, _T], waiting: Any) -> _T:
    # A native coroutine for the task (asyncio takes no generator-based
    # one from Python 3.12 on); awaiting _resume delegates to it.
    return await _resume(coro, waiting)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, _T], waiting: Any) -> Generator[Any, Any, _T]:
    """Go on with a coroutine stopped at ``waiting`` (what it yielded: a future, or None for a bare yield).

    What the task sends or throws in is handed to the coroutine, as
    ``yield from`` would, from the wait where it stopped.
    """
    while True:
        try:
            sent = yield waiting
        except BaseException as exc:  # a cancellation, or GeneratorExit when the task is dropped
            try:
                waiting = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                waiting = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
