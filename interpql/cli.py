"""`interpql serve | deploy | build-demo | export-schema`."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from interpql import __version__
from interpql.observability.log_format import LOG_FORMATS, configure_logging
from interpql.options import add_options, flags, from_args, groups, option
from interpql.settings import Settings


@dataclass(frozen=True)
class Listen:
    """Where `serve` listens and how it runs (its flags are these fields: options.py)."""

    host: str = option("127.0.0.1", help="the address to listen on")
    port: int = option(8000, help="the port to listen on", maximum=65535)
    workers: int = option(
        1,
        minimum=1,
        help="GraphQL worker processes on this port, each with its own copy of the model (or "
        "its own handle on the --ray deployment); share jobs and caches with --redis",
    )
    log_format: str = option(
        "text",
        choices=LOG_FORMATS,
        group=groups.OBSERVE,
        help="text for people, json for log collectors (one object per line; a line per "
        "GraphQL operation on the logger interpql.requests)",
    )


def _serve(args: argparse.Namespace) -> int:
    from interpql.bootstrap import ServeOptions, build_services
    from interpql.host_check import default_allowed_hosts
    from interpql.observability.metrics import MULTIPROCESS_ENV
    from interpql.server import create_app

    listen = from_args(Listen, args)
    options = from_args(ServeOptions, args, more_models=getattr(args, "more_models", []))
    hosts = (*default_allowed_hosts(listen.host), *args.allowed_hosts)
    options = dataclasses.replace(
        options, settings=dataclasses.replace(options.settings, allowed_hosts=hosts)
    )
    configure_logging(listen.log_format)
    problem = _refused(listen, options)
    if problem is not None:
        print(f"interpql: cannot start: {problem}", file=sys.stderr)
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
    metric_files = None
    if listen.workers == 1:
        app: Any = create_app(services)
    else:
        # Each worker process builds its own services from the same options (checked above,
        # where this process's copy is then let go).
        services.registry.close()
        if options.redis is None:
            logging.getLogger(__name__).warning(
                "--workers %d without --redis: each worker counts its own rate limits%s; give "
                "--redis redis://host:port to share them",
                listen.workers,
                " and keeps its own jobs and attribution graphs"
                if options.explanation_store == ":memory:"
                else "",
            )
        os.environ[WORKER_OPTIONS_ENV] = json.dumps(
            {"options": dataclasses.asdict(options), "log_format": listen.log_format}
        )
        app = f"{__name__}:worker_app"
        if not os.environ.get(MULTIPROCESS_ENV):
            # The workers' metric values, added up by whichever worker is scraped (they import
            # prometheus_client afresh, and read this then).
            metric_files = tempfile.mkdtemp(prefix="interpql-metrics-")
            os.environ[MULTIPROCESS_ENV] = metric_files
    # uvicorn raises SIGTERM again once it has shut down gracefully (jobs failed and written by
    # then): end as a clean stop, exit status 0, rather than as killed by the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        _run_uvicorn(app, listen, settings)
    finally:
        if metric_files is not None:
            shutil.rmtree(metric_files, ignore_errors=True)
    return 0


def _run_uvicorn(app: Any, listen: Listen, settings: Settings) -> None:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from interpql.http_protocol import HeaderTimeoutProtocol

    uvicorn.run(
        app,
        factory=listen.workers > 1,
        workers=listen.workers,
        host=listen.host,
        port=listen.port,
        log_level="info",
        # JSON logs: uvicorn configures no loggers of its own, so the root's JSON handler
        # writes its lines too.
        log_config=None if listen.log_format == "json" else LOGGING_CONFIG,
        ws_max_size=settings.max_body_bytes,
        # uvicorn builds one per connection; a partial (of an importable class) survives the
        # pickling that --workers needs.
        http=functools.partial(  # type: ignore[arg-type]
            HeaderTimeoutProtocol,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
        ),
        # SIGTERM: stop accepting, let in-flight requests finish (this long at most), then the
        # app's shutdown fails what jobs still run and closes the model.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )


def _refused(listen: Listen, options: Any) -> str | None:
    """What makes these options unservable, found before the model loads (which can take
    minutes): a port in use is known at once. (Numbers out of their bounds are argparse's
    to refuse: options.option's minimum and maximum.)"""
    try:
        re.compile(options.settings.cors_origin_regex)
    except re.error as exc:
        return f"--cors-origin-regex {options.settings.cors_origin_regex!r} is no regex ({exc})"
    if not options.explanation_store:
        return "--explanation-store must name a file (or be :memory:)"
    if options.otel_endpoint is not None:
        problem = _http_url_problem(options.otel_endpoint)
        if problem is not None:
            return f"--otel-endpoint {options.otel_endpoint!r}: {problem}"
    for flag, url in (("--redis", options.redis), ("--cache", options.cache)):
        if url is not None and url.startswith(("redis://", "rediss://", "unix://")):
            problem = _redis_url_problem(url)
            if problem is not None:
                return f"{flag} {url}: {problem}"
    return _port_in_use(listen.host, listen.port)


def _http_url_problem(url: str) -> str | None:
    """What makes `url` no collector's base URL: the exporter would only log failed exports,
    one batch at a time, long after start-up."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - a port out of range or not a number raises here
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http:// or https:// URL with a host, e.g. http://collector:4318"
    return None


def _redis_url_problem(url: str) -> str | None:
    """What redis-py would refuse in `url` when it first connects (after the model loaded)."""
    import redis

    try:
        redis.Redis.from_url(url)
    except ValueError as exc:
        return str(exc)
    database = urllib.parse.urlsplit(url).path.strip("/")
    if database and not database.isdigit():
        return f"the database must be a number, not {database!r}"
    return None


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


def worker_app() -> Any:
    """The app of one `--workers` process, from the options its parent checked."""
    from interpql.bootstrap import ServeOptions, build_services
    from interpql.server import create_app

    raw = json.loads(os.environ[WORKER_OPTIONS_ENV])
    configure_logging(raw["log_format"])
    fields = raw["options"]
    settings = {**fields["settings"], "allowed_hosts": tuple(fields["settings"]["allowed_hosts"])}
    options = ServeOptions(**{**fields, "settings": Settings(**settings)})
    return create_app(build_services(options))


def _exit_cleanly(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(0)


def _deploy(args: argparse.Namespace) -> int:
    from functools import partial

    from interpql.bootstrap import ServeOptions, load_served_model

    device = args.device or ("cuda" if args.num_gpus > 0 else "cpu")
    options = from_args(ServeOptions, args, only=DEPLOYED_MODEL, device=device)
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
        f"{arch.n_layers} layers, {len(described.dictionaries)} dictionaries) on "
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
        try:
            Path(args.output).write_text(sdl)
        except OSError as exc:
            print(f"interpql: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(sdl)
    return 0


def _build_demo(args: argparse.Namespace) -> int:
    from interpql.demo.artifacts import DEMO_DIR
    from interpql.demo.build import build_demo, rebuild_dictionaries, rebuild_explanations

    out = Path(args.out) if args.out else DEMO_DIR
    problem = _demo_build_problem(args, out)
    if problem is not None:
        print(f"interpql: cannot build the demo: {problem}", file=sys.stderr)
        return 2
    if args.only_dictionaries:
        rebuild_dictionaries(out, progress=True)
    elif args.only_explanations:
        rebuild_explanations(out, progress=True)
    else:
        build_demo(
            out,
            quick=args.quick,
            progress=True,
            device=args.device,
            train_tokens=args.train_tokens,
            batch_size=args.batch_size,
        )
    return 0


def _demo_build_problem(args: argparse.Namespace, out: Path) -> str | None:
    """What would stop a build part-way (minutes of training in): found before it starts."""
    import torch

    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    if (args.only_dictionaries or args.only_explanations) and not (
        out / "weights.safetensors"
    ).is_file():
        return f"{out} holds no built demo (weights.safetensors) to rebuild a part of"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {args.device}: torch here has no CUDA device"
    return None


def _positive_int(text: str) -> int:
    value = int(text.replace(",", "").replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


# The options of `serve` that say what model `deploy` runs.
DEPLOYED_MODEL = frozenset(
    {"model", "backend", "dtype", "mlp_autoencoder", "attn_autoencoder", "dictionaries"}
)


def parser() -> argparse.ArgumentParser:
    from interpql.bootstrap import ServeOptions

    root = argparse.ArgumentParser(prog="interpql", description=__doc__)
    root.add_argument("--version", action="version", version=f"interpql {__version__}")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the GraphQL API")
    add_options(serve, Listen)
    add_options(serve, ServeOptions)
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "build-demo",
        help="train the embedded demo model, its autoencoders, records and explanations",
    )
    demo.add_argument("--out", help="where to write it (default: the package's demo folder)")
    demo.add_argument("--quick", action="store_true", help="a one-minute toy build (for tests)")
    demo.add_argument(
        "--only-dictionaries",
        action="store_true",
        help="train the SAELens dictionaries again on the model already in --out, then every "
        "node's records and explanations",
    )
    demo.add_argument(
        "--only-explanations",
        action="store_true",
        help="explain and score every node of the records already in --out again (offline "
        "baselines)",
    )
    demo.add_argument(
        "--device",
        default="cpu",
        help="where the model's training steps run (cuda on an accelerator; default cpu)",
    )
    demo.add_argument(
        "--train-tokens",
        type=_positive_int,
        help="tokens the model trains on (default 3,200,000: ~15-20 minutes on 2 CPU cores)",
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        help="sequences per training step (default 4)",
    )
    demo.set_defaults(run=_build_demo)

    deploy = commands.add_parser(
        "deploy",
        help="run a model as a Ray Serve application that `interpql serve --ray` servers share",
    )
    deploy.add_argument(
        "--ray", required=True, metavar="ADDRESS", help="the cluster: its head's host:port, or auto"
    )
    deploy.add_argument("--app", default="interpql", help="the application's name")
    # What the replicas load, as `serve` would (its device is the deployment's, below).
    add_options(deploy, ServeOptions, only=DEPLOYED_MODEL)
    deploy.add_argument("--device", help="cpu or cuda (default: cuda with --num-gpus, else cpu)")
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
    argv = sys.argv[1:] if argv is None else argv
    first, more = split_models(argv) if argv[:1] == ["serve"] else (argv, [])
    root = parser()
    args = root.parse_args(first)
    if more:
        from interpql.bootstrap import MODEL_FIELDS, ServeOptions

        # Each further --model's own flags, parsed as a serve command line of their own.
        args.more_models = [
            {
                name: getattr(from_args(ServeOptions, root.parse_args(["serve", *segment])), name)
                for name in MODEL_FIELDS
            }
            for segment in more
        ]
    return int(args.run(args))


def split_models(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """`serve`'s argv with several --model: the first model's flags with every other flag, and
    each further model's flags (those of MODEL_FIELDS, each applying to the --model before it,
    or to the first before any)."""
    from interpql.bootstrap import MODEL_FIELDS, ServeOptions

    model_flags = flags(ServeOptions, only=frozenset(MODEL_FIELDS))
    first: list[str] = []
    more: list[list[str]] = []
    current, seen_model, i = first, False, 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag == "--model":
            if seen_model:
                current = []
                more.append(current)
            seen_model = True
        if flag in model_flags:
            taken = 2 if model_flags[flag] and "=" not in argv[i] else 1
            current.extend(argv[i : i + taken])
        else:
            taken = 1
            first.append(argv[i])
        i += taken
    return first, more


if __name__ == "__main__":
    raise SystemExit(main())
