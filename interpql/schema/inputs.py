"""Input types."""

from __future__ import annotations

import strawberry


@strawberry.input(description="Set a node's activation to a value while the model runs.")
class AblationInput:
    node_id: strawberry.ID = strawberry.field(description="The node (same model).")
    value: float = strawberry.field(
        default=0.0,
        description=(
            "The value to set. For an attention head its output vector (z) is set, so 0 "
            "removes what the head writes."
        ),
    )
    token_index: int | None = strawberry.field(
        default=None, description="The token to ablate at; null ablates at every token."
    )


@strawberry.input(description="What to run the model on, and what to change while it runs.")
class InferenceInput:
    prompt: str = strawberry.field(description="The text to run; at most the model's nCtx tokens.")
    ablations: list[AblationInput] = strawberry.field(
        default_factory=list, description="Activations to overwrite, applied together."
    )
    autoencoder_error_term: bool = strawberry.field(
        default=True,
        description=(
            "Where autoencoder latents are used, keep the autoencoder's error term so that "
            "untouched latents leave the model exactly as it was; false runs the model on the "
            "reconstruction alone."
        ),
    )
