"""`interpql serve | deploy | build-demo | export-schema`."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from interpql.observability.log_format import LOG_FORMATS, configure_logging
from interpql.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from interpql.bootstrap import ServeOptions, build_services
    from interpql.http_protocol import HeaderTimeoutProtocol
    from interpql.server import create_app

    options = ServeOptions(
        model=args.model,
        name=args.name,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        no_model=args.no_model,
        ray=args.ray,
        ray_app=args.app,
        mlp_autoencoder=args.mlp_autoencoder,
        attn_autoencoder=args.attn_autoencoder,
        sources=args.source,
        cache=args.cache,
        redis=args.redis,
        explanation_store=args.explanation_store,
        openai_base_url=args.openai_base_url,
        openai_api_key=args.openai_api_key,
        explainer_model=args.explainer_model,
        simulator_model=args.simulator_model,
        simulator=args.simulator,
        explainer_temperature=args.explainer_temperature,
        api_keys=args.api_key,
        api_key_hashes=args.api_key_hash,
        max_jobs_per_key=args.max_jobs_per_key,
        max_tokens_per_key=args.max_tokens_per_key,
        otel=args.otel,
        otel_endpoint=args.otel_endpoint,
        settings=Settings(
            cors_origin_regex=args.cors_origin_regex,
            allowed_hosts=_allowed_hosts(args),
            header_timeout_s=args.header_timeout,
            coalesce_window_ms=_coalesce_ms(args),
            cached_runs=args.cached_runs,
            max_query_depth=args.max_query_depth,
            max_aliases=args.max_aliases,
            max_query_tokens=args.max_query_tokens,
            max_query_cost=args.max_query_cost,
            max_batch=args.max_batch,
            rate_limit_requests_per_minute=args.rate_limit_requests,
            rate_limit_cost_per_minute=args.rate_limit_cost,
            max_body_bytes=args.max_body_bytes,
            inference_timeout_s=args.inference_timeout,
            require_api_key=args.require_api_key,
            introspection=not args.no_introspection,
            shutdown_grace_s=args.shutdown_grace,
            metrics=args.metrics,
            cuda_memory_debugging=args.cuda_memory_debugging,
            cuda_memory_max_entries=args.cuda_memory_max_entries,
            cuda_memory_snapshot_dir=args.cuda_memory_snapshot_dir,
        ),
    )
    configure_logging(args.log_format)
    if args.workers < 1:
        print("interpql: cannot start: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.header_timeout < 0:
        print("interpql: cannot start: --header-timeout must not be negative", file=sys.stderr)
        return 2
    # Before the model loads (which can take minutes): a port in use is known at once.
    busy = _port_in_use(args.host, args.port)
    if busy is not None:
        print(f"interpql: cannot start: {busy}", file=sys.stderr)
        return 2
    try:
        services = build_services(options)
    except (ValueError, OSError, ImportError) as exc:
        print(f"interpql: cannot start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Whatever else a broken file or setting raises: one line, no traceback (logged at
        # debug level for whoever needs it).
        logging.getLogger(__name__).debug("start-up failed", exc_info=exc)
        print(f"interpql: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    settings = services.settings
    app: Any = create_app(services)
    if args.workers > 1:
        # Each worker process builds its own services from the same options (checked above,
        # where this process's copy is then let go).
        services.registry.close()
        os.environ[WORKER_OPTIONS_ENV] = json.dumps(
            {"options": dataclasses.asdict(options), "log_format": args.log_format}
        )
        app = f"{__name__}:worker_app"
    # uvicorn raises SIGTERM again once it has shut down gracefully (jobs failed and written by
    # then): end as a clean stop, exit status 0, rather than as killed by the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        app,
        factory=args.workers > 1,
        workers=args.workers,
        host=args.host,
        port=args.port,
        log_level="info",
        # JSON logs: uvicorn configures no loggers of its own, so the root's JSON handler
        # writes its lines too.
        log_config=None if args.log_format == "json" else LOGGING_CONFIG,
        ws_max_size=settings.max_body_bytes,
        # uvicorn builds one per connection; a partial (of an importable class) survives the
        # pickling that --workers needs.
        http=functools.partial(  # type: ignore[arg-type]
            HeaderTimeoutProtocol, header_timeout_s=settings.header_timeout_s
        ),
        # SIGTERM: stop accepting, let in-flight requests finish (this long at most), then the
        # app's shutdown fails what jobs still run and closes the model.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )
    return 0


WORKER_OPTIONS_ENV = "INTERPQL_WORKER_OPTIONS"


def _port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound (as uvicorn will bind it), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        return f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server there?"
    return None


def _allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    from interpql.host_check import default_allowed_hosts

    return (*default_allowed_hosts(args.host), *args.allowed_host)


def worker_app() -> Any:
    """The app of one `--workers` process, from the options its parent checked."""
    from interpql.bootstrap import ServeOptions, build_services
    from interpql.server import create_app

    raw = json.loads(os.environ[WORKER_OPTIONS_ENV])
    configure_logging(raw["log_format"])
    fields = raw["options"]
    options = ServeOptions(**{**fields, "settings": Settings(**fields["settings"])})
    return create_app(build_services(options))


def _exit_cleanly(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(0)


def _coalesce_ms(args: argparse.Namespace) -> float:
    if args.coalesce_ms is not None:
        return float(args.coalesce_ms)
    # With --ray the deployment gathers every server's calls into batches; waiting here too
    # would only hold calls back.
    return 0.0 if args.ray else Settings().coalesce_window_ms


def _deploy(args: argparse.Namespace) -> int:
    from functools import partial

    from interpql.bootstrap import ServeOptions, load_served_model

    device = args.device or ("cuda" if args.num_gpus > 0 else "cpu")
    options = ServeOptions(
        model=args.model,
        backend=args.backend,
        device=device,
        dtype=args.dtype,
        mlp_autoencoder=args.mlp_autoencoder,
        attn_autoencoder=args.attn_autoencoder,
    )
    try:
        from interpql.backends.ray_serve.deployment import DeploySettings, delete, deploy
    except ImportError as exc:
        print(f"interpql: deploy needs the Ray extra, interpql[ray] ({exc})", file=sys.stderr)
        return 2
    try:
        if args.delete:
            delete(args.ray, args.app)
            print(f"deleted the Ray Serve application {args.app!r}")
            return 0
        _check_deploy_numbers(args)
        settings = DeploySettings(
            app=args.app,
            replicas=args.replicas,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            max_batch_size=args.max_batch_size,
            batch_wait_s=args.batch_wait_ms / 1000,
            ready_timeout_s=args.ready_timeout,
        )
        described = deploy(args.ray, partial(load_served_model, options), settings)
    except (ValueError, OSError, ImportError) as exc:
        print(f"interpql: cannot deploy: {exc}", file=sys.stderr)
        return 2
    arch = described.architecture
    print(
        f"deployed {args.app!r}: {described.model or 'the default model'} ({described.backend}, "
        f"{arch.n_layers} layers, {len(described.autoencoders)} autoencoders) on "
        f"{args.replicas} replica(s), {described.device}, {described.torch_threads} torch "
        f"thread(s) each\nserve it with: interpql serve --ray {args.ray} --app {args.app}"
    )
    return 0


def _check_deploy_numbers(args: argparse.Namespace) -> None:
    if args.replicas < 1 or args.max_batch_size < 1:
        raise ValueError("--replicas and --max-batch-size must be at least 1")
    if min(args.num_cpus, args.num_gpus, args.batch_wait_ms) < 0 or args.ready_timeout <= 0:
        raise ValueError(
            "--num-cpus, --num-gpus and --batch-wait-ms must not be negative, --ready-timeout "
            "must be positive"
        )
    if args.device is not None and args.device.startswith("cuda") and args.num_gpus <= 0:
        raise ValueError("--device cuda needs --num-gpus (Ray gives a replica no GPU without)")


def _export_schema(args: argparse.Namespace) -> int:
    from interpql.schema.build import build_schema

    sdl = build_schema().as_str() + "\n"
    if args.output:
        Path(args.output).write_text(sdl)
    else:
        sys.stdout.write(sdl)
    return 0


def _build_demo(args: argparse.Namespace) -> int:
    from interpql.demo.artifacts import DEMO_DIR
    from interpql.demo.build import build_demo

    out = Path(args.out) if args.out else DEMO_DIR
    build_demo(out, quick=args.quick, progress=True)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="interpql", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the GraphQL API")
    serve.add_argument(
        "--model",
        help="registered name (gpt2-small, ...), blobfile URL, Transformer Debugger or Hugging "
        "Face folder, or random:<preset>; default: the embedded demo model",
    )
    serve.add_argument("--name", help="the name clients use for the model")
    serve.add_argument(
        "--backend",
        default="native",
        choices=["native", "transformerlens"],
        help="native: our GPT-2; transformerlens: any model TransformerLens 4.x bridges (a "
        "Hugging Face folder or hub name; needs the extra interpql[transformerlens])",
    )
    serve.add_argument(
        "--mlp-autoencoder",
        help="MLP autoencoders: a registered name (ae-mlp-post-act-v4, ae-resid-delta-mlp-v4, "
        "...) or a folder/URL of <layer>.pt files",
    )
    serve.add_argument(
        "--attn-autoencoder",
        help="attention autoencoders: a registered name (ae-resid-delta-attn-v4, ...) or a "
        "folder/URL of <layer>.pt files",
    )
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="GraphQL worker processes on this port, each with its own copy of the model (or "
        "its own handle on the --ray deployment); share jobs and caches with --redis",
    )
    serve.add_argument(
        "--no-model", action="store_true", help="serve metadata only, without loading weights"
    )
    serve.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the model in a Ray Serve application (`interpql deploy`) on the cluster at "
        "ADDRESS (its head's host:port, or auto); --model, if given, must name what it runs",
    )
    serve.add_argument(
        "--app", default="interpql", help="with --ray: the application's name (default interpql)"
    )
    data = serve.add_argument_group("node data")
    data.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="name=NAME,kind=KIND,records=URL[,explanations=URL]",
        help="Transformer Debugger record/explanation folders (paths or blobfile URLs) of one "
        "node kind; repeat for more",
    )
    data.add_argument(
        "--cache",
        help="cache for slow sources: redis://host:port[/db] (default: --redis if given, else "
        "in memory)",
    )
    data.add_argument(
        "--redis",
        metavar="redis://host:port[/db]",
        help="state shared by replicas: jobs, their events and per-key job limits (any replica "
        "answers job(id) and jobUpdates), and the node-data cache unless --cache is given "
        "(default: jobs in a SQLite file beside --explanation-store)",
    )
    data.add_argument(
        "--explanation-store",
        default=".interpql/explanations.sqlite",
        help="SQLite file of generated explanations",
    )
    explain = serve.add_argument_group("explaining through an OpenAI-compatible API")
    explain.add_argument("--openai-base-url", help="default: the OpenAI API")
    explain.add_argument("--openai-api-key", help="default: $OPENAI_API_KEY")
    explain.add_argument("--explainer-model", default="gpt-4o-mini")
    explain.add_argument("--simulator-model", default="gpt-4o-mini")
    explain.add_argument("--simulator", default="auto", choices=["auto", "json", "logprobs"])
    explain.add_argument("--explainer-temperature", type=float, default=1.0)
    auth = serve.add_argument_group("API keys (mutations need one)")
    auth.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a key (also $INTERPQL_API_KEYS, comma-separated)",
    )
    auth.add_argument(
        "--api-key-hash", action="append", default=[], help="a key's SHA-256 hex digest"
    )
    auth.add_argument("--max-jobs-per-key", type=int, default=2)
    auth.add_argument(
        "--require-api-key",
        action="store_true",
        help="every operation needs a key, not only mutations (WebSockets: in connection_init's "
        "payload as {'Authorization': 'Bearer <key>'} or the upgrade's header)",
    )
    auth.add_argument(
        "--no-introspection",
        action="store_true",
        help="refuse introspection queries and federation's _service { sdl }, and leave "
        "schema suggestions ('Did you mean ...?') out of errors; GraphiQL's docs need "
        "introspection, and a federation gateway then composes from schema.graphql (the SDL "
        "`interpql export-schema` prints) instead of asking this server",
    )
    auth.add_argument("--max-tokens-per-key", type=int, default=2_000_000)
    serve.add_argument(
        "--coalesce-ms",
        type=float,
        default=None,
        help="how long concurrent requests wait to share a forward pass (0: never; default "
        f"{Settings().coalesce_window_ms:g}, with --ray 0: the deployment batches)",
    )
    serve.add_argument(
        "--cached-runs",
        type=int,
        default=Settings().cached_runs,
        help="runs kept to answer identical inputs again without a forward pass (0: none)",
    )
    limits = serve.add_argument_group("limits (typed errors when exceeded; 0: unlimited)")
    defaults = Settings()
    limits.add_argument("--max-query-depth", type=int, default=defaults.max_query_depth)
    limits.add_argument("--max-aliases", type=int, default=defaults.max_aliases)
    limits.add_argument(
        "--max-query-tokens",
        type=int,
        default=defaults.max_query_tokens,
        help="lexical tokens of one GraphQL document",
    )
    limits.add_argument(
        "--max-query-cost",
        type=int,
        default=defaults.max_query_cost,
        help="estimated cost of one operation: fields, plus prompt tokens x passes",
    )
    limits.add_argument(
        "--max-batch", type=int, default=defaults.max_batch, help="inputs of one inferBatch"
    )
    limits.add_argument(
        "--rate-limit-requests",
        type=int,
        default=defaults.rate_limit_requests_per_minute,
        help="operations per minute per API key (or client address without one)",
    )
    limits.add_argument(
        "--rate-limit-cost",
        type=int,
        default=defaults.rate_limit_cost_per_minute,
        help="estimated cost per minute per API key (or client address)",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help="bytes of one HTTP body or WebSocket message",
    )
    limits.add_argument(
        "--inference-timeout",
        type=float,
        default=defaults.inference_timeout_s,
        help="seconds a request may wait for its forward passes",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=float,
        default=defaults.shutdown_grace_s,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    serve.add_argument(
        "--cors-origin-regex",
        default=Settings().cors_origin_regex,
        help="origins allowed by CORS and WebSocket handshakes (default: localhost on any port)",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header name to answer to, besides the bind address and the loopback names "
        "(with --host 0.0.0.0: this machine's names and addresses too); repeatable; '*' "
        "answers any (requests to other names get 400: a guard against DNS rebinding)",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=Settings().header_timeout_s,
        help="seconds a request's headers may take to arrive (0: unbounded)",
    )
    observe = serve.add_argument_group("observability")
    observe.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text for people, json for log collectors (one object per line; a line per "
        "GraphQL operation on the logger interpql.requests)",
    )
    observe.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=Settings().metrics,
        help="Prometheus metrics at GET /metrics",
    )
    observe.add_argument(
        "--otel",
        action="store_true",
        help="OpenTelemetry traces of operations and resolvers over OTLP/HTTP (also on when "
        "$OTEL_EXPORTER_OTLP_ENDPOINT is set; needs interpql[otel])",
    )
    observe.add_argument(
        "--otel-endpoint",
        metavar="URL",
        help="the OTLP/HTTP collector's base URL (implies --otel; default: "
        "$OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318)",
    )
    observe.add_argument(
        "--cuda-memory-debugging",
        action="store_true",
        help="record CUDA allocations from start-up; POST /debug/cuda-memory-snapshot (with an "
        "API key) writes a snapshot for https://pytorch.org/memory_viz (needs --device cuda)",
    )
    observe.add_argument(
        "--cuda-memory-max-entries",
        type=int,
        default=Settings().cuda_memory_max_entries,
        help="allocation events the history keeps",
    )
    observe.add_argument(
        "--cuda-memory-snapshot-dir",
        default=Settings().cuda_memory_snapshot_dir,
        help="where snapshots are written",
    )
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "build-demo",
        help="train the embedded demo model, its autoencoders, records and explanations",
    )
    demo.add_argument("--out", help="where to write it (default: the package's demo folder)")
    demo.add_argument("--quick", action="store_true", help="a one-minute toy build (for tests)")
    demo.set_defaults(run=_build_demo)

    deploy = commands.add_parser(
        "deploy",
        help="run a model as a Ray Serve application that `interpql serve --ray` servers share",
    )
    deploy.add_argument(
        "--ray", required=True, metavar="ADDRESS", help="the cluster: its head's host:port, or auto"
    )
    deploy.add_argument("--app", default="interpql", help="the application's name")
    deploy.add_argument("--model", help="as for serve (default: the embedded demo model)")
    deploy.add_argument("--backend", default="native", choices=["native", "transformerlens"])
    deploy.add_argument("--mlp-autoencoder", help="as for serve")
    deploy.add_argument("--attn-autoencoder", help="as for serve")
    deploy.add_argument("--device", help="cpu or cuda (default: cuda with --num-gpus, else cpu)")
    deploy.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    deploy.add_argument("--replicas", type=int, default=1, help="replicas, each with the model")
    deploy.add_argument(
        "--num-cpus",
        type=float,
        default=1.0,
        help="CPUs per replica (also its torch threads)",
    )
    deploy.add_argument(
        "--num-gpus", type=float, default=0.0, help="GPUs per replica (0.5: two share one)"
    )
    deploy.add_argument(
        "--max-batch-size", type=int, default=16, help="calls a replica runs as one batch"
    )
    deploy.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch's first call waits for others",
    )
    deploy.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for every replica to load the model (it keeps trying after)",
    )
    deploy.add_argument(
        "--delete", action="store_true", help="remove the application instead of deploying it"
    )
    deploy.set_defaults(run=_deploy)

    export = commands.add_parser("export-schema", help="print the GraphQL schema (SDL)")
    export.add_argument("--output", "-o", help="write to this file instead of stdout")
    export.set_defaults(run=_export_schema)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
