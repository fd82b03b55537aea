"""`make bench`: every benchmark, one after another; results land in bench/results/."""

from __future__ import annotations

from bench import backends, overhead


def main() -> None:
    overhead.main()
    backends.main()


if __name__ == "__main__":
    main()
