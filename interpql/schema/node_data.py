"""Types of what is known about a node: examples, statistics, explanations."""

from __future__ import annotations

from collections.abc import Sequence

import strawberry

from interpql.resolvers.node_data import Example, Examples, ExplanationData, Statistics
from interpql.schema.execution import direct
from interpql.schema.scalars import FloatArray, StringArray


# The fields clients ask of thousands of examples and explanations at once are plain values
# (strawberry reads them without a resolver call each); the rarer ones are computed on demand.
@strawberry.type(description="A dataset example: a window of tokens with the node's activations.")
class ActivationRecord:
    tokens: StringArray = strawberry.field(description="The window's tokens, as text.")
    token_ids: Sequence[int] | None = strawberry.field(
        description="The window's token ids; null where the source keeps only the text."
    )
    activations: FloatArray = strawberry.field(
        description="The node's activation at each token (a list of floats)."
    )
    source: str = strawberry.field(description="The source (dataset) this example comes from.")
    example: strawberry.Private[Example]
    shown: strawberry.Private[Examples]  # the node's examples this one is shown with

    @classmethod
    def all_of(cls, shown: Examples) -> list[ActivationRecord]:
        return [
            cls(
                tokens=StringArray(e.tokens),
                token_ids=e.token_ids,  # a tuple: graphql-core takes any sequence for a list
                activations=FloatArray(e.activations),
                source=shown.source,
                example=e,
                shown=shown,
            )
            for e in shown.examples
        ]

    @strawberry.field(
        description=(
            "Activations on OpenAI's 0-10 scale (integers), relative to the node's top activation."
        )
    )
    @direct
    def normalized_activations(self) -> FloatArray:
        return FloatArray(self.shown.normalized(self.example.activations))

    @strawberry.field(description="The largest activation in this window.")
    @direct
    def max_activation(self) -> float:
        return self.example.max_activation


@strawberry.type(description="Statistics of a node's activation over a dataset's tokens.")
class NodeStatistics:
    data: strawberry.Private[Statistics]

    @strawberry.field(description="The largest activation.")
    @direct
    def max(self) -> float:
        return self.data.max

    @strawberry.field(description="Mean over all tokens.")
    @direct
    def mean(self) -> float | None:
        return self.data.mean

    @strawberry.field(description="Population variance over all tokens.")
    @direct
    def variance(self) -> float | None:
        return self.data.variance

    @strawberry.field(description="Skewness (null for a constant node).")
    @direct
    def skewness(self) -> float | None:
        return self.data.skewness

    @strawberry.field(description="Excess kurtosis (null for a constant node).")
    @direct
    def kurtosis(self) -> float | None:
        return self.data.kurtosis

    @strawberry.field(description="Share of tokens where the activation is above 0.")
    @direct
    def density(self) -> float | None:
        return self.data.density

    @strawberry.field(
        description="Boundaries of the quantile buckets of window peaks (0.5, 0.9, 0.99, 0.999)."
    )
    @direct
    def quantile_boundaries(self) -> list[float]:
        return list(self.data.quantile_boundaries)


@strawberry.type(description="A natural-language explanation of what a node does, and its score.")
class Explanation:
    text: str = strawberry.field(description="The explanation.")
    score: float | None = strawberry.field(
        description="Correlation between simulated and true activations on held-out examples."
    )
    scorer: str = strawberry.field(description="The simulator that scored it.")
    explainer_model: str = strawberry.field(
        description="The explainer (model or method) that wrote it."
    )
    source: str = strawberry.field(description="The source it was read from.")
    created: str | None = strawberry.field(
        description="When it was written (ISO 8601), where known."
    )

    @classmethod
    def of(cls, data: ExplanationData) -> Explanation:
        return cls(
            text=data.text,
            score=data.score,
            scorer=data.scorer,
            explainer_model=data.explainer,
            source=data.source,
            created=data.created,
        )
