"""Transformer Debugger's node table, and the direct-effect terms besides the nodes."""

from __future__ import annotations

import strawberry

from interpql.resolvers import node_table as table_resolvers
from interpql.resolvers.models import token_text
from interpql.schema.scalars import FloatArray, IntArray, StringArray
from interpql.schema.types import Info, Node, Token, TokenScore
from interpql.specs import NodeRef


@strawberry.type(
    description=(
        "One element of the node table: a (token, node) pair, or an attention head's (query "
        "token, key token, head) triple, with its value in every group as Transformer "
        "Debugger defines it per element."
    )
)
class NodeTableRow:
    view: strawberry.Private[table_resolvers.TableView]
    row: strawberry.Private[int]
    node: Node = strawberry.field(description="The node (for a head pair: the head).")
    token_index: int = strawberry.field(
        description="The token: where the element is (a head pair's query token)."
    )
    key_token_index: int | None = strawberry.field(
        description="A head pair's key token (the attended-to token); null for other kinds."
    )
    activation: float = strawberry.field(
        description=(
            "ACTIVATION: an MLP neuron's post-activation, a latent's value, a head pair's "
            "attention probability, 1 for the embedding."
        )
    )
    write_norm: float = strawberry.field(
        description=(
            "WRITE_NORM: the norm of the element's write to the residual stream, biases aside; "
            "an MLP neuron's is signed (post-activation x |W_out row|), as Transformer "
            "Debugger's table has it; a head pair's is |p v_k W_O| (v with its bias)."
        )
    )
    direct_effect: float = strawberry.field(
        description=(
            "DIRECT_EFFECT: that write projected on the loss's gradient at the final residual "
            "stream, at the element's (query) token, under the input's layerNormScale."
        )
    )
    act_times_grad: float = strawberry.field(
        description=(
            "ACT_TIMES_GRAD: activation x the loss's gradient with respect to it (a head pair: "
            "p x dL/dp; the embedding: its write . dL/dwrite, Transformer Debugger's token "
            "attribution)."
        )
    )

    async def _tokens(self, info: Info) -> table_resolvers.RowTokens:
        return await self.view.tokens(self.row)

    def _scored(self, info: Info, items: list[tuple[int, float]]) -> list[TokenScore]:
        model = self.view.spec.model
        return [
            TokenScore(token=Token.at(info.context, model, rank, t), value=v)
            for rank, (t, v) in enumerate(items)
        ]

    @strawberry.field(
        description=(
            "Output tokens the element's write raises most: w @ (W_U x the final LayerNorm's "
            "gain), less its mean over the vocabulary (Transformer Debugger's; the activation's "
            "sign and size kept)."
        )
    )
    async def upvoted_output_tokens(self, info: Info) -> list[TokenScore]:
        return self._scored(info, (await self._tokens(info)).upvoted_output)

    @strawberry.field(description="Output tokens it lowers most, lowest first.")
    async def downvoted_output_tokens(self, info: Info) -> list[TokenScore]:
        return self._scored(info, (await self._tokens(info)).downvoted_output)

    @strawberry.field(
        description=(
            "MLP neurons: input tokens whose embeddings raise the neuron's pre-activation most, "
            "W_E @ (1/s) P(gain_2 x W_in[:, n]), s the LayerNorm's scale at the row's token "
            "and P the mean's removal (Transformer Debugger's); null for other kinds, and for "
            "a gated MLP's neurons (act(x . gate) * (x . up) reads no one direction)."
        )
    )
    async def upvoting_input_tokens(self, info: Info) -> list[TokenScore] | None:
        found = (await self._tokens(info)).upvoting_input
        return None if found is None else self._scored(info, found)

    @strawberry.field(
        description=(
            "Attention-dictionary latents: the 3 key tokens whose attention writes drive the "
            "latent most, (sum over heads of p v_k W_O) . its encoder row, while the latent is "
            "active; null for other kinds (a head pair's key is keyTokenIndex)."
        )
    )
    async def attended_to_tokens(self, info: Info) -> list[TokenAttribution] | None:
        found = (await self._tokens(info)).attended_to
        if found is None:
            return None
        return [TokenAttribution(token_index=k, value=v) for k, v in found]


@strawberry.type(description="A prompt token with an attribution.")
class TokenAttribution:
    token_index: int = strawberry.field(description="The token's position in the prompt.")
    value: float = strawberry.field(description="Its attribution.")


@strawberry.type(
    description=(
        "ACT_TIMES_GRAD per prompt token, summed over every layer: Transformer Debugger's token "
        "display, always of MLP neurons and attention heads."
    )
)
class TokenDisplaySums:
    embedding: list[float] = strawberry.field(description="The embedding's token attribution.")
    mlp: list[float] = strawberry.field(description="Over every MLP neuron at the token.")
    attention_from: list[float] = strawberry.field(
        description="Over every head pair with the token as query."
    )
    attention_to: list[float] = strawberry.field(
        description="Over every head pair with the token as key."
    )


@strawberry.type(
    description=(
        "Scored tokens of every row as columns, [row][rank]; an empty list for a row that has "
        "none (upvoting input tokens: MLP neurons only)."
    )
)
class TokenColumns:
    ids: IntArray = strawberry.field(description="Token ids.")
    texts: StringArray = strawberry.field(description="Their texts.")
    values: FloatArray = strawberry.field(description="Their scores.")


@strawberry.type(
    description=(
        "The attended-to tokens of every row as columns, [row][rank]: empty except for "
        "attention-dictionary latents (see NodeTableRow.attendedToTokens)."
    )
)
class AttributionColumns:
    token_index: IntArray = strawberry.field(description="Prompt positions.")
    values: FloatArray = strawberry.field(description="Their attributions.")


@strawberry.type(
    description=(
        "The table's rows as columns, one entry per row in the rows' order, each column one "
        "JSON array: the same content as `rows` at a fraction of its cost (graphql-core visits "
        "every field of every row; a column is one value). Scored-token columns are computed "
        "only when selected."
    )
)
class NodeTableColumns:
    view: strawberry.Private[table_resolvers.TableView]
    node_ids: StringArray = strawberry.field(description="Each row's node id (heads: the head).")
    token_index: IntArray = strawberry.field(description="NodeTableRow.tokenIndex.")
    key_token_index: IntArray = strawberry.field(
        description="NodeTableRow.keyTokenIndex (null but for head pairs)."
    )
    activation: FloatArray = strawberry.field(description="NodeTableRow.activation.")
    write_norm: FloatArray = strawberry.field(description="NodeTableRow.writeNorm.")
    direct_effect: FloatArray = strawberry.field(description="NodeTableRow.directEffect.")
    act_times_grad: FloatArray = strawberry.field(description="NodeTableRow.actTimesGrad.")

    async def _lists(self, info: Info, name: str) -> TokenColumns:
        model = self.view.spec.model
        lists = [getattr(t, name) or [] for t in await self.view.all_tokens()]
        return TokenColumns(
            ids=IntArray([[t for t, _ in items] for items in lists]),
            texts=StringArray(
                [[token_text(info.context, model, t) for t, _ in items] for items in lists]
            ),
            values=FloatArray([[v for _, v in items] for items in lists]),
        )

    @strawberry.field(description="NodeTableRow.upvotedOutputTokens of every row.")
    async def upvoted_output_tokens(self, info: Info) -> TokenColumns:
        return await self._lists(info, "upvoted_output")

    @strawberry.field(description="NodeTableRow.downvotedOutputTokens of every row.")
    async def downvoted_output_tokens(self, info: Info) -> TokenColumns:
        return await self._lists(info, "downvoted_output")

    @strawberry.field(description="NodeTableRow.upvotingInputTokens of every row.")
    async def upvoting_input_tokens(self, info: Info) -> TokenColumns:
        return await self._lists(info, "upvoting_input")

    @strawberry.field(description="NodeTableRow.attendedToTokens of every row.")
    async def attended_to_tokens(self, info: Info) -> AttributionColumns:
        lists = [t.attended_to or [] for t in await self.view.all_tokens()]
        return AttributionColumns(
            token_index=IntArray([[k for k, _ in items] for items in lists]),
            values=FloatArray([[v for _, v in items] for items in lists]),
        )


@strawberry.type(
    description=(
        "Transformer Debugger's node table. For each group (WRITE_NORM, ACT_TIMES_GRAD, "
        "DIRECT_EFFECT, ACTIVATION, that order) and each kind (the embedding, the input's MLP "
        "kind, its attention kind, each ranked only against itself), the k highest and k "
        "lowest elements over every layer and token; rows are their union in that order. "
        "Unlike Transformer Debugger, masked future key tokens are not elements (their "
        "probability is 0) and ties are broken by element order."
    )
)
class NodeTable:
    rows: list[NodeTableRow] = strawberry.field(description="The table's elements.")
    columns: NodeTableColumns = strawberry.field(
        description="The same rows as columns: one JSON array per field (the fast form)."
    )
    token_sums: TokenDisplaySums = strawberry.field(description="The token display's sums.")


def node_table_of(view: table_resolvers.TableView) -> NodeTable:
    rows = []
    for i, row in enumerate(view.table.rows):
        e = row.element
        rows.append(
            NodeTableRow(
                view=view,
                row=i,
                node=Node(ref=NodeRef(view.spec.model, e.kind, e.layer, e.index)),
                token_index=e.position,
                key_token_index=e.key_position,
                activation=row.values["activation"],
                write_norm=row.values["write_norm"],
                direct_effect=row.values["direct_effect"],
                act_times_grad=row.values["act_times_grad"],
            )
        )
    elements = [row.element for row in view.table.rows]
    columns = NodeTableColumns(
        view=view,
        node_ids=StringArray([r.node.ref.id for r in rows]),
        token_index=IntArray([e.position for e in elements]),
        key_token_index=IntArray([e.key_position for e in elements]),
        **{
            field: FloatArray([row.values[group] for row in view.table.rows])
            for field, group in (
                ("activation", "activation"),
                ("write_norm", "write_norm"),
                ("direct_effect", "direct_effect"),
                ("act_times_grad", "act_times_grad"),
            )
        },
    )
    sums = view.table.token_sums
    return NodeTable(
        rows=rows,
        columns=columns,
        token_sums=TokenDisplaySums(
            embedding=sums.embedding,
            mlp=sums.mlp,
            attention_from=sums.attention_from,
            attention_to=sums.attention_to,
        ),
    )


@strawberry.type(
    description=(
        "The direct effect of something that writes to the residual stream besides the nodes."
    )
)
class DirectEffectTerm:
    name: str = strawberry.field(
        description=(
            "What writes: 'attention output bias', 'MLP output bias', 'dictionary bias', "
            "'dictionary error' (what a dictionary misses of its input), or 'final LayerNorm "
            "bias' (b . W_U dL/dlogits: its share of the loss through the logits)."
        )
    )
    layer_index: int | None = strawberry.field(
        description="Its layer (null for the final LayerNorm)."
    )
    value: float = strawberry.field(description="Its direct effect.")
    residual: bool = strawberry.field(
        description="True for the bias and error of the input's residualDictionary: with its "
        "latents a decomposition of the stream at their hook, not a write to it, so not part "
        "of the sum that equals the objective."
    )
