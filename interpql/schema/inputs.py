"""Input types."""

from __future__ import annotations

import strawberry


@strawberry.input(description="What to run the model on.")
class InferenceInput:
    prompt: str = strawberry.field(description="The text to run; at most the model's nCtx tokens.")
