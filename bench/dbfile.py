"""bench/run --backup's volume data: a database-like file (every 4 KiB page half random rows,
half free space), or 1% of its pages rewritten at random.

    python3 bench/dbfile.py fill FILE MIB
    python3 bench/dbfile.py change FILE PERCENT     (prints the bytes changed)
"""
import os
import random
import sys

PAGE = 4096


def page():
    return os.urandom(PAGE // 2) + bytes(PAGE // 2)


mode, path = sys.argv[1], sys.argv[2]
if mode == "fill":
    pages = int(sys.argv[3]) * (1 << 20) // PAGE
    with open(path, "wb") as f:
        for _ in range(pages // 256):
            f.write(b"".join(page() for _ in range(256)))
else:
    pages = os.path.getsize(path) // PAGE
    count = int(pages * float(sys.argv[3]) / 100)
    with open(path, "r+b") as f:
        for p in random.sample(range(pages), count):
            f.seek(p * PAGE)
            f.write(page())
    print(count * PAGE)
