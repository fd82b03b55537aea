"""From `interpql serve`'s options to a running server's services: the model and its
autoencoders, where node data comes from, the cache, the explanation store, the explainer API
and the API keys. Every problem is a ValueError, OSError or ImportError here, at start-up."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blobfile as bf

from interpql.backends.base import AutoencoderInput
from interpql.backends.cuda_memory import start_recording
from interpql.backends.explanations.api import ApiSettings
from interpql.backends.ray_serve.protocol import DEFAULT_APP, ServedModel
from interpql.backends.tokenizer import gpt2_encoding
from interpql.demo.artifacts import DEMO_DIR, DEMO_NAME, load_demo_autoencoders
from interpql.file_errors import FileProblem
from interpql.loaders.auth import ApiKeys
from interpql.loaders.cache import NodeDataCache
from interpql.loaders.explaining import ExplanationService
from interpql.loaders.jobs import JobManager, open_store
from interpql.loaders.models import attach_autoencoders, default_name, load_model
from interpql.loaders.nodes import NodeKind
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.loaders.sources import CompactSource, ExplanationStore, TdbFolderSource
from interpql.observability.memory_snapshots import PATH as SNAPSHOT_PATH
from interpql.observability.tracing import OTLP_ENV, otlp_tracer_provider
from interpql.resolvers.context import Services
from interpql.settings import Settings

log = logging.getLogger(__name__)

FALLBACK_MODEL = "random:tiny"


@dataclass
class ServeOptions:
    model: str | None = None  # None: the embedded demo (a small random model if not built)
    name: str | None = None
    backend: str = "native"
    device: str = "cpu"
    dtype: str = "float32"
    no_model: bool = False
    mlp_autoencoder: str | None = None
    attn_autoencoder: str | None = None
    sources: list[str] = field(default_factory=list)
    cache: str | None = None  # None: in memory; redis://host:port[/db]
    cache_ttl_s: float = 3600.0
    # Shared state of replicas: jobs, their events and per-key limits (and the cache, unless
    # `cache` is given). None: jobs in a SQLite file beside the explanation store.
    redis: str | None = None
    explanation_store: str = ".interpql/explanations.sqlite"
    openai_base_url: str | None = None
    openai_api_key: str | None = None
    explainer_model: str = "gpt-4o-mini"
    simulator_model: str = "gpt-4o-mini"
    simulator: str = "auto"
    explainer_temperature: float = 1.0
    api_keys: list[str] = field(default_factory=list)
    api_key_hashes: list[str] = field(default_factory=list)
    max_jobs_per_key: int = 2
    max_tokens_per_key: int = 2_000_000
    settings: Settings = field(default_factory=Settings)
    # OpenTelemetry tracing over OTLP/HTTP, also on when $OTEL_EXPORTER_OTLP_ENDPOINT is set;
    # the collector's base URL (None: that variable's, else http://localhost:4318).
    otel: bool = False
    otel_endpoint: str | None = None
    # The model runs in a Ray Serve application (`interpql deploy`) on the cluster at this
    # address; None: in this process.
    ray: str | None = None
    ray_app: str = DEFAULT_APP


def demo_available() -> bool:
    return (DEMO_DIR / "weights.safetensors").exists()


def build_services(options: ServeOptions) -> Services:
    if options.settings.cuda_memory_debugging:
        # Before the model loads, so that the history has its weights' allocations too.
        start_recording(options.device, options.settings.cuda_memory_max_entries)
    tracer_provider = None
    if options.otel or options.otel_endpoint or os.environ.get(OTLP_ENV):
        tracer_provider = otlp_tracer_provider(options.otel_endpoint)
    entry = _model(options)
    _attach_autoencoder_sets(entry, options)
    entry.sources.extend(parse_source(spec) for spec in options.sources)
    registry = ModelRegistry()
    registry.add(entry)
    jobs = JobManager(
        options.max_jobs_per_key,
        options.max_tokens_per_key,
        open_store(options.redis, options.explanation_store),
    )
    store = ExplanationStore(options.explanation_store)
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
    keys = options.api_keys + [k for k in os.environ.get("INTERPQL_API_KEYS", "").split(",") if k]
    if options.settings.require_api_key and not (keys or options.api_key_hashes):
        raise ValueError("--require-api-key needs at least one --api-key or --api-key-hash")
    if options.settings.cuda_memory_debugging and not (keys or options.api_key_hashes):
        log.warning(
            "--cuda-memory-debugging without an API key: %s will refuse every request "
            "(give --api-key)",
            SNAPSHOT_PATH,
        )
    return Services(
        registry,
        options.settings,
        NodeDataCache(options.cache or options.redis, ttl_s=options.cache_ttl_s),
        jobs,
        ExplanationService(store, registry.search, jobs, api),
        ApiKeys(keys, options.api_key_hashes),
        tracer_provider=tracer_provider,
    )


def load_served_model(options: ServeOptions) -> ServedModel:
    """What each replica of a Ray Serve application runs (`interpql deploy`): the model and
    autoencoders that `serve` with the same options loads."""
    entry = _model(options)
    _attach_autoencoder_sets(entry, options)
    sources = {kind.value: source for kind, source in entry.autoencoder_sources.items()}
    return ServedModel(entry.require_backend(), options.model, sources)


def _attach_autoencoder_sets(entry: ModelEntry, options: ServeOptions) -> None:
    if not options.no_model:
        for role, spec in (
            ("mlp", options.mlp_autoencoder),
            ("attention", options.attn_autoencoder),
        ):
            if spec is not None:
                attach_autoencoders(entry, spec, role)


def _model(options: ServeOptions) -> ModelEntry:
    if options.ray is not None:
        return _ray_model(options, options.ray)
    spec = options.model
    name: str | None = options.name
    if spec is None:
        spec = str(DEMO_DIR) if demo_available() else FALLBACK_MODEL
        name = name or (DEMO_NAME if demo_available() else "tiny-random")
    entry = load_model(
        spec,
        name=name,
        device=options.device,
        dtype=options.dtype,
        with_weights=not options.no_model,
        backend=options.backend,
    )
    if Path(spec).resolve() == DEMO_DIR.resolve() and not options.no_model:
        _add_demo_data(entry)
    return entry


def _add_demo_data(entry: ModelEntry) -> None:
    """The demo's autoencoders, and its records and explanations as the first source."""
    backend = entry.require_backend()
    for (reads, layer), autoencoder in load_demo_autoencoders(DEMO_DIR).items():
        backend.attach_autoencoder(layer, AutoencoderInput(reads), autoencoder)
    for kind in (NodeKind.MLP_AUTOENCODER_LATENT, NodeKind.ATTENTION_AUTOENCODER_LATENT):
        entry.autoencoder_sources[kind] = f"{DEMO_NAME} (embedded)"
    _add_demo_records(entry)


def _add_demo_records(entry: ModelEntry) -> None:
    if (DEMO_DIR / "records").exists():
        encoding = gpt2_encoding()

        def decode(token: int) -> str:
            return encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")

        entry.sources.insert(0, CompactSource.open(DEMO_NAME, DEMO_DIR, decode))


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
    for option, value, default in (
        ("--backend", options.backend, local.backend),
        ("--device", options.device, local.device),
        ("--dtype", options.dtype, local.dtype),
        ("--mlp-autoencoder", options.mlp_autoencoder, None),
        ("--attn-autoencoder", options.attn_autoencoder, None),
        ("--no-model", options.no_model, False),
    ):
        if value != default:
            raise ValueError(
                f"{option} does not apply with --ray: the model runs where `interpql deploy` "
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
        else DEMO_NAME
        if demo_available()
        else "tiny-random"
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
    for kind, source in backend.description.autoencoder_sources.items():
        entry.autoencoder_sources[NodeKind(kind)] = source
    if served is None and demo_available():
        _add_demo_records(entry)
    return entry


def parse_source(spec: str) -> TdbFolderSource:
    """`name=NAME,kind=mlp_neuron,records=URL[,explanations=URL]`: Transformer Debugger folders
    (local paths or blobfile URLs) of one node kind."""
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    unknown = set(fields) - {"name", "kind", "records", "explanations"}
    if unknown or "name" not in fields or "kind" not in fields:
        raise ValueError(
            f"--source {spec!r}: expected name=NAME,kind=KIND,records=URL[,explanations=URL]"
        )
    try:
        kind = NodeKind(fields["kind"])
    except ValueError:
        known = ", ".join(k.value for k in NodeKind)
        raise ValueError(f"--source {spec!r}: kind must be one of {known}") from None
    if "records" not in fields and "explanations" not in fields:
        raise ValueError(f"--source {spec!r}: give records=..., explanations=... or both")
    for part in ("records", "explanations"):
        folder = fields.get(part)
        if folder is not None and not _is_folder(folder):
            raise FileProblem(folder, f"no such folder (--source {part}=)")
    return TdbFolderSource(fields["name"], kind, fields.get("records"), fields.get("explanations"))


def _is_folder(location: str) -> bool:
    try:
        return bool(bf.isdir(location))
    except Exception as exc:  # a remote store that cannot be reached, a malformed URL, ...
        raise FileProblem(location, f"cannot be reached ({type(exc).__name__}: {exc})") from exc
