"""Errors of the protocol core.

As in h11: the core raises ``LocalProtocolError`` internally; the one place
that turns a peer's mistake into ``RemoteProtocolError`` is
``Session.next_event()``.  Every protocol error carries the SMTP reply that
answers it, so the server never has to invent one.  Any other exception
escaping ``next_event()`` is a bug.
"""

from __future__ import annotations

from .events import Reply

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError", "StorageError"]


class ProtocolError(Exception):
    """A protocol violation, and the reply that answers it."""

    def __init__(self, msg: str, reply: Reply) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise a subclass")
        super().__init__(msg)
        self.reply = reply


class LocalProtocolError(ProtocolError):
    """Raised inside the core when input breaks the protocol."""

    def _reraise_as_remote(self) -> "RemoteProtocolError":
        err = RemoteProtocolError(str(self), self.reply)
        err.__cause__ = self
        return err


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; answer with ``reply`` and carry on.

    The reply is a 4xx/5xx, with one exception: another protocol's command
    on the SMTP port (``GET``, ``USER``, ...) is answered ``221 2.7.0`` and
    the session is CLOSED, as Postfix does.
    """


class StorageError(Exception):
    """A message could not be made durable; the client must get 451 4.3.0."""
