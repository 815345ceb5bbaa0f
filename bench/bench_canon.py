"""Body canonicalisation speed: MB/s for simple and relaxed on a 100 KB text body.

Run: PYTHONPATH=src python bench/bench_canon.py
"""

from __future__ import annotations

import random
import timeit

from fastsmtp.auth.canon import RELAXED, SIMPLE, BodyHashes, BodyKey


def text_body(size: int, messy: bool) -> bytes:
    rnd = random.Random(7)
    words = [b"the", b"quick", b"brown", b"fox", b"jumps", b"over", b"lazy", b"dog", b"mail", b"server"]
    out = bytearray()
    while len(out) < size:
        line = b" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 12)))
        if messy and rnd.random() < 0.5:
            line = line.replace(b" ", b"  \t", 2) + b"  "  # forces the slow path
        out += line + b"\r\n"
    return bytes(out[:size].rsplit(b"\r\n", 1)[0] + b"\r\n")


def run(canon: str, body: bytes, chunk: int) -> float:
    def once() -> None:
        h = BodyHashes()
        h.need(BodyKey(canon, "sha256", None))
        for i in range(0, len(body), chunk):
            h.write(body[i : i + chunk])
        h.end()

    n = 200
    t = min(timeit.repeat(once, number=n, repeat=5)) / n
    return len(body) / t / 1e6


def main() -> None:
    clean = text_body(100_000, messy=False)
    messy = text_body(100_000, messy=True)
    import hashlib

    t = min(timeit.repeat(lambda: hashlib.sha256(clean).digest(), number=500, repeat=5)) / 500
    print(f"sha256 alone            {len(clean) / t / 1e6:8.0f} MB/s")
    for chunk in (65536, 4096):
        print(f"simple        chunk {chunk:5d} {run(SIMPLE, clean, chunk):8.0f} MB/s")
        print(f"relaxed fast  chunk {chunk:5d} {run(RELAXED, clean, chunk):8.0f} MB/s")
        print(f"relaxed slow  chunk {chunk:5d} {run(RELAXED, messy, chunk):8.0f} MB/s")


if __name__ == "__main__":
    main()
