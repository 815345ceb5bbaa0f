"""Test tools for DKIM and ARC: keys, a dict-backed Lookups, a header splitter, a chunked feed."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from fastsmtp.auth.arc import ARCResult
from fastsmtp.auth.dkim import DKIMResult, Verifier
from fastsmtp.auth.dkimsig import KeyCache
from fastsmtp.dns import DNSError


@dataclass
class FakeLookups:
    """Lookups from a dict: name -> records, or an exception to raise."""

    records: dict[str, tuple[bytes, ...] | BaseException] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    #: A records (DNSBL tests): name -> addresses, or an exception to raise.
    addresses: dict[str, tuple[str, ...] | BaseException] = field(default_factory=dict)

    def add(self, name: str, *records: bytes) -> None:
        self.records[name.lower()] = tuple(records)

    async def txt(self, name: str) -> tuple[bytes, ...]:
        name = name.lower().rstrip(".")
        self.asked.append(name)
        await asyncio.sleep(0)
        value = self.records.get(name, ())
        if isinstance(value, BaseException):
            raise value
        return value

    async def a(self, name: str) -> tuple[str, ...]:
        self.asked.append(name)
        await asyncio.sleep(0)
        value = self.addresses.get(name, ())
        if isinstance(value, BaseException):
            raise value
        return value

    async def aaaa(self, name: str) -> tuple[str, ...]:
        return ()

    async def mx(self, name: str) -> tuple[tuple[int, str], ...]:
        return ()

    async def ptr(self, address: str) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class KeyPair:
    kind: str  # "rsa" | "ed25519"
    private: bytes  # what dkimpy's sign() takes
    record: bytes  # the TXT record

    @property
    def algorithm(self) -> bytes:
        return b"rsa-sha256" if self.kind == "rsa" else b"ed25519-sha256"


@lru_cache(maxsize=None)
def rsa_key(bits: int) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())  # fmt: skip
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyPair("rsa", pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der))


@lru_cache(maxsize=None)
def ed_key() -> KeyPair:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyPair("ed25519", base64.b64encode(seed), b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw))


def craft(
    msg: bytes, key: KeyPair, extra: list[tuple[bytes, bytes]], canon: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    *, domain: bytes = b"example.com", selector: bytes = b"sel", headers: Sequence[bytes] = (b"from", b"to", b"subject"),
) -> bytes:
    """An rsa-sha256 signature with tags dkimpy's sign() does not offer (x=, t=), made by dkimpy's own signer."""
    import hashlib

    import dkim as dkimpy
    from dkim.canonicalization import CanonicalizationPolicy
    from dkim.crypto import parse_pem_private_key

    d = dkimpy.DKIM(msg)
    policy = CanonicalizationPolicy.from_c_value(b"/".join(canon))
    body = policy.canonicalize_body(d.body)
    fields = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"/".join(canon)), (b"d", domain), (b"s", selector),
              *extra, (b"h", b":".join(headers)), (b"bh", base64.b64encode(hashlib.sha256(body).digest())),
              (b"b", b"0" * 60)]  # fmt: skip
    d.signature_algorithm = b"rsa-sha256"
    d.hasher = hashlib.sha256
    d.include_headers = tuple(headers)
    res = d.gen_header(fields, tuple(headers), policy, b"DKIM-Signature", parse_pem_private_key(key.private))
    return b"DKIM-Signature: " + res + msg


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers as the lead's parser gives them, body)."""
    head, sep, body = message.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in (head + b"\r\n").split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return [(f[: f.index(b":")].rstrip(b" \t"), f) for f in fields], body


def feed(verifier: Verifier, body: bytes, rnd: random.Random) -> None:
    """The body in random-size chunks, as network reads would bring it."""
    if not verifier.needs_body:
        return
    pos = 0
    while pos < len(body):
        size = rnd.choice((1, 2, 3, 7, 64, 1000, 65536))
        verifier.body(memoryview(body)[pos : pos + size])
        pos += size


def verify(
    message: bytes, lookups: FakeLookups, now: float | None = None, seed: int = 0, **kw: object
) -> tuple[list[DKIMResult], Verifier]:
    headers, body = split_message(message)
    v = Verifier(headers, key_cache=KeyCache(), **kw)  # type: ignore[arg-type]
    feed(v, body, random.Random(seed))
    v.end()
    return asyncio.run(v.dkim(lookups, time.time() if now is None else now)), v


def verify_arc(message: bytes, lookups: FakeLookups, seed: int = 0) -> ARCResult:
    headers, body = split_message(message)
    v = Verifier(headers, key_cache=KeyCache())
    feed(v, body, random.Random(seed))
    v.end()
    return asyncio.run(v.arc(lookups, time.time()))


__all__ = ["FakeLookups", "KeyPair", "rsa_key", "ed_key", "split_message", "feed", "verify", "verify_arc", "DNSError"]
