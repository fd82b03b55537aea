"""`make bench`: every benchmark, one after another; results land in bench/results/."""

from __future__ import annotations

from bench import (
    attribution_graph,
    backends,
    concurrency,
    demo_heads,
    dictionaries,
    fairness,
    generation,
    load,
    node_lookup,
    overhead,
    payload,
    ray_replicas,
    startup,
    tdb_request,
)


def main() -> None:
    overhead.main()
    backends.main()
    dictionaries.main()
    attribution_graph.main([])
    tdb_request.main()
    node_lookup.main()
    demo_heads.main()
    concurrency.main()
    fairness.main()
    generation.main()
    payload.main()
    startup.main()
    load.main()
    ray_replicas.main()


if __name__ == "__main__":
    main()
