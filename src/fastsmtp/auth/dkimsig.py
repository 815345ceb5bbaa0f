"""What DKIM-Signature and ARC's signatures share: tag lists, keys, the hash input, the crypto.

Rules of this module:
- Parsing is strict and bounded: a field over ``MAX_FIELD`` octets or a key
  record over ``MAX_KEY_RECORD`` is refused before it is split; every
  malformation is a ``Problem(result, reason)``, never another exception.
- A ``Problem`` carries the RFC 8601 §2.7.1 result it stands for:
  "permerror" for what cannot be verified (syntax, missing key), "fail"
  for what was verified and is wrong (revoked key, RFC 8301 refusals,
  expired, body hash, signature), "temperror" for DNS trouble.
- Keys come only through ``Lookups.txt`` at ``s._domainkey.d`` (§3.6.2.1);
  the parsed key (or its problem) is cached by the record's text, since
  the resolver caches the text but DER parsing per message is waste.
- All crypto is cryptography's: RSASSA-PKCS1-v1_5 with SHA-256 (§3.3.1),
  and Ed25519 over the SHA-256 digest of the hash input (RFC 8463 §3).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final, Sequence

from cryptography.hazmat.primitives import hashes as crypto_hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from ..dns import BadName, DNSError, Lookups
from ..parser import tag_list
from .canon import RELAXED, SIMPLE, BodyKey, headers_relaxed

__all__ = [
    "Problem",
    "Signature",
    "Key",
    "KeyCache",
    "KEY_CACHE",
    "parse_tags",
    "b_span",
    "parse_signature",
    "parse_key",
    "fetch_key",
    "hash_input",
    "check_signature",
]

#: The largest signature field we parse.  A 16384-bit RSA b= is ~2.8 KB and
#: a long h= a few KB more; a field this big is an attack, not a signature.
MAX_FIELD: Final = 32 * 1024
#: The largest key record we parse (a 16384-bit key is ~2.8 KB of base64).
MAX_KEY_RECORD: Final = 16 * 1024
#: RFC 8301 §3.2: keys under 1024 bits fail.  Above 8192 we refuse to spend
#: the CPU (§3.2 only asks verifiers to handle up to 4096).
MIN_RSA_BITS: Final = 1024
MAX_RSA_BITS: Final = 8192

_FWS: Final = b" \t\r\n"
_TAG_NAME: Final = re.compile(rb"[A-Za-z][A-Za-z0-9_]*\Z")
_BAD_VALUE_OCTET: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_DIGITS: Final = re.compile(r"[0-9]{1,76}\Z")  # §3.5 l=: at most 76 digits
_DOMAIN: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")

# a= (§3.5, RFC 8463 §4): the algorithm's key type and hashlib name.
ALGORITHMS: Final = {"rsa-sha256": ("rsa", "sha256"), "ed25519-sha256": ("ed25519", "sha256")}
# RFC 8301 §3.1: rsa-sha1 MUST NOT be used and is refused before any work.
# (A table, so a test can lift the refusal to prove that OpenDKIM's sha1
# signatures would otherwise verify: Debian's opendkim-testmsg signs sha1 only.)
REFUSED: Final = {"rsa-sha1": "rsa-sha1 not allowed (RFC 8301)"}
_RSA_HASHES: Final = {"sha256": crypto_hashes.SHA256, "sha1": crypto_hashes.SHA1}


class Problem(Exception):
    """A signature that does not verify, with its A-R result and a short reason."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


Tags = dict[str, str]  # name -> value, FWS at its ends removed, in the order of the list


def parse_tags(data: bytes) -> Tags:
    """A tag-list (§3.2): tag names case-sensitive, duplicates and empty specs refused.

    Values only: the one span a verifier needs, b='s (§3.7), is found by
    ``b_span`` when a signature is checked.  The dict keeps the list's
    order (a key record's v= must come first, §3.6.1).

    The common list (all ASCII, no control octet, every name ALPHA
    *ALNUM, none twice) is one pass of the compiled parser
    (``parser.tag_list``; its twin gives the same).  Whatever it is unsure
    of goes to ``parse_tags_careful``, which gives the same answer for
    every input (tests/test_dkim.py compares them) and names the first
    fault.
    """
    tags = tag_list(data)
    return tags if tags is not None else parse_tags_careful(data)


def parse_tags_careful(data: bytes) -> Tags:
    """parse_tags spec by spec, each fault its own reason; the reference the fast path must equal."""
    tags: Tags = {}
    pos, n = 0, len(data)
    while True:
        semi = data.find(b";", pos)
        stop = n if semi < 0 else semi
        spec = data[pos:stop]
        eq = spec.find(b"=")
        if eq < 0:
            if spec.strip(_FWS) or semi >= 0:
                # Only the list's very end may be empty (a trailing ";").
                raise Problem("permerror", "malformed tag list")
            return tags
        name = spec[:eq].strip(_FWS)
        value = spec[eq + 1 :].strip(_FWS)
        if not _TAG_NAME.match(name):
            raise Problem("permerror", "malformed tag name")
        if _BAD_VALUE_OCTET.search(value):
            raise Problem("permerror", "control character in tag value")
        key = name.decode("ascii")
        if key in tags:
            raise Problem("permerror", f"duplicate tag {key}=")
        tags[key] = value.decode("utf-8", "replace")
        if semi < 0:
            return tags
        pos = semi + 1


# b='s tag-spec (§3.2, §3.7): the first, or one after a ";".  Values hold no
# ";" (§3.2 VALCHAR), so a match is the spec named "b" itself, never text
# inside another tag's value; group 1 is what "b= emptied" removes (all
# between "=" and the next ";" or the end, surrounding FWS included).
_B_FIRST: Final = re.compile(rb"[ \t\r\n]*b[ \t\r\n]*=([^;]*)")
_B_LATER: Final = re.compile(rb";[ \t\r\n]*b[ \t\r\n]*=([^;]*)")


def b_span(value: bytes, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Where b='s value lies in the tag list value[start:end] (which has a b= tag)."""
    stop = len(value) if end is None else end
    m = _B_FIRST.match(value, start, stop) or _B_LATER.search(value, start, stop)
    if m is None:
        raise Problem("permerror", "missing b=")  # not after parse_tags found one
    return m.span(1)


def _b64(value: str, what: str) -> bytes:
    """A base64 tag value (§3.5 b=, bh=; §3.6.1 p=), FWS anywhere in it ignored."""
    try:
        data = value.encode("ascii")
    except UnicodeEncodeError:
        raise Problem("permerror", f"malformed {what}") from None
    # Values come from parse_tags, which refuses VT and FF: bytes.split()'s
    # whitespace is then exactly FWS's SP, HTAB, CR, LF.
    data = b"".join(data.split())
    try:
        # Strict mode checks the alphabet and padding in C; what it takes,
        # b64decode(validate=True) takes and decodes the same.
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        pass
    try:
        # Strict mode also refuses a few paddings validate=True lets by:
        # the old rule decides those.
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Problem("permerror", f"malformed {what}") from None


def _number(value: str, what: str) -> int:
    if not _DIGITS.match(value):
        raise Problem("permerror", f"malformed {what}")
    return int(value)


@dataclass(slots=True)
class Signature:
    """A parsed DKIM-Signature, ARC-Message-Signature or ARC-Seal."""

    position: int  # index of the field in the message's headers
    tags: Tags
    algorithm: str
    key_type: str
    hash_name: str
    domain: str
    selector: str
    identity: str  # DKIM i= (AUID), "" if absent
    b: bytes
    b_text: str
    bh: bytes
    header_canon: str
    body_canon: str
    signed: tuple[str, ...]  # h=, lower case
    limit: int | None
    timestamp: int | None
    expires: int | None
    field_no_b: bytes  # the field with b='s value emptied (§3.7)
    # c= (body), a='s hash, l=: made once, as the body hashes are asked for
    # and read by it (a NamedTuple costs a Python-level __new__ each time).
    body_key: BodyKey

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def tag_value(field: bytes) -> tuple[bytes, int]:
    """The field's value (after the colon, without the final CRLF) and where it starts."""
    colon = field.find(b":")
    end = len(field) - 2 if field.endswith(b"\r\n") else len(field)
    return field[colon + 1 : end], colon + 1


def split_tags(field: bytes) -> tuple[Tags, int]:
    """The field's tag list and its value's offset in the field."""
    if len(field) > MAX_FIELD:
        raise Problem("permerror", "signature field too long")
    value, offset = tag_value(field)
    return parse_tags(value), offset


def parse_signature(field: bytes, position: int, tags: Tags, offset: int, *, arc_seal: bool = False) -> Signature:
    """Check and decode a signature's tags (§3.5; RFC 8617 §4.1 for ARC's)."""

    def get(name: str) -> str:
        value = tags.get(name)
        if value is None:
            raise Problem("permerror", f"missing {name}=")
        return value

    try:
        # In this order, so the first missing one is named (a call of get()
        # each cost more than the lookups).
        algorithm = tags["a"].lower()
        b_text = tags["b"]
        domain = tags["d"].lower().rstrip(".")
        selector = tags["s"].lower()
    except KeyError as missing:
        raise Problem("permerror", f"missing {missing.args[0]}=") from None
    if algorithm in REFUSED:
        raise Problem("fail", REFUSED[algorithm])
    if algorithm not in ALGORITHMS:
        # §3.5 / §6.1.1: an algorithm we cannot verify makes the signature
        # unverifiable; RFC 8601 §2.7.1 calls that permerror.
        raise Problem("permerror", f"unknown algorithm {algorithm[:32]}")
    key_type, hash_name = ALGORITHMS[algorithm]
    if not _DOMAIN.match(domain) or ".." in domain:
        raise Problem("permerror", "malformed d=")
    if not _DOMAIN.match(selector) or ".." in selector:
        raise Problem("permerror", "malformed s=")
    b = _b64(b_text, "b=")
    if not b:
        raise Problem("permerror", "empty b=")
    signed: tuple[str, ...]
    limit: int | None
    if arc_seal:
        # RFC 8617 §4.1.3: the AS signs the ARC sets themselves, never a
        # header list or the body; an h= makes the seal invalid.
        if "h" in tags:
            raise Problem("fail", "h= in ARC-Seal")
        bh, header_canon, body_canon, signed, limit = b"", RELAXED, RELAXED, (), None
    else:
        bh = _b64(get("bh"), "bh=")
        header_canon, body_canon = _canon(tags.get("c", "simple"))
        h = get("h")
        # One lower() for the list when ASCII (str.lower of non-ASCII may
        # depend on the neighbours, e.g. a final sigma, so then per name).
        if h.isascii():
            signed = tuple([name.strip(" \t\r\n") for name in h.lower().split(":")])
        else:
            signed = tuple([name.strip(" \t\r\n").lower() for name in h.split(":")])
        if not all(signed):
            raise Problem("permerror", "malformed h=")
        limit = _number(tags["l"], "l=") if "l" in tags else None
    q = tags.get("q")
    if q is not None and "dns/txt" not in [m.strip(" \t\r\n").lower() for m in q.split(":")]:
        raise Problem("permerror", "no usable q= method")
    timestamp = _number(tags["t"], "t=") if "t" in tags else None
    expires = _number(tags["x"], "x=") if "x" in tags else None
    if timestamp is not None and expires is not None and expires < timestamp:
        raise Problem("permerror", "x= before t=")
    start, end = b_span(field, offset, len(field) - 2 if field.endswith(b"\r\n") else len(field))
    field_no_b = field[:start] + field[end:]
    return Signature(
        position, tags, algorithm, key_type, hash_name, domain, selector, "", b, b_text, bh,
        header_canon, body_canon, signed, limit, timestamp, expires, field_no_b,
        BodyKey(body_canon, hash_name, limit),
    )  # fmt: skip


def _canon(c: str) -> tuple[str, str]:
    # §3.5 c=: "header/body"; a lone value is the header's, the body simple.
    head, _, body = c.lower().partition("/")
    body = body or SIMPLE
    if head not in (SIMPLE, RELAXED) or body not in (SIMPLE, RELAXED):
        raise Problem("permerror", "unknown c=")
    return head, body


# -- keys ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    """A parsed key record (§3.6.1)."""

    key_type: str  # "rsa" | "ed25519"
    public: Any  # RSAPublicKey | Ed25519PublicKey; None if revoked (empty p=)
    bits: int
    hashes: frozenset[str] | None  # h=, None: any
    strict: bool  # t=s
    testing: bool  # t=y


def parse_key(record: bytes) -> Key:
    """A key record, or Problem; v=DKIM1 if present must come first (§3.6.1)."""
    if len(record) > MAX_KEY_RECORD:
        raise Problem("permerror", "key record too long")
    tags = parse_tags(record)
    if "v" in tags and (tags["v"] != "DKIM1" or next(iter(tags)) != "v"):
        raise Problem("permerror", "bad v= in key record")
    key_type = tags.get("k", "rsa").lower()
    if key_type not in ("rsa", "ed25519"):
        raise Problem("permerror", "unknown key type")
    h = tags.get("h")
    hashes = frozenset(x.strip(" \t\r\n").lower() for x in h.split(":")) if h is not None else None
    services = [x.strip(" \t\r\n").lower() for x in tags.get("s", "*").split(":")]
    if "email" not in services and "*" not in services:
        raise Problem("permerror", "key not for email (s=)")
    flags = [x.strip(" \t\r\n").lower() for x in tags.get("t", "").split(":")]
    if "p" not in tags:
        raise Problem("permerror", "key record without p=")
    der = _b64(tags["p"], "p=")
    strict, testing = "s" in flags, "y" in flags
    if not der:
        return Key(key_type, None, 0, hashes, strict, testing)
    if key_type == "ed25519":
        # RFC 8463 §4.2: p= is the raw 32-octet public key.
        if len(der) != 32:
            raise Problem("permerror", "bad ed25519 key")
        return Key(key_type, ed25519.Ed25519PublicKey.from_public_bytes(der), 256, hashes, strict, testing)
    try:
        # SubjectPublicKeyInfo (§3.6.1); cryptography also reads a bare
        # PKCS#1 RSAPublicKey, which some signers publish.
        public = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise Problem("permerror", "bad rsa key") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise Problem("permerror", "not an rsa key")
    if public.public_numbers().e > 0xFFFFFFFF:
        raise Problem("permerror", "rsa exponent too large")  # would make each verify costly
    return Key(key_type, public, public.key_size, hashes, strict, testing)


class KeyCache:
    """Parsed keys (or their problems) by record text, bounded, oldest out first."""

    __slots__ = ("_items", "size")

    def __init__(self, size: int = 1024) -> None:
        self._items: dict[bytes, Key | Problem] = {}
        self.size = size

    def parse(self, record: bytes) -> Key:
        hit = self._items.get(record)
        if hit is None:
            try:
                hit = parse_key(record)
            except Problem as p:
                hit = p
            if len(record) <= MAX_KEY_RECORD:  # never keep the huge ones
                if len(self._items) >= self.size:
                    del self._items[next(iter(self._items))]
                self._items[record] = hit
        if isinstance(hit, Problem):
            raise Problem(hit.result, hit.reason)
        return hit

    def __len__(self) -> int:
        return len(self._items)


KEY_CACHE: Final = KeyCache()


async def fetch_key(lookups: Lookups, name: str, cache: KeyCache) -> Key | Problem:
    """The key at name (§3.6.2), or the Problem; never raises."""
    try:
        records = await lookups.txt(name)
    except DNSError:
        return Problem("temperror", "key lookup failed")
    except BadName:
        return Problem("permerror", "bad key name")
    except Exception:  # a surprise from the resolver stays this signature's problem
        return Problem("temperror", "key lookup error")
    if not records:
        return Problem("permerror", "no key")
    first: Problem | None = None
    for record in records:
        # Several records: the first that parses is the key (§3.6.2.2 leaves
        # the choice to us; a stray non-DKIM TXT then does no harm).
        try:
            return cache.parse(record)
        except Problem as p:
            first = first or p
        except Exception:
            first = first or Problem("permerror", "unparsable key")
    assert first is not None
    return first


# -- the hash input and the check ------------------------------------------------------


def hash_input(sig: Signature, headers: Sequence[tuple[bytes, bytes]], index: dict[bytes, list[int]]) -> bytes:
    """§3.7 / §5.4.2: the signed header fields, bottom-up per name, then the signature itself."""
    own = sig.position
    used: dict[str, int] = {}
    parts: list[bytes] = []
    for name in sig.signed:
        positions = index.get(name.encode("utf-8", "replace"))
        if positions is None:
            continue  # none present: over-signed, adds nothing (§5.4.2)
        k = used.get(name, 0)
        used[name] = k + 1
        # Skip the signature's own field: it did not exist when it was made.
        if own in positions:
            positions = [p for p in positions if p != own]
        if k < len(positions):
            # The k-th instance from the bottom; names listed beyond the
            # instances present contribute nothing (over-signing, §5.4.2).
            parts.append(headers[positions[-1 - k]][1])
    parts.append(sig.field_no_b)
    # The signature's own field goes in last, without its final CRLF.
    if sig.header_canon == RELAXED:
        data = headers_relaxed(parts)
        return data[:-2] if data.endswith(b"\r\n") else data
    data = b"".join(parts)
    return data[:-2] if sig.field_no_b.endswith(b"\r\n") else data


def check_signature(sig: Signature, key: Key, data: bytes) -> None:
    """Raise Problem unless sig.b is key's signature over data."""
    try:
        if key.key_type == "ed25519":
            # RFC 8463 §3: Ed25519 signs the SHA-256 digest of the hash input.
            key.public.verify(sig.b, hashlib.sha256(data).digest())
        else:
            key.public.verify(sig.b, data, padding.PKCS1v15(), _RSA_HASHES[sig.hash_name]())
    except Exception:  # InvalidSignature, or a b= of the wrong size
        raise Problem("fail", "bad signature") from None


def check_key(sig: Signature, key: Key) -> None:
    """The key's fitness for this signature (§3.6.1, RFC 8301 §3.2)."""
    if key.public is None:
        raise Problem("fail", "key revoked")
    if key.key_type != sig.key_type:
        raise Problem("permerror", "key type does not match a=")
    if key.hashes is not None and sig.hash_name not in key.hashes:
        raise Problem("permerror", "hash not allowed by key h=")
    if key.key_type == "rsa":
        if key.bits < MIN_RSA_BITS:
            raise Problem("fail", f"key too small ({key.bits} bits)")
        if key.bits > MAX_RSA_BITS:
            raise Problem("permerror", f"key too large ({key.bits} bits)")
