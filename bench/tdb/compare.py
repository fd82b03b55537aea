"""Compares interpql's node table with Transformer Debugger's own answer (run_tdb.py's output)
for the same model folder, prompt, target and distractor.

Elements are matched by (kind, layer, token[, key], index). Rows only one server has must be
picks among ties: a masked future key position (Transformer Debugger's lowest probabilities,
exact zeros, which interpql does not rank), or an element whose value in some group equals the
k-th highest or lowest of its kind there (probabilities of 1 at the first token, the embedding's
constant 1, neurons at GELU's minimum, direct effects of 0 before the last token).
`*_unexplained` counts the rest, which should be none; everything both have must agree.
"""

from __future__ import annotations

from typing import Any

# interpql's field for each of Transformer Debugger's group ids.
GROUPS = {
    "activation": "activation",
    "write_norm": "writeNorm",
    "direction_write": "directEffect",
    "act_times_grad": "actTimesGrad",
}


def tdb_element(node: dict[str, Any]) -> tuple[Any, ...]:
    """interpql's (kind, layer, token, key, index) of one of Transformer Debugger's nodes."""
    kind, layer, indices = node["nodeType"], node["layerIndex"], node["tensorIndices"]
    if kind == "layer":  # its embedding nodes
        return ("token_embedding", 0, indices[0], None, 0)
    if kind == "attention_head":
        query, key, head = indices
        return ("attention_head", layer, query, key, head)
    return (kind, layer, indices[0], None, indices[1])


def our_element(row: dict[str, Any]) -> tuple[Any, ...]:
    _, kind, layer, index = row["node"]["id"].split("/")
    return (kind, int(layer), row["tokenIndex"], row["keyTokenIndex"], int(index))


def compare(
    ours: dict[str, Any], tdb: dict[str, Any], token_text: dict[int, str], k: int = 10
) -> dict[str, Any]:
    """`ours`: the `infer` answer (nodeTable(k) with rows' tokens, tokenSums, objective);
    `tdb`: run_tdb.py's JSON; `token_text`: our token ids' strings as TDB decodes them."""
    flat = tdb["flat"]
    table = ours["nodeTable"]
    rows = {our_element(r): r for r in table["rows"]}
    theirs = {tdb_element(n): n for n in flat["nodes"]}
    differences = {group: 0.0 for group in GROUPS}
    for element in rows.keys() & theirs.keys():
        for group, field in GROUPS.items():
            gap = abs(rows[element][field] - theirs[element]["values"][group])
            differences[group] = max(differences[group], gap)
    only_theirs, only_ours = theirs.keys() - rows.keys(), rows.keys() - theirs.keys()
    masked = {e for e in only_theirs if e[0] == "attention_head" and e[3] > e[2]}

    # Each group's k-th highest and k-th lowest value per kind: interpql's rows hold every
    # kind's k highest and k lowest of each group, so these are the true edges.
    edges: dict[tuple[str, str], tuple[float, float]] = {}
    for kind in {e[0] for e in rows}:
        for group, field in GROUPS.items():
            ranked = sorted(rows[e][field] for e in rows if e[0] == kind)
            edge = min(k, len(ranked))
            edges[(kind, group)] = (ranked[-edge], ranked[edge - 1])

    def at_an_edge(element: tuple[Any, ...], values: dict[str, float]) -> bool:
        """Whether the element ties the edge of a list it could have been picked for."""
        return any(
            abs(values[group] - edge) <= 1e-6 * max(1.0, abs(edge))
            for group in GROUPS
            for edge in edges.get((element[0], group), ())
        )

    tdb_unexplained = [e for e in only_theirs - masked if not at_an_edge(e, theirs[e]["values"])]
    # Where Transformer Debugger picked masked pairs, interpql has the lowest real ones.
    ours_unexplained = [
        e
        for e in only_ours
        if not (e[0] == "attention_head" and masked)
        and not at_an_edge(e, {g: rows[e][f] for g, f in GROUPS.items()})
    ]
    token_gaps = _token_lists(rows, theirs, token_text)
    sums = flat["tokenSums"]["act_times_grad"]
    expected_sums = {
        "embedding": sums["token_attribution"],
        "mlp": sums["mlp_act_times_grad"],
        "attentionFrom": [sum(row) for row in sums["unflattened_attn_act_times_grad"]],
        "attentionTo": [
            sum(col) for col in zip(*sums["unflattened_attn_act_times_grad"], strict=True)
        ],
    }
    sum_gap = max(
        abs(a - b)
        for name, values in expected_sums.items()
        for a, b in zip(table["tokenSums"][name], values, strict=True)
    )
    return {
        "objective_gap": abs(ours["objective"] - flat["loss"]),
        "tdb_rows": len(theirs),
        "our_rows": len(rows),
        "common_rows": len(rows.keys() & theirs.keys()),
        "tdb_only_rows": len(only_theirs),
        "tdb_only_masked_pairs": len(masked),
        "tdb_only_unexplained": len(tdb_unexplained),
        "our_only_rows": len(only_ours),
        "our_only_unexplained": len(ours_unexplained),
        "max_value_gap": differences,
        "token_sums_max_gap": sum_gap,
        **token_gaps,
    }


def _token_lists(
    rows: dict[tuple[Any, ...], dict[str, Any]],
    theirs: dict[tuple[Any, ...], dict[str, Any]],
    token_text: dict[int, str],
) -> dict[str, Any]:
    """Upvoted and downvoted output tokens of the rows both have: the same tokens in the same
    order, and the largest value gap."""
    same, compared, gap = 0, 0, 0.0
    for element in rows.keys() & theirs.keys():
        mine, tdb = rows[element], theirs[element]["upvotedOutputTokens"]
        if tdb is None or mine.get("upvotedOutputTokens") is None:
            continue
        for ours_field, tdb_field in (
            ("upvotedOutputTokens", "top"),
            ("downvotedOutputTokens", "bottom"),
        ):
            texts = [token_text[t["token"]["id"]] for t in mine[ours_field]]
            compared += 1
            same += texts == [t["token"] for t in tdb[tdb_field]]
            for a, b in zip(mine[ours_field], tdb[tdb_field], strict=False):
                gap = max(gap, abs(a["value"] - b["scalar"]))
    return {
        "scored_token_lists_compared": compared,
        "scored_token_lists_identical": same,
        "scored_token_max_gap": gap,
    }
