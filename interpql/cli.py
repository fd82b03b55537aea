"""`interpql serve | build-demo | export-schema`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from interpql.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from interpql.bootstrap import ServeOptions, build_services
    from interpql.server import create_app

    options = ServeOptions(
        model=args.model,
        name=args.name,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        no_model=args.no_model,
        mlp_autoencoder=args.mlp_autoencoder,
        attn_autoencoder=args.attn_autoencoder,
        sources=args.source,
        cache=args.cache,
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
        settings=Settings(
            cors_origin_regex=args.cors_origin_regex,
            coalesce_window_ms=args.coalesce_ms,
            cached_runs=args.cached_runs,
        ),
    )
    try:
        services = build_services(options)
    except (ValueError, OSError, ImportError) as exc:
        print(f"interpql: cannot start: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(services), host=args.host, port=args.port, log_level="info")
    return 0


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
        "--no-model", action="store_true", help="serve metadata only, without loading weights"
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
        "--cache", help="cache for slow sources: redis://host:port[/db] (default: in memory)"
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
    auth.add_argument("--max-tokens-per-key", type=int, default=2_000_000)
    serve.add_argument(
        "--coalesce-ms",
        type=float,
        default=Settings().coalesce_window_ms,
        help="how long concurrent requests wait to share a forward pass (0: never)",
    )
    serve.add_argument(
        "--cached-runs",
        type=int,
        default=Settings().cached_runs,
        help="runs kept to answer identical inputs again without a forward pass (0: none)",
    )
    serve.add_argument(
        "--cors-origin-regex",
        default=Settings().cors_origin_regex,
        help="origins allowed by CORS (default: localhost on any port)",
    )
    serve.set_defaults(run=_serve)

    demo = commands.add_parser(
        "build-demo",
        help="train the embedded demo model, its autoencoders, records and explanations",
    )
    demo.add_argument("--out", help="where to write it (default: the package's demo folder)")
    demo.add_argument("--quick", action="store_true", help="a one-minute toy build (for tests)")
    demo.set_defaults(run=_build_demo)

    export = commands.add_parser("export-schema", help="print the GraphQL schema (SDL)")
    export.add_argument("--output", "-o", help="write to this file instead of stdout")
    export.set_defaults(run=_export_schema)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
