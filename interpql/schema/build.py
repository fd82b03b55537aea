"""The Schema, with the extensions that cut across every field: limits, caches, errors."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError
from strawberry.extensions import (
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext

from interpql.schema.errors import MaskInternalErrors, add_codes
from interpql.schema.generation import Subscription
from interpql.schema.inference import InferenceResult
from interpql.schema.jobs import Mutation
from interpql.schema.query import Query
from interpql.schema.scalars import SCALARS
from interpql.settings import Settings


class InterpqlSchema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # Replaces strawberry's default, which logs every client mistake with a traceback.
        add_codes(errors)


def build_schema(settings: Settings | None = None) -> strawberry.Schema:
    settings = settings or Settings()
    return InterpqlSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=[InferenceResult],
        config=StrawberryConfig(auto_camel_case=True, scalar_map=SCALARS),
        # Factories: strawberry builds fresh extension instances for each request.
        extensions=[
            MaskInternalErrors,
            lambda: MaxTokensLimiter(max_token_count=settings.max_query_tokens),
            lambda: QueryDepthLimiter(max_depth=settings.max_query_depth),
            lambda: MaxAliasesLimiter(max_alias_count=settings.max_aliases),
            lambda: ParserCache(maxsize=256),
            lambda: ValidationCache(maxsize=256),
        ],
    )
