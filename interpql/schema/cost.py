"""An operation's estimated cost, computed from its document before anything runs.

Depth, alias and token limits bound the shape of a query but not its work: one `inferBatch`
of 64 long prompts is a small document. The estimate counts both kinds of work in one unit:

- every field selected costs 1, times how many times it is resolved: a list field's children
  count once per item, the item count read from its size argument (`first`, `k`) or its list
  argument (`ids`, `nodeIds`, `inputs`, `representations`), else from its parent's size
  argument (`topNodes(k) { top }`), else `UNKNOWN_LIST_SIZE`;
- every prompt token a forward pass runs costs 1, and 3 when the pass also runs backward (a
  trace, a ranking by DIRECT_EFFECT or ACT_TIMES_GRAD, a node table); tokens are counted by
  the served models' tokenizers (a length estimate undercounts text that tokenizes densely, such as
  Chinese or indented code, several times over), at most the longest context window served (a
  longer prompt is refused as PROMPT_TOO_LONG without running);
- generation runs one pass per new token (twice when steered): the prompt, then one token a
  step where every served backend keeps a key-value cache, else the whole sequence so far.

Introspection fields count 1 each and are not multiplied: their size is the schema's, bounded
by the depth limit. The numbers are estimates, meant to be compared with a limit, not billed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLField,
    GraphQLInterfaceType,
    GraphQLList,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    NamedTypeNode,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableNode,
    get_named_type,
    get_nullable_type,
)
from graphql.execution.values import VariableValues, get_argument_values, get_variable_values

from interpql.resolvers.attribution_graph import MAX_LOGITS

UNKNOWN_LIST_SIZE = 10
BACKWARD_FACTOR = 3
DEFAULT_NEW_TOKENS = 20  # GenerateInput.maxTokens when not given
# An attribution graph: one backward pass over the prompt per batch of this many targets, and
# (before it runs, when maxFeatureNodes is not given) this many active latents per token.
GRAPH_TARGETS_PER_PASS = 32
GRAPH_LATENTS_PER_TOKEN = 40
_SIZE_ARGUMENTS = ("first", "k")
_LIST_ARGUMENTS = ("ids", "nodeIds", "inputs", "representations")
_GRADIENT_GROUPS = frozenset({"DIRECT_EFFECT", "ACT_TIMES_GRAD"})
# Fields that always add a backward pass to their input's.
_GRADIENT_FIELDS = frozenset({"nodeTable", "directEffectTerms"})
# Items below a field per unit of its size argument: the node table's rows are a k highest
# and k lowest per group (4) and kind (3).
_ITEMS_PER_SIZE = {"nodeTable": 24}


# A prompt's tokens as the model will run them, at most the longest context window served.
TokenCounter = Callable[[str], int]


class CostEstimator:
    def __init__(
        self,
        schema: GraphQLSchema,
        fragments: Mapping[str, FragmentDefinitionNode],
        variables: VariableValues,
        count_tokens: TokenCounter,
        generation_caches: bool = False,
    ) -> None:
        self._count_tokens = count_tokens
        self._generation_caches = generation_caches
        self._schema = schema
        self._fragments = fragments
        self._variables = variables

    def operation(self, operation: OperationDefinitionNode) -> int:
        root = self._schema.get_root_type(operation.operation)
        if root is None:
            return 0
        return self._selection(root, operation.selection_set, UNKNOWN_LIST_SIZE)

    def _selection(
        self, parent: GraphQLNamedType, selection_set: SelectionSetNode, list_size: int
    ) -> int:
        """`list_size`: how long lists directly below are when they have no size of their own
        (a parent's `k`, as in topNodes(k) { top { ... } })."""
        fields = self._fields(parent, selection_set, frozenset())
        return sum(self._field(owner, field, list_size) for owner, field in fields)

    def _fields(
        self, parent: GraphQLNamedType, selection_set: SelectionSetNode, seen: frozenset[str]
    ) -> list[tuple[GraphQLObjectType | GraphQLInterfaceType, FieldNode]]:
        """The fields selected, with the object type each is selected on: through fragments,
        whose type conditions narrow unions and interfaces (each fragment spread once per
        path, so a cycle that validation would reject cannot loop here either)."""
        fields: list[tuple[GraphQLObjectType | GraphQLInterfaceType, FieldNode]] = []
        condition: NamedTypeNode | None
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                if isinstance(parent, (GraphQLObjectType, GraphQLInterfaceType)):
                    fields.append((parent, selection))
                continue
            if isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                fragment = self._fragments.get(name)
                if fragment is None or name in seen:
                    continue
                seen = seen | {name}
                condition, inner = fragment.type_condition, fragment.selection_set
            elif isinstance(selection, InlineFragmentNode):
                condition, inner = selection.type_condition, selection.selection_set
            else:
                continue
            narrowed = parent
            if condition is not None:
                narrowed = self._schema.get_type(condition.name.value) or parent
            fields += self._fields(narrowed, inner, seen)
        return fields

    def _field(
        self, parent: GraphQLObjectType | GraphQLInterfaceType, node: FieldNode, list_size: int
    ) -> int:
        name = node.name.value
        if name.startswith("__"):
            return 1
        definition = parent.fields.get(name)
        if definition is None:
            return 1
        arguments = self._arguments(definition, node)
        cost = 1 + self._inference(name, arguments, node)
        if node.selection_set is None:
            return cost
        size = _size(arguments)
        if isinstance(get_nullable_type(definition.type), GraphQLList):  # type: ignore[arg-type]
            items = size if size is not None else list_size
            below = UNKNOWN_LIST_SIZE
        else:
            items = 1
            below = UNKNOWN_LIST_SIZE if size is None else size * _ITEMS_PER_SIZE.get(name, 1)
        return cost + items * self._selection(
            get_named_type(definition.type), node.selection_set, below
        )

    def _arguments(self, definition: GraphQLField, node: FieldNode) -> dict[str, Any]:
        try:
            return get_argument_values(definition, node, self._variables)
        except Exception:  # a bad argument: execution reports it; it costs nothing here
            return {}

    def _inference(self, name: str, arguments: dict[str, Any], node: FieldNode) -> int:
        inputs: list[Any] = []
        if name == "infer":
            inputs = [arguments.get("input")]
        elif name == "inferBatch":
            inputs = list(arguments.get("inputs") or [])
        elif name == "activations" and isinstance(arguments.get("prompt"), str):
            return self._count_tokens(arguments["prompt"])
        elif name == "generate":
            return self._generation(arguments.get("input"))
        elif name == "attributionGraph" and "input" in arguments:
            return self._graph(arguments["input"])
        else:
            return 0
        backward = node.selection_set is not None and self._asks_gradients(node.selection_set)
        total = 0
        for item in inputs:
            prompt = _input_field(item, "prompt", "prompt")
            if isinstance(prompt, str):
                traced = _input_field(item, "trace", "trace") is not None
                factor = BACKWARD_FACTOR if backward or traced else 1
                total += factor * self._count_tokens(prompt)
        return total

    def _graph(self, spec: Any) -> int:
        """Backward passes over the prompt, one per batch of targets (latents and logits)."""
        prompt_text = _input_field(spec, "prompt", "prompt")
        if not isinstance(prompt_text, str):
            return 0
        tokens = self._count_tokens(prompt_text) + 1  # the beginning-of-sequence token
        # A cap bounds the latents traced, which the active ones bound too; a value out of its
        # argument's range is priced at the range's end, so that the resolver's message naming
        # the argument is what the caller reads, not this estimate's.
        active = GRAPH_LATENTS_PER_TOKEN * tokens
        cap = _input_field(spec, "maxFeatureNodes", "max_feature_nodes")
        latents = min(cap, active) if isinstance(cap, int) else active
        logits = _input_field(spec, "maxLogits", "max_logits")
        logits = min(logits, MAX_LOGITS) if isinstance(logits, int) else 10
        targets = max(0, latents) + max(0, logits)
        passes = 1 + -(-targets // GRAPH_TARGETS_PER_PASS)
        return BACKWARD_FACTOR * tokens * passes

    def _generation(self, spec: Any) -> int:
        prompt_text = _input_field(spec, "prompt", "prompt")
        if not isinstance(prompt_text, str):
            return 0
        prompt = self._count_tokens(prompt_text)
        max_tokens = _input_field(spec, "maxTokens", "max_tokens")
        steps = max(0, max_tokens) if isinstance(max_tokens, int) else DEFAULT_NEW_TOKENS
        rows = 2 if _input_field(spec, "steering", "steering") else 1
        if steps == 0:
            return 0
        if self._generation_caches:  # the prompt, then each step the token made before it
            return rows * (prompt + steps - 1)
        # Step s runs the prompt plus the s tokens made so far.
        return rows * (steps * prompt + steps * (steps - 1) // 2)

    def _group(self, node: FieldNode) -> Any:
        return _argument(self._variables, node, "group")

    def _asks_gradients(self, selection_set: SelectionSetNode) -> bool:
        """Whether a ranking by a gradient-based group is selected anywhere below."""
        stack, seen = [selection_set], set()
        while stack:
            for selection in stack.pop().selections:
                if isinstance(selection, FragmentSpreadNode):
                    name = selection.name.value
                    fragment = self._fragments.get(name)
                    if fragment is not None and name not in seen:
                        seen.add(name)
                        stack.append(fragment.selection_set)
                    continue
                if isinstance(selection, FieldNode) and selection.name.value in _GRADIENT_FIELDS:
                    return True
                if isinstance(selection, FieldNode) and selection.name.value == "topNodes":
                    group = self._group(selection)
                    if getattr(group, "name", group) in _GRADIENT_GROUPS:
                        return True
                selections = getattr(selection, "selection_set", None)
                if selections is not None:
                    stack.append(selections)
        return False


def _size(arguments: dict[str, Any]) -> int | None:
    for name in _SIZE_ARGUMENTS:
        if isinstance(arguments.get(name), int):
            return max(0, int(arguments[name]))
    for name in _LIST_ARGUMENTS:
        if isinstance(arguments.get(name), list):
            return len(arguments[name])
    return None


def _argument(variables: VariableValues, node: FieldNode, name: str) -> Any:
    for argument in node.arguments or ():
        if argument.name.value != name:
            continue
        value: Any = argument.value
        if isinstance(value, VariableNode):
            return variables.coerced.get(value.name.value)
        return getattr(value, "value", None)
    return None


def _input_field(value: Any, graphql_name: str, python_name: str) -> Any:
    """A field of an input object: a dict from JSON variables, or the strawberry input a
    literal in the document was coerced to."""
    if isinstance(value, Mapping):
        return value.get(graphql_name)
    return getattr(value, python_name, None)


def estimate_cost(
    schema: GraphQLSchema,
    operation: OperationDefinitionNode,
    fragments: Mapping[str, FragmentDefinitionNode],
    variables: dict[str, Any],
    count_tokens: TokenCounter,
    generation_caches: bool = False,
) -> int:
    """The cost of `operation` with its (JSON) variables; 0 when they do not coerce to their
    types (execution then answers BAD_USER_INPUT and runs nothing). `generation_caches`:
    whether every served backend keeps a key-value cache while generating."""
    coerced = get_variable_values(schema, operation.variable_definitions or (), variables)
    if isinstance(coerced, list):
        return 0
    estimator = CostEstimator(schema, fragments, coerced, count_tokens, generation_caches)
    return estimator.operation(operation)
