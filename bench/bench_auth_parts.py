"""What each part of authentication costs per message, in process, with every answer cached.

Run:  python bench/bench_auth_parts.py [--messages 2000] [--rounds 5] [--size 1024] [--profile]

No server and no network: a dict answers the DNS questions (the resolver's
warm path is ~1 µs, tests/test_dns.py's numbers).  The message is
bench_auth.py's: 1 KiB (``--size``), DKIM-signed by dkimpy (rsa-2048, relaxed/relaxed).
Under uvloop, medians over ``--rounds``, each part's µs per message:

- ``spf``: check_mailfrom and check_helo (ip4 match; ``a`` match);
- ``dkim``: a Verifier over the message's fields, its body, and dkim();
- ``stage``: the whole MessageAuth, as the server runs it: begin at MAIL
  (SPF, inline while its answers are cached), the content through the
  header tap, then ready() and finish() (inline, as eager.py runs it, when
  ready() says nothing waits) with DKIM, ARC, DMARC, the
  Authentication-Results field and the verdict.

And the floor under them, what no implementation of these checks avoids:

- ``rsa verify``: one RSA-2048 PKCS#1 v1.5 verification through
  cryptography, the key already parsed;
- ``body sha-256``: SHA-256 over the message's body, in one call;
- ``body relaxed``: the relaxed body canonicalisation's pass over it
  (parser.relaxed_wsp).

``--profile`` prints cProfile's top functions for the stage.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent / "src")]

import bench_auth  # noqa: E402

from fastsmtp.auth.dkim import Verifier  # noqa: E402
from fastsmtp.auth.headers import HeaderTap  # noqa: E402
from fastsmtp.auth.spf import check_helo, check_mailfrom  # noqa: E402
from fastsmtp.auth.stage import Authenticator  # noqa: E402
from fastsmtp.config import Config  # noqa: E402
try:
    from fastsmtp.eager import eager  # noqa: E402
except ImportError:  # an older tree (PYTHONPATH=OLD/src): its end of data always ran as a task
    eager = None
from fastsmtp.events import Address  # noqa: E402
from fastsmtp.metrics import NO_METER  # noqa: E402

CLIENT = "127.0.0.1"


class Answers:
    """The Lookups of a warm cache: a dict."""

    def __init__(self, key_record: bytes) -> None:
        d = bench_auth.DOMAIN
        self.txt_ = {
            f"{bench_auth.SELECTOR}._domainkey.{d}": (key_record,),
            d: (b"v=spf1 ip4:127.0.0.1 -all",),
            f"mx.{d}": (b"v=spf1 a -all",),
            f"_dmarc.{d}": (b"v=DMARC1; p=reject",),
        }

    async def txt(self, name: str) -> tuple[bytes, ...]:
        return self.txt_.get(name.lower(), ())

    def peek_txt(self, name: str) -> tuple[bytes, ...] | None:
        """As Resolver.peek_txt: everything is cached (a name not in the dict: an empty answer)."""
        return self.txt_.get(name.lower(), ())

    async def a(self, name: str) -> tuple[str, ...]:
        return (CLIENT,) if name == bench_auth.HELO else ()

    async def aaaa(self, name: str) -> tuple[str, ...]:
        return ()

    async def mx(self, name: str) -> tuple[tuple[int, str], ...]:
        return ()

    async def ptr(self, address: str) -> tuple[str, ...]:
        return ()


def main(argv: list[str] | None = None) -> int:
    import uvloop

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--size", type=int, default=1024, help="message size in octets (default 1024)")
    ap.add_argument("--chunk", type=int, default=65536, help="octets per write into the stage, as reads hand them over")
    args = ap.parse_args(argv)

    pem, public = bench_auth.keys()
    content = bench_auth.signed_message(args.size, pem)
    pieces = [content[i : i + args.chunk] for i in range(0, len(content), args.chunk)]
    answers = Answers(f"v=DKIM1; k=rsa; p={public}".encode())
    config = Config(hostname="mx.bench.test", trusted_networks=("::1/128",)).validate()
    auth = Authenticator(config, NO_METER, answers)
    sender = Address(b"loadgen", bench_auth.DOMAIN.encode(), bench_auth.SENDER.encode())
    head, _, body = content.partition(b"\r\n\r\n")
    fields: list = []
    HeaderTap(lambda data: None, lambda name, raw: False, lambda h: fields.extend(h) or None).write(content)

    async def spf() -> None:
        await check_mailfrom(answers, CLIENT, bench_auth.SENDER, bench_auth.HELO, "mx.bench.test")
        await check_helo(answers, CLIENT, bench_auth.HELO, "mx.bench.test")

    async def dkim() -> None:
        verifier = Verifier(fields)
        verifier.body(body)
        verifier.end()
        results = await verifier.dkim(answers, time.time())
        assert results[0].result == "pass", results

    async def stage() -> None:
        checks = auth.begin(CLIENT, bench_auth.HELO.encode(), sender)
        assert checks is not None
        await asyncio.sleep(0)  # the SPF task runs while the content comes, as in the server
        tap = checks.tap(lambda data: None)
        for piece in pieces:
            tap.write(piece)
        if eager is not None and checks.ready():  # as the server's end of data: inline when nothing waits
            started = eager(checks.finish())
            verdict = started.result() if started.done() else await started
        else:
            verdict = await checks.finish()
        assert verdict.reply is None and b"dkim=pass" in verdict.headers, verdict

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    from fastsmtp.parser import relaxed_wsp

    private = serialization.load_pem_private_key(pem, None)
    signed = b"x" * 400  # about what a signature's header hash input is
    signature = private.sign(signed, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr, call-arg]
    public_key = private.public_key()
    plain_body = body + b"\r\n"

    async def rsa() -> None:
        public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr, call-arg]

    async def sha() -> None:
        hashlib.sha256(plain_body).digest()

    async def relaxed() -> None:
        relaxed_wsp(plain_body, len(plain_body))

    async def timed(part) -> float:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        for _ in range(args.messages):
            await part()
        return (time.perf_counter() - start) / args.messages * 1e6

    async def baseline() -> None:
        await asyncio.sleep(0)

    async def run() -> dict[str, list[float]]:
        parts = {"spf": spf, "dkim": dkim, "stage": stage, "loop turn": baseline, "rsa verify": rsa,
                 "body sha-256": sha, "body relaxed": relaxed}
        out: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(args.rounds):
            for name, part in parts.items():
                out[name].append(await timed(part))
        return out

    results = uvloop.run(run())
    for name, values in results.items():
        print(f"{name:>12}: {statistics.median(values):7.1f} µs per message (median of {args.rounds})")
    print("stage includes one loop turn (RCPT and DATA's, while SPF's answers come); subtract it for the stage's own cost")
    if args.profile:
        import cProfile
        import pstats

        async def many() -> None:
            for _ in range(args.messages):
                await stage()

        cProfile.runctx("uvloop.run(many())", globals(), {"uvloop": uvloop, "many": many}, "/tmp/bench_auth_parts.prof")
        pstats.Stats("/tmp/bench_auth_parts.prof").sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
