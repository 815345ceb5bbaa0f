"""Stages: the ordered checks a session and its messages pass through.

Rules of this module:
- A stage is any object with some of the step methods ``on_connect(peer)``,
  ``on_helo(info, domain)``, ``on_mail(info, address)``,
  ``on_rcpt(info, address)`` and ``on_message(info, message)`` (the
  ``Policy`` of hooks.py is one).  Each answers a ``Verdict``: continue,
  refuse with a 4xx/5xx reply, or (at ``on_message``) continue with header
  lines to prepend to the stored message.  ``None`` and a positive
  ``Reply`` mean continue; a 4xx/5xx ``Reply`` means refuse.  Stages
  refuse; they never accept what the server itself would refuse.
- The stages of a step run in their configured order.  The first refusal
  ends the step; headers of the stages that continued are kept, a later
  stage's above an earlier one's (each one prepends, RFC 5321 §4.4).
- Methods are looked up once (``resolve``), each with its own timeout and
  whether it is a coroutine function; a missing method is never called.
- A sync step runs inline and answers at once.  At the first async stage
  the rest of the step runs as one task, and the caller is called back with
  the verdict: the glue holds reading meanwhile, so pipelined commands wait
  in order.  ``cancel()`` drops it (the client left).
- An async call marked ``eager`` (ours only: the authentication stage when
  its answers are all cached) is started inline (eager.py); if it ends
  without waiting, the step goes on at once, with no task, no hold on
  reading and no loop turn.  An operator's coroutine is never started that
  way: it may use ``asyncio.timeout``, which needs a task.
- A stage that raises, answers something else, or (async) outlasts its
  timeout gives ``451 4.3.0`` and one log line; the session goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from .eager import eager
from .events import Reply

__all__ = ["Verdict", "CONTINUE", "STAGE_FAILED", "StepCall", "Stages", "NO_STAGES", "resolve", "StepRun"]

log = logging.getLogger("fastsmtp")

#: What a stage that failed (raised, hung, answered nonsense) gets: the
#: client retries later, as after any local trouble (RFC 3463 X.3.0).
STAGE_FAILED = Reply(451, "4.3.0", "Error: temporary policy failure, try again later")

STEPS = ("on_connect", "on_helo", "on_mail", "on_rcpt", "on_message")


@dataclass(frozen=True, slots=True)
class Verdict:
    """A stage's answer: ``reply`` set refuses; ``headers`` go above the message."""

    reply: Reply | None = None
    headers: bytes = b""


CONTINUE = Verdict()


@dataclass(frozen=True, slots=True)
class StepCall:
    """One stage's method for one step, resolved once."""

    name: str
    call: Callable[..., Any]
    is_async: bool
    #: None: the call bounds itself (the authentication stage's budget),
    #: and is awaited without wait_for's task.
    timeout: float | None
    #: Start the coroutine inline (eager.py): the step needs no task when
    #: it ends without waiting.  Only for calls made to expect it.
    eager: bool = False


@dataclass(frozen=True, slots=True)
class Stages:
    """Per step, the calls to make, in order; an empty tuple costs nothing."""

    on_connect: tuple[StepCall, ...] = ()
    on_helo: tuple[StepCall, ...] = ()
    on_mail: tuple[StepCall, ...] = ()
    on_rcpt: tuple[StepCall, ...] = ()
    on_message: tuple[StepCall, ...] = ()


NO_STAGES = Stages()


def resolve(stages: Sequence[tuple[str, object, float]]) -> Stages:
    """``(name, stage, timeout)`` triples, in order, into the calls of each step."""
    per_step: dict[str, list[StepCall]] = {step: [] for step in STEPS}
    for name, stage, timeout in stages:
        for step in STEPS:
            method = getattr(stage, step, None)
            if method is None:
                continue
            if not callable(method):
                raise TypeError(f"{type(stage).__name__}.{step} is not a method")
            per_step[step].append(StepCall(f"{name} {step}", method, inspect.iscoroutinefunction(method), timeout))
    return Stages(**{step: tuple(calls) for step, calls in per_step.items()})


def _verdict(call: StepCall, answer: object) -> Verdict:
    if answer is None or answer is CONTINUE:
        return CONTINUE
    if isinstance(answer, Verdict):
        if answer.reply is not None and answer.reply.code < 400:
            return Verdict(None, answer.headers)
        return answer
    if isinstance(answer, Reply):
        return Verdict(answer) if answer.code >= 400 else CONTINUE
    log.error("%s answered %.80r, not a Verdict, Reply or None", call.name, answer)
    return Verdict(STAGE_FAILED)


def _merge(headers: bytes, verdict: Verdict) -> bytes:
    return verdict.headers + headers if verdict.headers else headers


class StepRun:
    """One step through its stages: ``start()`` answers now, or later through ``done``."""

    __slots__ = ("_calls", "_args", "_peer", "_done", "_task", "_started")

    def __init__(
        self, calls: tuple[StepCall, ...], args: tuple[object, ...], peer: str, done: Callable[[Verdict], None]
    ) -> None:
        self._calls = calls
        self._args = args
        self._peer = peer
        self._done = done
        self._task: asyncio.Task[Verdict] | None = None
        #: An eager call that waited: its own task, which _rest awaits.
        self._started: asyncio.Future[Any] | None = None

    def start(self) -> Verdict | None:
        """Run the sync stages; None: an async one runs and ``done`` will be called."""
        headers = b""
        for i, call in enumerate(self._calls):
            started: asyncio.Future[Any] | None = None
            if call.is_async and call.eager and call.timeout is None:
                started = self._start(call)
                if started.done():
                    verdict = self._ended(call, started)
                    if verdict.reply is not None:
                        return verdict
                    headers = _merge(headers, verdict)
                    continue
            if call.is_async:
                loop = asyncio.get_running_loop()
                self._started = started
                self._task = loop.create_task(self._rest(i, headers, started))
                self._task.add_done_callback(self._finished)
                return None
            verdict = self._sync(call)
            if verdict.reply is not None:
                return verdict
            headers = _merge(headers, verdict)
        return Verdict(None, headers) if headers else CONTINUE

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._started is not None:
            # An eager call's own task: cancelled with ours once ours awaits
            # it, but not if ours is cancelled before its first step.
            self._started.cancel()
            self._started = None

    def _sync(self, call: StepCall) -> Verdict:
        try:
            return _verdict(call, call.call(*self._args))
        except Exception as exc:  # the operator's code: anything, never a crash
            log.error("%s failed for %s: %r", call.name, self._peer, exc)
            return Verdict(STAGE_FAILED)

    def _start(self, call: StepCall) -> asyncio.Future[Any]:
        try:
            return eager(call.call(*self._args))
        except Exception as exc:  # raised before it was a coroutine
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    def _ended(self, call: StepCall, started: asyncio.Future[Any]) -> Verdict:
        """The verdict of an eager call that ended inline."""
        exc = started.exception()
        if exc is not None:
            log.error("%s failed for %s: %r", call.name, self._peer, exc)
            return Verdict(STAGE_FAILED)
        return _verdict(call, started.result())

    async def _rest(self, first: int, headers: bytes, started: asyncio.Future[Any] | None = None) -> Verdict:
        for call in self._calls[first:]:
            if started is not None:  # the eager call that waited: its task goes on
                verdict = await self._async(call, started)
                started = None
            elif call.is_async:
                verdict = await self._async(call)
            else:
                verdict = self._sync(call)
            if verdict.reply is not None:
                return verdict
            headers = _merge(headers, verdict)
        return Verdict(None, headers) if headers else CONTINUE

    async def _async(self, call: StepCall, started: Awaitable[object] | None = None) -> Verdict:
        try:
            answer: Awaitable[object] = call.call(*self._args) if started is None else started
            if call.timeout is None:
                return _verdict(call, await answer)
            return _verdict(call, await asyncio.wait_for(answer, call.timeout))
        except asyncio.TimeoutError:
            log.error("%s gave no answer for %s in %g s", call.name, self._peer, call.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("%s failed for %s: %r", call.name, self._peer, exc)
        return Verdict(STAGE_FAILED)

    def _finished(self, task: "asyncio.Task[Verdict]") -> None:
        if self._task is not task or task.cancelled():
            return
        self._task = self._started = None
        self._done(task.result())
