"""From `interpql serve`'s options to a running server's services: the model and its
autoencoders, where node data comes from, the cache, the explanation store, the explainer API
and the API keys. Every problem is a ValueError, OSError or ImportError here, at start-up."""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import blobfile as bf
import psutil

from interpql.backends import remote
from interpql.backends.cuda_memory import start_recording
from interpql.backends.explanations.api import ApiSettings
from interpql.backends.ray_serve.protocol import DEFAULT_APP, ServedModel
from interpql.deployment_file import read_deployment
from interpql.embedded import (
    EMBEDDED_DIR,
    EMBEDDED_NAME,
    FALLBACK_MODEL,
    FALLBACK_NAME,
    embedded_available,
)
from interpql.file_errors import FileProblem
from interpql.loaders.auth import ApiKeys
from interpql.loaders.cache import NodeDataCache
from interpql.loaders.explaining import ExplanationService
from interpql.loaders.graph_store import open_graph_store
from interpql.loaders.jobs import JobManager, open_store
from interpql.loaders.models import (
    BACKENDS,
    DTYPES,
    add_folder_sources,
    attach_autoencoders,
    attach_dictionaries,
    attach_folder_extras,
    default_name,
    load_model,
)
from interpql.loaders.rate_limits import Limiter, RedisRateLimiter
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.loaders.sources import ExplanationStore, TdbFolderSource
from interpql.loaders.sources.neuronpedia import NeuronpediaFolderSource
from interpql.observability.memory_snapshots import PATH as SNAPSHOT_PATH
from interpql.observability.tracing import OTLP_ENV, otlp_tracer_provider
from interpql.options import groups, option
from interpql.resolvers.context import Services
from interpql.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """Everything `interpql serve` is told (its flags are these fields: options.py)."""

    model: str | None = option(
        None,
        group=groups.MODEL,
        help="registered name (gpt2-small, ...), blobfile URL, Transformer Debugger or Hugging "
        "Face folder, or random:<preset>; default: the embedded demo model (tiny-stdlib). "
        "Repeat for several models, each followed by its own --name, --backend, --device, "
        "--dtype, --dictionary, --source, ... flags",
    )
    name: str | None = option(None, group=groups.MODEL, help="the name clients use for the model")
    backend: str = option(
        "native-gpt2",
        group=groups.MODEL,
        choices=BACKENDS,
        help="native-gpt2: our GPT-2; transformerlens: any model TransformerLens 4.x bridges (a "
        "Hugging Face folder or hub name; needs the extra interpql[transformerlens])",
    )
    device: str = option("cpu", group=groups.MODEL, help="cpu, cuda or cuda:N")
    dtype: str = option(
        "float32", group=groups.MODEL, choices=tuple(DTYPES), help="the weights' dtype"
    )
    no_model: bool = option(
        False, group=groups.MODEL, help="serve metadata only, without loading weights"
    )
    mlp_autoencoder: str | None = option(
        None,
        group=groups.MODEL,
        help="MLP autoencoders: a registered name (ae-mlp-post-act-v4, ae-resid-delta-mlp-v4, "
        "...) or a folder/URL of <layer>.pt files",
    )
    attn_autoencoder: str | None = option(
        None,
        group=groups.MODEL,
        help="attention autoencoders: a registered name (ae-resid-delta-attn-v4, ...) or a "
        "folder/URL of <layer>.pt files",
    )
    dictionaries: list[str] = option(
        flag="--dictionary",
        default_factory=list,
        group=groups.MODEL,
        metavar="NAME=PATH[,scaling_factor=X]",
        help="a named set of dictionaries (its latents are the node kind NAME): a SAELens folder "
        "(cfg.json + sae_weights.safetensors), a folder of them, or circuit-tracer's per-layer "
        "transcoders (config.yaml + layer_{i}.safetensors); local or a blobfile URL; repeat "
        "for more sets, or with the same NAME to add layers to a set",
    )
    deployment: str | None = option(
        None,
        group=groups.MODEL,
        metavar="FILE.toml",
        help="the models to serve, each with its dictionaries and node-data sources, from a "
        "TOML file (instead of --model and its flags; see the README)",
    )
    remote_timeout_s: float = option(
        60.0,
        flag="--remote-timeout",
        group=groups.MODEL,
        help="seconds without a byte from remote storage before loading gives up (0: never)",
    )
    sources: list[str] = option(
        flag="--source",
        default_factory=list,
        group=groups.DATA,
        metavar="name=NAME,kind=KIND,records=URL[,explanations=URL]",
        help="Transformer Debugger record/explanation folders (paths or blobfile URLs) of one "
        "node kind; repeat for more",
    )
    neuronpedia_sources: list[str] = option(
        flag="--neuronpedia-source",
        default_factory=list,
        group=groups.DATA,
        metavar="NAME=FOLDER",
        help="a folder (path or blobfile URL) of feature JSON files downloaded from Neuronpedia "
        "(features, lists of them or upload batches): their examples, explanations and "
        "densities, served as the source NAME; repeat for more",
    )
    cache: str | None = option(
        None,
        group=groups.DATA,
        help="cache for slow sources: redis://host:port[/db] (default: --redis if given, else "
        "in memory)",
    )
    cache_ttl_s: float = 3600.0
    redis: str | None = option(
        None,
        group=groups.DATA,
        metavar="redis://host:port[/db]",
        help="state shared by replicas: jobs, their events and per-key job limits (any replica "
        "answers job(id) and jobUpdates), the per-client rate limits, computed attribution graphs "
        "(any replica answers their id and URL), and the node-data cache unless --cache is given "
        "(default: jobs and graphs in SQLite files beside --explanation-store, rate limits per "
        "process)",
    )
    explanation_store: str = option(
        ".interpql/explanations.sqlite",
        group=groups.DATA,
        help="SQLite file of generated explanations",
    )
    openai_base_url: str | None = option(None, group=groups.EXPLAIN, help="default: the OpenAI API")
    openai_api_key: str | None = option(None, group=groups.EXPLAIN, help="default: $OPENAI_API_KEY")
    explainer_model: str = option("gpt-4o-mini", group=groups.EXPLAIN, help="the explainer's model")
    simulator_model: str = option("gpt-4o-mini", group=groups.EXPLAIN, help="the simulator's model")
    simulator: str = option(
        "auto",
        group=groups.EXPLAIN,
        choices=("auto", "json", "logprobs"),
        help="how explanations are scored: from prompt logprobs, from JSON in the completion, "
        "or the first where the server gives logprobs",
    )
    explainer_temperature: float = option(
        1.0, group=groups.EXPLAIN, help="the explainer's temperature"
    )
    api_keys: list[str] = option(
        flag="--api-key",
        default_factory=list,
        group=groups.ACCESS,
        help="a key (also $INTERPQL_API_KEYS, comma-separated)",
    )
    api_key_hashes: list[str] = option(
        flag="--api-key-hash",
        default_factory=list,
        group=groups.ACCESS,
        help="a key's SHA-256 hex digest",
    )
    max_jobs_per_key: int = option(2, group=groups.ACCESS, help="jobs one key may run at once")
    max_tokens_per_key: int = option(
        2_000_000, group=groups.ACCESS, help="explainer API tokens one key may spend"
    )
    settings: Settings = field(default_factory=Settings)
    # Each further --model's own flags (cli.py splits them off), by MODEL_FIELDS name.
    more_models: list[dict[str, Any]] = field(default_factory=list)
    otel: bool = option(
        False,
        group=groups.OBSERVE,
        help="OpenTelemetry traces of operations and resolvers over OTLP/HTTP (also on when "
        "$OTEL_EXPORTER_OTLP_ENDPOINT is set; needs interpql[otel])",
    )
    otel_endpoint: str | None = option(
        None,
        group=groups.OBSERVE,
        metavar="URL",
        help="the OTLP/HTTP collector's base URL (implies --otel; default: "
        "$OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318)",
    )
    ray: str | None = option(
        None,
        metavar="ADDRESS",
        help="run the model in a Ray Serve application (`interpql deploy`) on the cluster at "
        "ADDRESS (its head's host:port, or auto); --model, if given, must name what it runs",
    )
    ray_app: str = option(
        DEFAULT_APP, flag="--app", help="with --ray: the application's name (default interpql)"
    )


def build_services(options: ServeOptions) -> Services:
    remote.configure(options.remote_timeout_s)
    for digest in options.api_key_hashes:
        # Any other text is a key no request can ever present.
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            shown = digest if len(digest) <= 16 else digest[:16] + "..."
            raise ValueError(
                f"--api-key-hash {shown!r}: expected a key's SHA-256 digest, 64 hex digits "
                "(printf %s KEY | sha256sum)"
            )
    keys = options.api_keys + [k for k in os.environ.get("INTERPQL_API_KEYS", "").split(",") if k]
    if options.settings.require_api_key and not (keys or options.api_key_hashes):
        raise ValueError("--require-api-key needs at least one --api-key or --api-key-hash")
    if options.ray is not None and options.settings.coalesce_window_ms is None:
        # The deployment gathers every server's calls into batches; waiting here too would
        # only hold calls back.
        options = replace(options, settings=replace(options.settings, coalesce_window_ms=0.0))
    if options.settings.cuda_memory_debugging:
        # Before the model loads, so that the history has its weights' allocations too.
        start_recording(options.device, options.settings.cuda_memory_max_entries)
    tracer_provider = None
    if options.otel or options.otel_endpoint or os.environ.get(OTLP_ENV):
        tracer_provider = otlp_tracer_provider(options.otel_endpoint)
    registry = ModelRegistry()
    for one in served_models(options):
        registry.add(_loaded_model(one))
    # The explanation store first: it is the one that refuses an existing file (another
    # program's database), and a refused start should leave no job store made beside it.
    store = ExplanationStore(options.explanation_store)
    jobs = JobManager(
        options.max_jobs_per_key,
        options.max_tokens_per_key,
        open_store(options.redis, options.explanation_store),
    )
    api_key = options.openai_api_key or os.environ.get("OPENAI_API_KEY")
    api = None
    if api_key or options.openai_base_url:
        api = ApiSettings(
            base_url=options.openai_base_url,
            api_key=api_key or "none",
            explainer_model=options.explainer_model,
            simulator_model=options.simulator_model,
            temperature=options.explainer_temperature,
            simulator=options.simulator,
        )
    if options.settings.cuda_memory_debugging and not (keys or options.api_key_hashes):
        log.warning(
            "--cuda-memory-debugging without an API key: %s will refuse every request "
            "(give --api-key)",
            SNAPSHOT_PATH,
        )
    settings = options.settings
    limiter: Limiter | None = None
    if options.redis is not None:
        _warn_if_silent(options.redis)
        limiter = RedisRateLimiter(
            options.redis,
            settings.rate_limit_requests_per_minute,
            settings.rate_limit_cost_per_minute,
        )
    return Services(
        registry,
        settings,
        NodeDataCache(options.cache or options.redis, ttl_s=options.cache_ttl_s),
        jobs,
        ExplanationService(store, registry.search, jobs, api),
        ApiKeys(keys, options.api_key_hashes),
        tracer_provider=tracer_provider,
        rate_limiter=limiter,
        graphs=open_graph_store(options.redis, options.explanation_store),
    )


def _warn_if_silent(url: str) -> None:
    """A warning at start-up when Redis does not answer: the server runs (it may come later),
    but jobs, shared rate limits and graphs fail until it does, and the first to hear of it
    would be a client."""
    import redis

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1) as client:
            client.ping()
    except (redis.RedisError, OSError) as exc:
        log.warning(
            "--redis %s does not answer (%s): jobs, shared rate limits and attribution graphs "
            "answer SHARED_STATE_UNAVAILABLE until it does",
            url,
            exc,
        )


# The fields of ServeOptions that describe one model (its flags: --model, --name, ...).
MODEL_FIELDS = (
    "model",
    "name",
    "backend",
    "device",
    "dtype",
    "no_model",
    "mlp_autoencoder",
    "attn_autoencoder",
    "dictionaries",
    "sources",
    "neuronpedia_sources",
)


def served_models(options: ServeOptions) -> list[ServeOptions]:
    """One ServeOptions per model to serve: the command line's --model (and each further one's
    flags), or the deployment file's models."""
    if options.deployment is None:
        return [options, *(replace(options, **fields) for fields in options.more_models)]
    defaults = ServeOptions()
    given = [name for name in MODEL_FIELDS if getattr(options, name) != getattr(defaults, name)]
    if given or options.more_models:
        flags = ", ".join("--" + name.replace("_", "-") for name in given) or "--model"
        raise ValueError(f"--deployment lists the models: give {flags} in the file, not as flags")
    if options.ray is not None:
        raise ValueError(
            "--ray serves the model of one Ray Serve application, not a deployment file"
        )
    return [replace(options, **fields) for fields in read_deployment(options.deployment)]


def _loaded_model(options: ServeOptions) -> ModelEntry:
    """One model with its dictionaries and sources; its load time and memory in the log."""
    started, before = time.perf_counter(), psutil.Process().memory_info().rss
    entry = _model(options)
    _attach_dictionaries(entry, options)
    entry.sources.extend(parse_source(spec, list(entry.table)) for spec in options.sources)
    for spec in options.neuronpedia_sources:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--neuronpedia-source {spec!r}: expected NAME=FOLDER")
        source = NeuronpediaFolderSource(name, folder)
        source.check_nodes(entry.node_count, entry.architecture.n_layers)
        entry.sources.append(source)
    names = [source.name for source in entry.sources]
    taken = sorted({name for name in names if names.count(name) > 1})
    if taken:
        # Answers name their source: two of one name could not be told apart.
        raise ValueError(f"model {entry.name!r}: two node-data sources are named {taken[0]!r}")
    log.info(
        "model %s (%s on %s, %s): loaded in %.1f s, resident memory +%.0f MB; kinds: %s",
        entry.name,
        entry.backend_name,
        entry.device,
        entry.dtype,
        time.perf_counter() - started,
        (psutil.Process().memory_info().rss - before) / 2**20,
        ", ".join(kind.name for kind in entry.kinds()),
    )
    return entry


def load_served_model(options: ServeOptions) -> ServedModel:
    """What each replica of a Ray Serve application runs (`interpql deploy`): the model and
    autoencoders that `serve` with the same options loads."""
    remote.configure(options.remote_timeout_s)
    entry = _model(options)
    _attach_dictionaries(entry, options)
    return ServedModel(entry.require_backend(), options.model, dict(entry.dictionary_sources))


def _attach_dictionaries(entry: ModelEntry, options: ServeOptions) -> None:
    if options.no_model:
        if options.dictionaries:
            raise ValueError("--dictionary needs the model's weights (not --no-model)")
        return
    for role, spec in (
        ("mlp", options.mlp_autoencoder),
        ("attention", options.attn_autoencoder),
    ):
        if spec is not None:
            attach_autoencoders(entry, spec, role)
    for spec in options.dictionaries:
        attach_dictionaries(entry, *parse_dictionary(spec))


def parse_dictionary(spec: str) -> tuple[str, str, float | None]:
    """`NAME=PATH[,scaling_factor=X]` -> (name, path, scaling factor)."""
    name, sep, rest = spec.partition("=")
    path, _, extra = rest.partition(",scaling_factor=")
    if not sep or not name or not path:
        raise ValueError(f"--dictionary {spec!r}: expected NAME=PATH[,scaling_factor=X]")
    try:
        factor = float(extra) if extra else None
    except ValueError:
        raise ValueError(
            f"--dictionary {spec!r}: scaling_factor {extra!r} is not a number"
        ) from None
    return name, path, factor


def _model(options: ServeOptions) -> ModelEntry:
    if options.ray is not None and options.more_models:
        raise ValueError("--ray serves one Ray Serve application's model: give one --model")
    if options.ray is not None:
        return _ray_model(options, options.ray)
    spec = options.model
    name: str | None = options.name
    if spec == EMBEDDED_NAME:  # the embedded demo by its name (with other --model flags)
        spec = None
    if spec is None:
        spec = str(EMBEDDED_DIR) if embedded_available() else FALLBACK_MODEL
        name = name or (EMBEDDED_NAME if embedded_available() else FALLBACK_NAME)
    entry = load_model(
        spec,
        name=name,
        device=options.device,
        dtype=options.dtype,
        with_weights=not options.no_model,
        backend=options.backend,
    )
    if "://" not in spec and Path(spec).is_dir():
        attach_folder_extras(entry, Path(spec))
    return entry


def _ray_model(options: ServeOptions, address: str) -> ModelEntry:
    """A model that runs in a Ray Serve application: the entry holds its description, and its
    node data is read here."""
    try:
        from interpql.backends.ray_serve.client import IN_FLIGHT, connect
    except ImportError as exc:
        raise ImportError(
            f"--ray needs the Ray extra: pip install 'interpql[ray]' ({exc})"
        ) from None

    local = ServeOptions()
    for flag, value, default in (
        ("--backend", options.backend, local.backend),
        ("--device", options.device, local.device),
        ("--dtype", options.dtype, local.dtype),
        ("--mlp-autoencoder", options.mlp_autoencoder, None),
        ("--attn-autoencoder", options.attn_autoencoder, None),
        ("--dictionary", options.dictionaries, []),
        ("--no-model", options.no_model, False),
    ):
        if value != default:
            raise ValueError(
                f"{flag} does not apply with --ray: the model runs where `interpql deploy` "
                "put it (give the model's options there)"
            )
    backend = connect(address, options.ray_app, options.settings.inference_timeout_s)
    served = backend.description.model
    if options.model is not None and options.model != served:
        raise ValueError(
            f"the Ray Serve application {options.ray_app!r} runs "
            f"{served or 'the default model'!r}, not {options.model!r}"
        )
    name = options.name or (
        default_name(served)
        if served is not None
        else EMBEDDED_NAME
        if embedded_available()
        else FALLBACK_NAME
    )
    entry = ModelEntry(
        name,
        backend.architecture,
        backend,
        backend.name,
        backend.description.device,
        str(backend.dtype).removeprefix("torch."),
        # The deployment batches what servers send it; more calls in flight, larger batches.
        executor=ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="infer"),
    )
    entry.dictionary_sources.update(backend.description.dictionary_sources)
    if served is None and embedded_available():
        add_folder_sources(entry, EMBEDDED_DIR)  # its node data; the model runs remotely
    return entry


def parse_source(spec: str, kinds: list[str]) -> TdbFolderSource:
    """`name=NAME,kind=mlp_neuron,records=URL[,explanations=URL]`: Transformer Debugger folders
    (local paths or blobfile URLs) of one node kind."""
    pairs = [part.split("=", 1) for part in spec.split(",") if "=" in part]
    fields = dict(pairs)
    unknown = set(fields) - {"name", "kind", "records", "explanations"}
    if len(fields) < len(pairs):  # a key given twice: which one was meant?
        raise ValueError(f"--source {spec!r}: each of name, kind, records and explanations once")
    if unknown or not fields.get("name") or "kind" not in fields:
        raise ValueError(
            f"--source {spec!r}: expected name=NAME,kind=KIND,records=URL[,explanations=URL]"
        )
    kind = fields["kind"]
    if kind not in kinds:
        raise ValueError(f"--source {spec!r}: kind must be one of {', '.join(kinds)}")
    if "records" not in fields and "explanations" not in fields:
        raise ValueError(f"--source {spec!r}: give records=..., explanations=... or both")
    for part in ("records", "explanations"):
        folder = fields.get(part)
        if folder is not None and not _is_folder(folder):
            raise FileProblem(folder, f"no such folder (--source {part}=)")
    return TdbFolderSource(fields["name"], kind, fields.get("records"), fields.get("explanations"))


def _is_folder(location: str) -> bool:
    try:
        return bool(remote.call(lambda: bf.isdir(location), "a --source folder", location))
    except FileProblem:
        raise
    except Exception as exc:  # a malformed URL, ...
        raise FileProblem(location, f"cannot be reached ({type(exc).__name__}: {exc})") from exc
