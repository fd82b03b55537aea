"""Attribution graphs: exact against an independent linearised replacement model (float64,
tests/linearised_reference.py), edges against finite differences there, pruning against a
brute-force computation, and the API: the query, its JSON (file and URL), interventions,
streaming, typed errors, on both backends."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from interpql.backends.base import Backend, ForwardRequest
from interpql.backends.circuits import pruning
from interpql.backends.circuits.attribution import GraphParams, RawGraph, attribute
from interpql.backends.circuits.linearised import linearise, transcoders_of
from interpql.backends.dictionaries.saelens import saelens_config, write_saelens
from interpql.backends.gpt2 import GPT2Config, NativeGPT2Backend
from interpql.backends.gpt2.loading import build_model
from interpql.backends.tokenizer import gpt2_encoding
from interpql.bootstrap import ServeOptions, build_services
from interpql.demo.artifacts import DEMO_DIR, load_demo_dictionaries, load_demo_model
from interpql.loaders.models import attach_dictionaries
from interpql.resolvers.context import RequestContext
from interpql.schema.build import build_schema
from interpql.server import create_app
from interpql.settings import Settings
from tests.conftest import SMALL, error_codes, graphql, serve_entries
from tests.linearised_reference import LinearisedReference
from tests.reference import reference_forward
from tests.test_dictionary_attachment import BACKENDS, entry_of, state

DEMO = "tiny-stdlib"
PROMPT = "import os\nimport sys\nimport"
CODE = 'def read_config(path):\n    """Read a config file."""\n    with open(path) as handle:\n'


# --- exactness against the independent reference ------------------------------------------


def demo_backend() -> tuple[NativeGPT2Backend, GPT2Config, dict[str, torch.Tensor]]:
    cfg, weights = load_demo_model()
    backend = NativeGPT2Backend(build_model(cfg, weights))
    for (name, layer), (dictionary, input, output) in load_demo_dictionaries().items():
        if name == "transcoder":
            backend.attach_dictionary(name, layer, dictionary, input, output)
    return backend, cfg, weights


def demo_transcoders(cfg: GPT2Config) -> dict[int, dict[str, torch.Tensor]]:
    folder = DEMO_DIR / "dictionaries" / "transcoder"
    return {
        layer: load_file(folder / f"layer_{layer}" / "sae_weights.safetensors")
        for layer in range(cfg.n_layers)
    }


def random_setup(
    tmp_path: Path, backend_name: str
) -> tuple[Backend, GPT2Config, dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    weights = state()
    written = random_transcoders(tmp_path / "tc")
    backend = BACKENDS[backend_name](weights)
    attach_dictionaries(entry_of(backend), "tc", str(tmp_path / "tc"))
    return backend, SMALL, weights, written


def random_transcoders(root: Path, d_sae: int = 32) -> dict[int, dict[str, torch.Tensor]]:
    """Skip transcoders of a trained one's proportions (sparse latents, small writes): random
    ones of unit scale make edges of thousands that cancel to values near 1."""
    d = SMALL.d_model
    written = {}
    for layer in range(SMALL.n_layers):
        g = torch.Generator().manual_seed(layer)
        tensors = {
            "W_enc": torch.randn(d, d_sae, generator=g) / d**0.5,
            "b_enc": torch.randn(d_sae, generator=g) * 0.2 - 0.3,
            "W_dec": torch.randn(d_sae, d, generator=g) * 0.1,
            "b_dec": torch.randn(d, generator=g) * 0.02,
            "W_skip": torch.randn(d, d, generator=g) * 0.02,
        }
        config = saelens_config(
            "skip_transcoder",
            d,
            d_sae,
            f"blocks.{layer}.mlp.hook_in",
            d_out=d,
            hook_name_out=f"blocks.{layer}.hook_mlp_out",
        )
        write_saelens(root / f"layer_{layer}", config, tensors)
        written[layer] = tensors
    return written


def source_of(raw: RawGraph, column: int) -> tuple[str, int, int, int]:
    """(kind, layer, position, index) of a matrix column."""
    n_positions = raw.n_positions
    if column < raw.n_features:
        layer, position, index = (int(v) for v in raw.features[column])
        return "latent", layer, position, index
    column -= raw.n_features
    if column < raw.n_layers * n_positions:
        return "error", column // n_positions, column % n_positions, -1
    return "embedding", 0, column - raw.n_layers * n_positions, -1


def target_value(raw: RawGraph, row: int, result: tuple[list[torch.Tensor], torch.Tensor]) -> float:
    pres, logits = result
    if row < raw.n_features:
        layer, position, index = (int(v) for v in raw.features[row])
        return float(pres[layer][position, index])
    return float(logits[raw.logit_tokens[row - raw.n_features]])


def check_exact(raw: RawGraph, ref: LinearisedReference) -> None:
    clean = ref.run(ref.clean)
    bias = ref.run(ref.clean.zeros())
    adjacency = raw.adjacency.double()
    worst = 0.0
    for row in range(adjacency.shape[0]):
        value = target_value(raw, row, clean)
        total = float(adjacency[row].sum()) + target_value(raw, row, bias)
        worst = max(worst, abs(total - value) / max(abs(value), 1.0))
    assert worst <= 1e-4


def check_edges_are_derivatives(raw: RawGraph, ref: LinearisedReference, samples: int) -> None:
    """Each sampled edge equals d(target)/d(alpha) with the source's value scaled by 1 + alpha,
    by central differences in the reference (exact up to rounding: the model is affine)."""
    rng = random.Random(0)
    rows, columns = raw.adjacency.nonzero(as_tuple=True)
    picked = rng.sample(range(len(rows)), min(samples, len(rows)))
    step = 1e-3
    for i in picked:
        row, column = int(rows[i]), int(columns[i])
        kind, layer, position, index = source_of(raw, column)
        up = target_value(
            raw, row, ref.run(ref.clean.scaled(kind, layer, position, index, 1 + step))
        )
        down = target_value(
            raw, row, ref.run(ref.clean.scaled(kind, layer, position, index, 1 - step))
        )
        derivative = (up - down) / (2 * step)
        weight = float(raw.adjacency[row, column])
        scale = float(raw.adjacency[row].abs().max())
        assert abs(derivative - weight) <= 1e-4 * scale + 1e-6, (kind, row, column)


def check_logits_reproduced(
    backend: Backend, raw_tokens: list[int], transcoders: Any, ref: LinearisedReference
) -> None:
    """The linearised pass (error nodes included) gives the model's own logits."""
    lin = linearise(backend, raw_tokens, transcoders)
    model = backend.forward(ForwardRequest(tokens=(tuple(raw_tokens),))).logits[0]
    scale = float(model.abs().max())
    assert float((lin.logits.detach() - model).abs().max()) <= 1e-5 * scale
    assert float((ref.clean_logits.float() - model).abs().max()) <= 1e-5 * scale


def active_set_agrees(raw: RawGraph, ref: LinearisedReference) -> None:
    ours = {tuple(int(v) for v in f) for f in raw.features}
    theirs = set()
    for layer, latents in enumerate(ref.clean.latents):
        for position, index in (latents > 1e-6).nonzero().tolist():
            theirs.add((layer, position, index))
    # Latents within rounding of 0 may fall either side.
    assert len(ours ^ theirs) <= 2


def test_exact_on_the_demo() -> None:
    backend, cfg, weights = demo_backend()
    tokens = [50256, *gpt2_encoding().encode(CODE)][:20]
    transcoders = transcoders_of(backend, "transcoder")
    raw = attribute(backend, tokens, transcoders, GraphParams())
    assert raw.n_features == raw.n_active > 100
    ref = LinearisedReference(cfg, weights, demo_transcoders(cfg), tokens)
    active_set_agrees(raw, ref)
    check_logits_reproduced(backend, tokens, transcoders, ref)
    check_exact(raw, ref)
    check_edges_are_derivatives(raw, ref, samples=25)


@pytest.mark.parametrize("backend_name", ["native", "transformerlens"])
def test_exact_on_a_random_model(tmp_path: Path, backend_name: str) -> None:
    backend, cfg, weights, tensors = random_setup(tmp_path, backend_name)
    tokens = [50256, 464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290]
    transcoders = transcoders_of(backend, "tc")
    raw = attribute(backend, tokens, transcoders, GraphParams(batch_size=7))
    ref = LinearisedReference(cfg, weights, tensors, tokens)
    active_set_agrees(raw, ref)
    check_logits_reproduced(backend, tokens, transcoders, ref)
    check_exact(raw, ref)
    check_edges_are_derivatives(raw, ref, samples=40)


def test_both_backends_give_the_same_graph(tmp_path: Path) -> None:
    tokens = [50256, 464, 2068, 7586, 21831, 18045, 625]
    graphs = []
    for name in ("native", "transformerlens"):
        backend, *_ = random_setup(tmp_path / name, name)
        graphs.append(attribute(backend, tokens, transcoders_of(backend, "tc"), GraphParams()))
    native, lens = graphs
    assert torch.equal(native.features, lens.features)
    assert native.logit_tokens == lens.logit_tokens
    assert torch.allclose(native.adjacency, lens.adjacency, atol=1e-5, rtol=1e-4)


async def test_other_weights_under_the_same_name_are_another_graph(tmp_path: Path) -> None:
    """A graph's id covers the weights: a model trained again (or other transcoders) under the
    same names never gets the stored graph of the old ones."""
    ids = []
    for variant in ("same", "same again", "retrained", "other transcoders"):
        weights = state()
        if variant == "retrained":
            weights["xf_layers.1.mlp.out_layer.weight"] += 1e-3
        root = tmp_path / variant.replace(" ", "-")
        random_transcoders(root, d_sae=32 if variant != "other transcoders" else 48)
        backend = BACKENDS["native"](weights)
        entry = entry_of(backend)
        attach_dictionaries(entry, "tc", str(root))
        body = await serve_entries(
            entry,
            query='{ model(name: "m") { attributionGraph(input: {prompt: "a b", '
            'dictionary: "tc"}) { id } } }',
        )
        assert "errors" not in body, body
        ids.append(body["data"]["model"]["attributionGraph"]["id"])
    same, again, retrained, other = ids
    assert same == again and len({same, retrained, other}) == 3


def test_feature_cap_selects_by_influence(tmp_path: Path) -> None:
    """With a cap, the chosen latents' rows are the full graph's rows for them, and the
    choice is the greedy one: each batch the highest estimated influence on the logits."""
    backend, *_ = random_setup(tmp_path, "native")
    tokens = [50256, 464, 2068, 7586, 21831, 18045, 625, 262]
    transcoders = transcoders_of(backend, "tc")
    full = attribute(backend, tokens, transcoders, GraphParams())
    capped = attribute(
        backend, tokens, transcoders, GraphParams(max_feature_nodes=12, batch_size=4)
    )
    assert capped.n_features == 12 and capped.n_active == full.n_active
    position = {tuple(f.tolist()): i for i, f in enumerate(full.features)}
    chosen = [position[tuple(f.tolist())] for f in capped.features]
    sources = torch.tensor(
        chosen + list(range(full.n_features, full.adjacency.shape[1])), dtype=torch.long
    )
    assert torch.allclose(capped.adjacency[:12], full.adjacency[chosen][:, sources], atol=1e-6)
    # The first batch is the 4 latents with the largest direct effect on the logits' mix.
    direct = pruning.column_influence(
        full.adjacency[full.n_features :], torch.arange(0), full.logit_probabilities
    )[: full.n_features]
    assert set(direct.topk(4).indices.tolist()) <= set(chosen)


def test_budget_and_bad_sets(tmp_path: Path) -> None:
    from interpql.errors import UnavailableError

    backend, *_ = random_setup(tmp_path, "native")
    with pytest.raises(UnavailableError) as found:
        attribute(
            backend,
            [50256, 464],
            transcoders_of(backend, "tc"),
            GraphParams(matrix_budget_bytes=10),
        )
    assert found.value.code == "RESOURCE_EXHAUSTED"


# --- pruning against brute force -------------------------------------------------------------


def layered_graph(seed: int) -> tuple[torch.Tensor, pruning.Layout, torch.Tensor]:
    """A random layered graph: 6 latents in 3 layers, 3 errors, 2 embeddings, 2 logits."""
    g = torch.Generator().manual_seed(seed)
    layout = pruning.Layout(n_features=6, n_errors=3, n_tokens=2, n_logits=2)
    layer_of = [0, 0, 1, 1, 2, 2]
    error_layer = [0, 1, 2]
    matrix = torch.zeros(layout.n_features + layout.n_logits, layout.n_sources)
    for row in range(matrix.shape[0]):
        target_layer = layer_of[row] if row < 6 else 3
        for column in range(layout.n_sources):
            if column < 6:
                allowed = layer_of[column] < target_layer
            elif column < 9:
                allowed = error_layer[column - 6] < target_layer
            else:
                allowed = True
            if allowed and torch.rand(1, generator=g) < 0.8:
                matrix[row, column] = torch.randn(1, generator=g)
    return matrix, layout, torch.tensor([0.7, 0.3])


def brute_influence(
    matrix: torch.Tensor, layout: pruning.Layout, weights: torch.Tensor
) -> np.ndarray:
    n = layout.n_nodes
    square = np.zeros((n, n))
    rows = layout.row_nodes().numpy()
    square[rows, : layout.n_sources] = matrix.double().numpy()
    square = np.abs(square)
    sums = square.sum(1, keepdims=True)
    normalized = np.divide(square, sums, out=np.zeros_like(square), where=sums > 0)
    w = np.zeros(n)
    w[layout.n_sources :] = weights.numpy()
    return w @ (np.linalg.inv(np.eye(n) - normalized) - np.eye(n))


def minimal_top_set(scores: np.ndarray, fraction: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    cumulative = np.cumsum(scores[order]) / scores.sum()
    count = int(np.searchsorted(cumulative, fraction - 1e-12)) + 1
    keep = np.zeros(len(scores), dtype=bool)
    keep[order[:count]] = True
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruning_keeps_the_stated_fractions(seed: int) -> None:
    matrix, layout, weights = layered_graph(seed)
    influence = brute_influence(matrix, layout, weights)
    result = pruning.prune(matrix, layout, weights, node_threshold=0.8, edge_threshold=0.9)
    assert np.allclose(result.influence.numpy(), influence, atol=1e-9)
    # Nodes: the fewest of highest influence holding 80% (embeddings and logits always kept).
    nodes = minimal_top_set(influence, 0.8)
    nodes[layout.n_features + layout.n_errors :] = True
    kept_share = influence[nodes].sum() / influence.sum()
    assert kept_share >= 0.8 and abs(result.node_influence_kept - kept_share) < 1e-9
    assert not (result.node_mask.numpy() & ~nodes).any()
    # Edges of the node-pruned graph, by edge influence.
    sub = matrix.double().numpy().copy()
    rows = layout.row_nodes().numpy()
    sub[~nodes[rows]] = 0
    sub[:, ~nodes[: layout.n_sources]] = 0
    sub_influence = brute_influence(torch.from_numpy(sub), layout, weights)
    w = np.zeros(layout.n_nodes)
    w[layout.n_sources :] = weights.numpy()
    absolute = np.abs(sub)
    sums = absolute.sum(1, keepdims=True)
    normalized = np.divide(absolute, sums, out=np.zeros_like(absolute), where=sums > 0)
    scores = normalized * (sub_influence + w)[rows][:, None]
    edges = minimal_top_set(scores.ravel(), 0.9).reshape(scores.shape) & (sub != 0)
    edge_share = scores[edges].sum() / scores.sum()
    assert edge_share >= 0.9 and abs(result.edge_influence_kept - edge_share) < 1e-9
    for source, target in result.edges.tolist():
        row = int(np.nonzero(rows == target)[0][0])
        assert edges[row, source]
        assert result.node_mask[source] and result.node_mask[target]
    # What is left is connected: every latent has an edge in and out, every error one out.
    sources = {s for s, _ in result.edges.tolist()}
    targets = {t for _, t in result.edges.tolist()}
    for node in result.node_mask.nonzero(as_tuple=True)[0].tolist():
        if node < layout.n_features + layout.n_errors:
            assert node in sources
        if node < layout.n_features:
            assert node in targets


def test_scores_by_their_definitions() -> None:
    matrix, layout, weights = layered_graph(3)
    influence = brute_influence(matrix, layout, weights)
    replacement, completeness = pruning.scores(matrix, layout, weights, torch.from_numpy(influence))
    errors = slice(6, 9)
    tokens = slice(9, 11)
    assert replacement == pytest.approx(
        influence[tokens].sum() / (influence[tokens].sum() + influence[errors].sum())
    )
    absolute = np.abs(matrix.double().numpy())
    share = np.zeros(layout.n_nodes)
    share[layout.row_nodes().numpy()] = absolute[:, errors].sum(1) / absolute.sum(1)
    weight = influence.copy()
    weight[layout.n_sources :] += weights.numpy()
    assert completeness == pytest.approx(((1 - share) * weight).sum() / weight.sum())


# --- the API ---------------------------------------------------------------------------------

GRAPH_FIELDS = """
  id tokens { id text }
  unpruned { activeFeatures features errors embeddings logits nodes edges }
  pruned { features errors embeddings logits nodes edges }
  pruning { nodeThreshold edgeThreshold nodeInfluenceKept edgeInfluenceKept }
  replacementScore completenessScore jsonUrl
  nodes { id type layer tokenIndex token { id } influence activation probability logit
          node { id explanations { text } } }
  edges { source target weight }
"""


async def demo_graph(client: httpx.AsyncClient, extra: str = "") -> dict[str, Any]:
    body = await graphql(
        client,
        f"""{{ model(name: "{DEMO}") {{ attributionGraph(input: {{prompt: {json.dumps(PROMPT)},
        dictionary: "transcoder"{extra}}}) {{ {GRAPH_FIELDS} neuronpediaJson }} }} }}""",
    )
    assert "errors" not in body, body
    graph: dict[str, Any] = body["data"]["model"]["attributionGraph"]
    return graph


async def test_the_graph_query(demo: httpx.AsyncClient) -> None:
    graph = await demo_graph(demo)
    tokens = [t["id"] for t in graph["tokens"]]
    assert tokens == [50256, *gpt2_encoding().encode(PROMPT)]
    nodes = graph["nodes"]
    ids = [n["id"] for n in nodes]
    assert len(set(ids)) == len(ids)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        by_type.setdefault(node["type"], []).append(node)
    assert len(by_type["EMBEDDING"]) == len(tokens)  # always kept
    assert 1 <= len(by_type["LOGIT"]) <= 10
    assert sum(n["probability"] for n in by_type["LOGIT"]) >= 0.95 or len(by_type["LOGIT"]) == 10
    for node in by_type["FEATURE"]:
        layer, index, position = (int(p) for p in node["id"].split("_"))
        assert node["node"]["id"] == f"{DEMO}/transcoder/{layer}/{index}"
        assert node["tokenIndex"] == position and node["activation"] > 0
        assert node["token"]["id"] == tokens[position]
    assert graph["pruned"]["nodes"] == len(nodes) < graph["unpruned"]["nodes"]
    assert graph["pruned"]["edges"] == len(graph["edges"]) < graph["unpruned"]["edges"]
    assert graph["pruning"]["nodeInfluenceKept"] >= 0.8
    assert graph["pruning"]["edgeInfluenceKept"] >= 0.98
    assert 0 < graph["replacementScore"] <= 1 and 0 < graph["completenessScore"] <= 1
    known = set(ids)
    assert all(e["source"] in known and e["target"] in known for e in graph["edges"])


async def test_the_activations_are_the_apis(demo: httpx.AsyncClient) -> None:
    """A feature node's activation is the latent's value that Node.activations reports."""
    graph = await demo_graph(demo)
    feature = max(
        (n for n in graph["nodes"] if n["type"] == "FEATURE"), key=lambda n: n["influence"]
    )
    prompt = gpt2_encoding().decode([t["id"] for t in graph["tokens"]])
    body = await graphql(
        demo,
        f"""{{ node(id: "{feature["node"]["id"]}") {{ activations(prompt: {json.dumps(prompt)})
        {{ values }} }} }}""",
    )
    values = body["data"]["node"]["activations"]["values"]
    assert values[feature["tokenIndex"]] == pytest.approx(feature["activation"], rel=1e-4)


async def test_graph_json_for_the_viewer(demo: httpx.AsyncClient) -> None:
    graph = await demo_graph(demo)
    exported = graph["neuronpediaJson"]
    served = (await demo.get(graph["jsonUrl"])).json()
    assert served == exported
    assert exported["metadata"]["schema_version"] == 1
    assert exported["metadata"]["prompt_tokens"] == [t["text"] for t in graph["tokens"]]
    assert set(exported["qParams"]) == {
        "pinnedIds",
        "supernodes",
        "linkType",
        "clickedId",
        "sg_pos",
    }
    nodes = exported["nodes"]
    ids = [n["node_id"] for n in nodes]
    assert ids == [n["id"] for n in graph["nodes"]] and len(set(ids)) == len(ids)
    types = {n["feature_type"] for n in nodes}
    assert types <= {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    # No error node can collide with a latent: circuit-tracer's 0_{layer}_{pos} would.
    feature_ids = {f"{0}_{i}_{p}" for i in range(512) for p in range(len(graph["tokens"]))}
    assert not feature_ids & {n["node_id"] for n in nodes if n["feature_type"].startswith("mlp")}
    links = exported["links"]
    assert len(links) == len(graph["edges"])
    assert {(link["source"], link["target"]) for link in links} == {
        (e["source"], e["target"]) for e in graph["edges"]
    }
    clerps = {n["node_id"]: n["clerp"] for n in nodes}
    for node in graph["nodes"]:
        if node["type"] == "FEATURE" and node["node"]["explanations"]:
            assert clerps[node["id"]] == node["node"]["explanations"][0]["text"]
    missing = await demo.get(f"/graphs/{'0' * 24}.json")
    assert missing.status_code == 404 and error_codes(missing.json()) == ["GRAPH_NOT_FOUND"]
    assert (await demo.get("/graphs/nope.json")).status_code == 404


async def test_the_same_request_is_computed_once(demo: httpx.AsyncClient) -> None:
    first = await demo_graph(demo, ", nodeThreshold: 0.7")
    body = await graphql(
        demo,
        f'{{ attributionGraph(id: "{first["id"]}") {{ id computeTimeMs pruned {{ nodes }} }} }}',
    )
    assert body["data"]["attributionGraph"]["id"] == first["id"]
    assert body["data"]["attributionGraph"]["pruned"]["nodes"] == first["pruned"]["nodes"]
    missing = await graphql(demo, '{ attributionGraph(id: "0123") { id } }')
    assert error_codes(missing) == ["GRAPH_NOT_FOUND"]


async def test_interventions_against_the_reference(demo: httpx.AsyncClient) -> None:
    graph = await demo_graph(demo)
    feature = max(
        (n for n in graph["nodes"] if n["type"] == "FEATURE"), key=lambda n: n["influence"]
    )
    body = await graphql(
        demo,
        f"""{{ model(name: "{DEMO}") {{ attributionGraph(input: {{prompt: {json.dumps(PROMPT)},
        dictionary: "transcoder"}}) {{ intervene(interventions: [{{nodeId: "{feature["id"]}",
        scale: -2}}], k: 5) {{ original {{ token {{ id }} probability }}
        frozenAttention {{ token {{ id }} probability }} free {{ token {{ id }} probability }} }}
        }} }} }}""",
    )
    assert "errors" not in body, body
    found = body["data"]["model"]["attributionGraph"]["intervene"]
    cfg, weights = load_demo_model()
    tokens = [t["id"] for t in graph["tokens"]]
    layer, index, position = (int(p) for p in feature["id"].split("_"))
    transcoders = demo_transcoders(cfg)
    ref = LinearisedReference(cfg, weights, transcoders, tokens)
    old = float(ref.clean.latents[layer][position, index])
    new = -2 * old
    edited = ref.clean.scaled("latent", layer, position, index, -2.0)
    _, frozen_logits = ref.run(edited)
    w_dec = transcoders[layer]["W_dec"].double()

    def edit(at: int, name: str, act: torch.Tensor) -> torch.Tensor:
        if at == layer and name == "mlp_out":
            act = act.clone()
            act[position] += (new - old) * w_dec[index]
        return act

    free_logits, _ = reference_forward(cfg, weights, tokens, edit=edit)
    clean_logits = ref.clean_logits[-1]
    for name, logits in (
        ("original", clean_logits),
        ("frozenAttention", frozen_logits),
        ("free", free_logits[-1]),
    ):
        probabilities = logits.softmax(-1)
        top = probabilities.topk(5)
        assert [t["token"]["id"] for t in found[name]] == top.indices.tolist(), name
        assert [t["probability"] for t in found[name]] == pytest.approx(
            top.values.tolist(), abs=1e-5
        ), name
    assert found["frozenAttention"] != found["original"]


async def test_progress_is_streamed() -> None:
    services = build_services(ServeOptions(explanation_store=":memory:"))
    services.settings = Settings(graph_batch_size=64)  # type: ignore[misc]
    try:
        context = RequestContext.create(services)
        stream = await build_schema().subscribe(
            f"""subscription {{ attributionGraph(model: "{DEMO}", input: {{prompt: "def f(x):",
            dictionary: "transcoder", maxFeatureNodes: 150}}) {{ rowsDone rows
            graph {{ unpruned {{ features }} }} }} }}""",
            context_value=context,
        )
        events = [event.data["attributionGraph"] async for event in stream]  # type: ignore[union-attr]
    finally:
        services.registry.close()
    progress = events[:-1]
    assert len(progress) >= 3
    done = [e["rowsDone"] for e in progress]
    assert done == sorted(done) and done[-1] == progress[-1]["rows"]
    assert events[-1]["graph"]["unpruned"]["features"] == 150


@pytest.mark.parametrize(
    ("input", "code"),
    [
        ('dictionary: "res-sae"', "UNSUPPORTED"),
        ('dictionary: "nope"', "INVALID_ARGUMENT"),
        ('dictionary: "transcoder", nodeThreshold: 0', "INVALID_ARGUMENT"),
        ('dictionary: "transcoder", edgeThreshold: 1.5', "INVALID_ARGUMENT"),
        ('dictionary: "transcoder", maxLogits: 0', "INVALID_ARGUMENT"),
        ('dictionary: "transcoder", maxFeatureNodes: 0', "INVALID_ARGUMENT"),
        # Out of its range, not QUERY_TOO_COMPLEX: the cost estimate prices the range's end.
        ('dictionary: "transcoder", maxLogits: 1000000', "INVALID_ARGUMENT"),
        ('dictionary: "transcoder", logitProbability: NaN', "GRAPHQL_VALIDATION_FAILED"),
    ],
)
async def test_bad_graph_input(demo: httpx.AsyncClient, input: str, code: str) -> None:
    body = await graphql(
        demo,
        f'{{ model(name: "{DEMO}") {{ attributionGraph(input: {{prompt: "x = 1", {input}}}) {{ id }} }} }}',
    )
    assert error_codes(body) == [code]


async def test_bad_interventions(demo: httpx.AsyncClient) -> None:
    for given in (
        'nodeId: "E_1_2", value: 1',
        'nodeId: "0_1_99", value: 1',
        'nodeId: "0_1_0"',
        'nodeId: "0_1_0", value: 1, scale: 2',
        'nodeId: "9_1_0", value: 1',
        'nodeId: "0_1_0", value: 0}, {nodeId: "0_1_0", value: 5',  # the last value held
    ):
        body = await graphql(
            demo,
            f"""{{ model(name: "{DEMO}") {{ attributionGraph(input: {{prompt: "x = 1",
            dictionary: "transcoder"}}) {{ intervene(interventions: [{{{given}}}]) {{
            free {{ probability }} }} }} }} }}""",
        )
        assert error_codes(body) == ["INVALID_ARGUMENT"], given


async def test_limits_of_the_server() -> None:
    services = build_services(
        ServeOptions(
            explanation_store=":memory:", settings=Settings(max_graph_tokens=4, graph_memory_mb=0)
        )
    )
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            for prompt, code in (
                ("import os\nimport sys", "PROMPT_TOO_LONG"),  # over the graph's 4 tokens
                ("x", "RESOURCE_EXHAUSTED"),
            ):
                body = await graphql(
                    client,
                    f"""{{ model(name: "{DEMO}") {{ attributionGraph(input: {{prompt: {json.dumps(prompt)},
                    dictionary: "transcoder"}}) {{ id }} }} }}""",
                )
                assert error_codes(body) == [code], prompt
    finally:
        services.registry.close()


async def test_a_graph_keeping_more_edges_than_the_limit_is_refused() -> None:
    """Thresholds of 1 keep nearly every edge: a graph of N edges is served under a limit of N
    and refused, saying what to lower, under N - 1 (it was served whole: hundreds of MB)."""
    graph = f"""{{ model(name: "{DEMO}") {{ attributionGraph(input: {{prompt: "x = 1",
        dictionary: "transcoder", nodeThreshold: 1, edgeThreshold: 1}}) {{
        pruned {{ edges }} unpruned {{ edges }} edges {{ weight }} }} }} }}"""
    answers = []
    for limit in (None, 0, -1):
        settings = Settings() if limit is None else Settings(max_graph_edges=answers[0] + limit)
        services = build_services(ServeOptions(explanation_store=":memory:", settings=settings))
        transport = httpx.ASGITransport(app=create_app(services))
        try:
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                body = await graphql(client, graph)
        finally:
            services.registry.close()
        if limit == -1:
            assert error_codes(body) == ["RESOURCE_EXHAUSTED"]
            assert "lower edgeThreshold" in body["errors"][0]["message"]
        else:
            found = body["data"]["model"]["attributionGraph"]
            assert found["pruned"]["edges"] == len(found["edges"])
            assert found["pruned"]["edges"] > 0.8 * found["unpruned"]["edges"]
            answers.append(len(found["edges"]))
    assert answers[0] == answers[1] > 0


async def test_a_large_graph_runs_as_a_job_of_the_callers_key() -> None:
    services = build_services(ServeOptions(explanation_store=":memory:", api_keys=["k1"]))
    transport = httpx.ASGITransport(app=create_app(services))
    started = f"""mutation {{ startAttributionGraph(model: "{DEMO}", input: {{prompt:
        {json.dumps(CODE)}, dictionary: "transcoder"}}) {{ id kind status node {{ id }} }} }}"""
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            assert error_codes(await graphql(client, started)) == ["UNAUTHENTICATED"]
            key = {"Authorization": "Bearer k1"}
            body = (await client.post("/graphql", json={"query": started}, headers=key)).json()
            job = body["data"]["startAttributionGraph"]
            assert job["kind"] == "attribution_graph" and job["node"] is None
            context = RequestContext.create(services)
            context.connection_params = key
            stream = await build_schema().subscribe(
                f'subscription {{ jobUpdates(id: "{job["id"]}") {{ status progress message }} }}',
                context_value=context,
            )
            events = [e.data["jobUpdates"] async for e in stream]  # type: ignore[union-attr]
            assert events[-1]["status"] == "SUCCEEDED", events
            running = [e["progress"] for e in events if e["status"] == "RUNNING"]
            assert len(running) >= 3 and running == sorted(running)
            assert any("targets" in e["message"] for e in events)
            done = (
                await client.post(
                    "/graphql",
                    json={
                        "query": f'{{ job(id: "{job["id"]}") {{ graph {{ id unpruned {{ features }} }} }} }}'
                    },
                    headers=key,
                )
            ).json()["data"]["job"]["graph"]
            assert done["unpruned"]["features"] > 100
            again = await graphql(client, f'{{ attributionGraph(id: "{done["id"]}") {{ id }} }}')
            assert again["data"]["attributionGraph"]["id"] == done["id"]
    finally:
        services.registry.close()


async def test_the_readmes_figures(demo: httpx.AsyncClient) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    graph = await demo_graph(demo)
    unpruned, pruned = graph["unpruned"], graph["pruned"]
    stated = (
        f"answers {unpruned['nodes']} nodes and {unpruned['edges']:,} edges pruned to "
        f"{pruned['nodes']} and {pruned['edges']}, replacement score "
        f"{graph['replacementScore']:.3f}, completeness\n{graph['completenessScore']:.3f}"
    )
    assert stated in readme
    top = max((n for n in graph["nodes"] if n["type"] == "FEATURE"), key=lambda n: n["influence"])
    assert f"the most influential latent is `{top['id']}`" in readme
    assert f"influence {top['influence']:.3f}" in readme


async def test_a_prompt_past_the_context_is_refused_with_the_graphs_limit(
    demo: httpx.AsyncClient,
) -> None:
    """Past the model's context it was PROMPT_TOO_LONG naming the context (256), below it
    INVALID_ARGUMENT naming the graph's limit (128)."""
    for n in (160, 300):
        body = await graphql(
            demo,
            f'{{ model(name: "{DEMO}") {{ attributionGraph(input: {{prompt: "{" x" * n}", '
            'dictionary: "transcoder"}) { id } } }',
        )
        [error] = body["errors"]
        assert error["extensions"]["code"] == "PROMPT_TOO_LONG"
        assert error["message"].startswith("an attribution graph reads at most 128 tokens here")
