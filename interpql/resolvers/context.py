"""What every resolver receives: the app's registry and settings, and this request's loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interpql.loaders.cache import NodeDataCache
from interpql.loaders.inference import InferenceLoader
from interpql.loaders.node_data import NodeDataLoaders
from interpql.loaders.registry import ModelRegistry
from interpql.settings import Settings


@dataclass
class RequestContext:
    registry: ModelRegistry
    settings: Settings
    inference: InferenceLoader
    node_data: NodeDataLoaders
    request: Any = None
    response: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        registry: ModelRegistry,
        settings: Settings,
        request: Any = None,
        response: Any = None,
        cache: NodeDataCache | None = None,
    ) -> RequestContext:
        return cls(
            registry,
            settings,
            InferenceLoader(registry),
            NodeDataLoaders(registry, cache),
            request,
            response,
        )
