"""What the state checksum costs: a file of the size of a 3,000-token Phi-3-mini state (0.39 MB a
token, 1.2 GB) written and synced as a save does, then its CRC-32 read as a restore does, from the
page cache and from the disk (the file's pages dropped first). Compare with the 67 s cold read of
such a conversation (benchmarks/README.md, "Speed").

    python benchmarks/state_checksum.py [--mb 1170] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from phichat.kv_state import file_crc32

BLOCK = 1 << 24


def timed_crc(path: Path, drop: bool) -> float:
    """Seconds to read `path`'s CRC-32, with its pages dropped from the page cache first or not."""
    with path.open("rb") as reader:
        if drop:
            os.posix_fadvise(reader.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        file_crc32(reader)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1170, help="state size (3,000 x 0.39 MB)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    block = os.urandom(BLOCK)
    with tempfile.NamedTemporaryFile(dir=args.dir, suffix=".kv") as handle:
        path = Path(handle.name)
        start = time.perf_counter()
        for _ in range(args.mb * 1_000_000 // BLOCK):
            handle.write(block)
        handle.flush()
        written = time.perf_counter() - start
        os.fsync(handle.fileno())
        synced = time.perf_counter() - start - written
        size = path.stat().st_size / 1e9
        print(f"{size:.2f} GB: write {written:.2f} s, fsync {synced:.2f} s")
        for label, drop in (("page cache", False), ("disk", True)):
            best = min(timed_crc(path, drop) for _ in range(3))
            print(f"CRC-32 from the {label}: {best:.2f} s ({best / 67:.3f}x of a 67 s cold read)")


if __name__ == "__main__":
    main()
