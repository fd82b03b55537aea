"""From `interpql serve`'s options to a running server's services: the model and its
autoencoders, where node data comes from, the cache, the explanation store, the explainer API
and the API keys. Every problem is a ValueError, OSError or ImportError here, at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from interpql.backends.base import AutoencoderInput
from interpql.backends.explanations.api import ApiSettings
from interpql.backends.tokenizer import gpt2_encoding
from interpql.demo.artifacts import DEMO_DIR, DEMO_NAME, load_demo_autoencoders
from interpql.loaders.auth import ApiKeys
from interpql.loaders.cache import NodeDataCache
from interpql.loaders.explaining import ExplanationService
from interpql.loaders.jobs import JobManager
from interpql.loaders.models import attach_autoencoders, load_model
from interpql.loaders.nodes import NodeKind
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.loaders.sources import CompactSource, ExplanationStore, TdbFolderSource
from interpql.resolvers.context import Services
from interpql.settings import Settings

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


def demo_available() -> bool:
    return (DEMO_DIR / "weights.safetensors").exists()


def build_services(options: ServeOptions) -> Services:
    entry = _model(options)
    if not options.no_model:
        for role, spec in (
            ("mlp", options.mlp_autoencoder),
            ("attention", options.attn_autoencoder),
        ):
            if spec is not None:
                attach_autoencoders(entry, spec, role)
    entry.sources.extend(parse_source(spec) for spec in options.sources)
    registry = ModelRegistry()
    registry.add(entry)
    jobs = JobManager(options.max_jobs_per_key, options.max_tokens_per_key)
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
    return Services(
        registry,
        options.settings,
        NodeDataCache(options.cache, ttl_s=options.cache_ttl_s),
        jobs,
        ExplanationService(store, registry.search, jobs, api),
        ApiKeys(keys, options.api_key_hashes),
    )


def _model(options: ServeOptions) -> ModelEntry:
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
    if (DEMO_DIR / "records").exists():
        encoding = gpt2_encoding()

        def decode(token: int) -> str:
            return encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")

        entry.sources.insert(0, CompactSource.open(DEMO_NAME, DEMO_DIR, decode))


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
    return TdbFolderSource(fields["name"], kind, fields.get("records"), fields.get("explanations"))
