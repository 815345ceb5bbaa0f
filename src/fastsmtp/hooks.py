"""Policy hooks: the operator's Python code, asked at each step of a session.

Rules of this module:
- A policy is any object with some of the methods of ``Policy``.  Each hook
  gets immutable values (``SessionInfo``, ``Address``, ``MessageInfo``),
  never the session itself: a hook that could change the session could
  break the state machine's guarantees (style rule 3).
- A hook answers ``None`` (go on: the server's own checks decide) or a
  4xx/5xx ``Reply`` (refuse with it).  Hooks refuse; they never accept
  what the server would refuse, since a recipient without a Maildir has
  nowhere to be delivered.  A positive Reply is therefore read as None.
- A policy is the first of the stages (stages.py), and is resolved with
  them once per worker, by name: a missing method is never called, and
  whether a method is a coroutine function is decided then, not per call
  (style rule 11; no ``dir()`` scan, no signature sniffing).  A hook may
  also answer a ``stages.Verdict``, the stages' own answer.
- A hook that raises, answers something other than a Reply or None, or
  (async) takes longer than ``--policy-timeout`` gives ``451 4.3.0`` and
  one log line; it never ends the connection or the worker.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Protocol

from .config import ConfigError
from .events import Address, Reply
from .stages import STAGE_FAILED

if TYPE_CHECKING:
    from .auth.results import AuthResults

__all__ = [
    "Policy",
    "AcceptAll",
    "SessionInfo",
    "MessageInfo",
    "HOOK_FAILED",
    "load_policy",
]

#: What a hook that failed (raised, hung, answered nonsense) gets.
HOOK_FAILED = STAGE_FAILED


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What a hook may know about the session, as of the command being asked about.

    ``peer`` is the client's address (the one a PROXY header gave, if any).
    ``helo`` is the last accepted HELO/EHLO argument ("" before one).
    ``sender`` and ``recipients`` are the transaction so far: at ``on_mail``
    there is no sender yet, at ``on_rcpt`` the recipients accepted before
    this one.  ``tls`` is whether the session is encrypted.
    """

    peer: str
    helo: str
    tls: bool
    sender: Address | None
    recipients: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """The message at end of data: its envelope and size (never its content).

    ``auth`` holds what SPF, DKIM, DMARC and ARC found (auth/results.py),
    None when the checks did not run (all off, or a trusted client).  The
    Authentication-Results field is already decided: a hook may still
    refuse the message on the results.
    """

    queue_id: str
    sender: Address | None
    recipients: tuple[Address, ...]
    size: int
    auth: AuthResults | None = None


HookResult = Reply | None


class Policy(Protocol):
    """The hooks a policy may define; each is optional, sync or ``async``.

    Every hook returns ``None`` to go on with the server's own checks, or a
    4xx/5xx ``Reply`` to refuse.  A policy is loaded with ``--policy
    module:Class`` (or ``path/to/file.py:Class``) and instantiated once per
    worker, with no arguments.

    - ``on_connect(peer)``: before the greeting; a refusal is sent instead
      of it, and the connection is closed.
    - ``on_helo(info, domain)``: HELO or EHLO with ``domain``.
    - ``on_mail(info, address)``: MAIL FROM; ``address`` is None for the
      null sender ``<>`` of bounces.
    - ``on_rcpt(info, address)``: RCPT TO; after None, the folder check
      still decides (a recipient needs a Maildir).
    - ``on_message(info, message)``: end of data, before the message is
      stored; a refusal stores nothing.
    """

    def on_connect(self, peer: str) -> HookResult | Awaitable[HookResult]: ...

    def on_helo(self, info: SessionInfo, domain: str) -> HookResult | Awaitable[HookResult]: ...

    def on_mail(self, info: SessionInfo, address: Address | None) -> HookResult | Awaitable[HookResult]: ...

    def on_rcpt(self, info: SessionInfo, address: Address) -> HookResult | Awaitable[HookResult]: ...

    def on_message(self, info: SessionInfo, message: MessageInfo) -> HookResult | Awaitable[HookResult]: ...


class AcceptAll:
    """A policy that defines no hook: the server's own checks decide everything.

    A convenient base class; only the methods a subclass defines are called.
    """


def load_policy(spec: str) -> object:
    """Import and instantiate ``module:Class`` or ``path/to/file.py:Class``.

    ``Class`` may be any callable taking no arguments (a class, or a factory
    function).  A relative file path is taken from the working directory.

    Raises:
        ConfigError: one sentence naming the spec and what went wrong.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"policy: {spec!r} is not MODULE:CLASS or FILE.py:CLASS")
    try:
        if target.endswith(".py"):
            path = os.path.abspath(target)
            name = "fastsmtp_policy_" + os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(module_spec)
            # Registered first, as import does: dataclasses and pickling look
            # a class's module up in sys.modules.
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        factory = getattr(module, attr)
        return factory()
    except ConfigError:
        raise
    except Exception as exc:  # an operator's module can raise anything while importing
        raise ConfigError(f"policy: cannot load {spec}: {type(exc).__name__}: {exc}") from None
