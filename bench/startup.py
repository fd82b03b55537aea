"""Start-up time of `interpql serve` with no arguments (the embedded demo): from launching the
process to the first answered /healthz, over several launches."""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import save, server, summary


def main(repeats: int = 5) -> dict[str, Any]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with server():
            times.append(time.perf_counter() - started)
    result = {"startup": summary(times), "target_median_ms": 3000}
    save("startup", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    main(parser.parse_args().repeats)
