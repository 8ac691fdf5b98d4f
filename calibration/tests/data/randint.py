#!/usr/bin/env python3
"""Writes randint.json: outputs of CPython's random.Random for the Rust port in src/pyrandom.rs.

Run from this directory: python3 randint.py > randint.json
Each randint case: random.Random(seed), then `count` calls of randint(a, b).
Each getrandbits case: random.Random(seed), then `count` calls of getrandbits(k).
"""
import json
import random
import sys

SEEDS = [0, 1, 42, 1234, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 7, 98765432101234, 2**64 - 1]
BOUNDS = [
    (0, 0),
    (0, 1),
    (0, 6),
    (1, 6),
    (0, 255),            # a power of two wide
    (0, 256),            # one past a power of two
    (0, 2**16 - 1),
    (0, 65735),          # the 32 x 512 stream: 66,247 - 512 - 1
    (0, 1046883),        # the 128 x 2048 stream: 1,048,932 - 2048 - 1
    (0, 2**31),
    (0, 2**32 - 1),      # exactly 32 bits
    (0, 2**32),          # 33 bits
    (5, 2**40 + 12345),  # > 2^32, odd offset
    (0, 2**63),
    (0, 2**64 - 2),      # 64 bits, widest u64 range
]
COUNT = 40


def main():
    randint = []
    for seed in SEEDS:
        for a, b in BOUNDS:
            rng = random.Random(seed)
            randint.append({"seed": seed, "a": a, "b": b,
                            "values": [rng.randint(a, b) for _ in range(COUNT)]})
    getrandbits = []
    for seed in [0, 3, 2**32 + 1]:
        for k in [1, 7, 31, 32, 33, 48, 63, 64]:
            rng = random.Random(seed)
            getrandbits.append({"seed": seed, "k": k,
                                "values": [rng.getrandbits(k) for _ in range(COUNT)]})
    json.dump({"python": sys.version.split()[0], "randint": randint,
               "getrandbits": getrandbits}, sys.stdout, indent=None)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
