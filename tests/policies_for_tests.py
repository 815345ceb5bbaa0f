"""Policies the server tests load with ``--policy tests/policies_for_tests.py:CLASS``."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

from fastsmtp import AcceptAll, Address, Reply, SessionInfo
from fastsmtp.hooks import MessageInfo


def _load_examples():  # type: ignore[no-untyped-def]
    path = Path(__file__).resolve().parent.parent / "examples" / "policies.py"
    spec = importlib.util.spec_from_file_location("fastsmtp_examples_policies", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


examples = _load_examples()


class Refusing(AcceptAll):
    """Sync hooks: refuses one sender, one recipient, one HELO and messages over 2000 octets."""

    def on_helo(self, info: SessionInfo, domain: str) -> Reply | None:
        return Reply(550, "5.7.1", "Go away") if domain == "bad.example" else None

    def on_mail(self, info: SessionInfo, address: Address | None) -> Reply | None:
        if address is not None and address.raw == b"spammer@bad.example":
            return Reply(550, "5.7.1", "Sender refused by policy")
        return None

    def on_rcpt(self, info: SessionInfo, address: Address) -> Reply | None:
        if address.raw == b"bob@example.com" and info.sender is not None and info.sender.raw == b"ex@example.net":
            return Reply(550, "5.7.1", "Bob does not want mail from you")
        return None

    def on_message(self, info: SessionInfo, message: MessageInfo) -> Reply | None:
        return Reply(554, "5.7.1", "Too long for this policy") if message.size > 2000 else None


class Slow(AcceptAll):
    """Async hooks with a delay; refuses the recipient nobody@example.com before the folder check."""

    async def on_mail(self, info: SessionInfo, address: Address | None) -> Reply | None:
        await asyncio.sleep(0.2)
        return None

    async def on_rcpt(self, info: SessionInfo, address: Address) -> Reply | None:
        await asyncio.sleep(0.1)
        if address.raw == b"carol@example.org":
            return Reply(450, "4.2.0", "Carol is busy")
        return None

    async def on_message(self, info: SessionInfo, message: MessageInfo) -> Reply | None:
        await asyncio.sleep(0.1)
        return None


class Broken:
    """A raising sync hook, a raising async hook, a hanging one and a wrong answer."""

    def on_helo(self, info: SessionInfo, domain: str) -> Reply | None:
        if domain == "raise.example":
            raise RuntimeError("boom")
        return None

    async def on_mail(self, info: SessionInfo, address: Address | None) -> Reply | None:
        raw = address.raw if address is not None else b""
        if raw == b"raise@example.net":
            raise LookupError("async boom")
        if raw == b"hang@example.net":
            await asyncio.sleep(3600)
        return None

    def on_rcpt(self, info: SessionInfo, address: Address) -> object:
        return "250 OK" if address.raw == b"bob@example.com" else None


class AsyncConnect:
    """on_connect refuses nothing but waits: the greeting comes after it."""

    async def on_connect(self, peer: str) -> Reply | None:
        await asyncio.sleep(0.2)
        return None


class RefuseConnect:
    def on_connect(self, peer: str) -> Reply | None:
        return Reply(554, "5.7.1", f"Not from {peer}")


class TinyRateLimit(examples.SenderDomainRateLimit):
    limit = 2
    window = 3600.0


class NotInstantiable:
    def __init__(self) -> None:
        raise RuntimeError("cannot start")
