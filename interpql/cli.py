"""`interpql serve | export-schema`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from interpql.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from interpql.loaders.models import (
        DEFAULT_MODEL,
        DEFAULT_MODEL_NAME,
        attach_autoencoders,
        load_model,
    )
    from interpql.loaders.registry import ModelRegistry
    from interpql.server import create_app

    spec = args.model or DEFAULT_MODEL
    name = args.name or (DEFAULT_MODEL_NAME if args.model is None else None)
    try:
        entry = load_model(
            spec,
            name=name,
            device=args.device,
            dtype=args.dtype,
            with_weights=not args.no_model,
            backend=args.backend,
        )
    except (ValueError, OSError, ImportError) as exc:
        print(f"interpql: cannot load model {spec!r}: {exc}", file=sys.stderr)
        return 2
    for role, ae_spec in (("mlp", args.mlp_autoencoder), ("attention", args.attn_autoencoder)):
        if ae_spec is None or args.no_model:
            continue
        try:
            attach_autoencoders(entry, ae_spec, role)
        except (ValueError, OSError) as exc:
            print(
                f"interpql: cannot attach {role} autoencoders {ae_spec!r}: {exc}", file=sys.stderr
            )
            return 2
    registry = ModelRegistry()
    registry.add(entry)
    settings = Settings(cors_origin_regex=args.cors_origin_regex)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(registry, settings), host=args.host, port=args.port, log_level="info")
    return 0


def _export_schema(args: argparse.Namespace) -> int:
    from interpql.schema.build import build_schema

    sdl = build_schema().as_str() + "\n"
    if args.output:
        Path(args.output).write_text(sdl)
    else:
        sys.stdout.write(sdl)
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
    serve.add_argument(
        "--cors-origin-regex",
        default=Settings().cors_origin_regex,
        help="origins allowed by CORS (default: localhost on any port)",
    )
    serve.set_defaults(run=_serve)

    export = commands.add_parser("export-schema", help="print the GraphQL schema (SDL)")
    export.add_argument("--output", "-o", help="write to this file instead of stdout")
    export.set_defaults(run=_export_schema)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
