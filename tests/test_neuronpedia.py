"""Neuronpedia interop: nodes in its feature shape, nodes by its (modelId, source, index), and a
folder of its feature JSON served as a node-data source (a file written here, by hand, in both
of its shapes; and the demo's own features exported and read back)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from interpql.bootstrap import ServeOptions, build_services
from interpql.file_errors import FileProblem
from interpql.loaders.sources.neuronpedia import NeuronpediaFolderSource
from interpql.server import create_app
from interpql.specs import NodeRef
from tests.conftest import error_codes, graphql

DEMO = "tiny-stdlib"
NODES = [f"{DEMO}/mlp_neuron/1/{i}" for i in (0, 5)] + [f"{DEMO}/attention_head/2/1"]


async def test_a_node_in_the_feature_shape(demo: httpx.AsyncClient) -> None:
    body = await graphql(
        demo,
        f"""{{ node(id: "{NODES[0]}") {{ neuronpedia
              topActivations(first: 20) {{ tokens activations maxActivation }}
              explanations {{ text score explainerModel }} statistics {{ density max }}
              scoredTokens(k: 10) {{ upvotedOutputTokens {{ token {{ text }} value }}
                                    downvotedOutputTokens {{ token {{ text }} value }} }} }} }}""",
    )
    assert "errors" not in body, body
    node = body["data"]["node"]
    feature = node["neuronpedia"]
    assert (feature["modelId"], feature["source"], feature["index"]) == (DEMO, "1-mlp_neuron", "0")
    assert feature["density"] == node["statistics"]["density"]
    assert feature["maxActApprox"] == node["statistics"]["max"]
    assert [a["tokens"] for a in feature["activations"]] == [
        t["tokens"] for t in node["topActivations"]
    ]
    for shaped, record in zip(feature["activations"], node["topActivations"], strict=True):
        assert shaped["values"] == record["activations"]
        assert shaped["maxValue"] == record["maxActivation"]
        assert shaped["values"][shaped["maxValueTokenIndex"]] == max(shaped["values"])
    assert [(e["description"], e["score"]) for e in feature["explanations"]] == [
        (e["text"], e["score"]) for e in node["explanations"]
    ]
    scored = node["scoredTokens"]
    assert feature["top_logits"] == [
        {"token": t["token"]["text"], "value": t["value"]} for t in scored["upvotedOutputTokens"]
    ]
    assert feature["bottom_logits"][0]["value"] < 0 < feature["top_logits"][0]["value"]


async def test_nodes_by_neuronpedia_address(demo: httpx.AsyncClient) -> None:
    body = await graphql(
        demo,
        f"""{{ a: neuronpediaFeature(modelId: "{DEMO}", source: "1-mlp_neuron", index: 5) {{ id }}
              b: neuronpediaFeature(modelId: "{DEMO}", source: "2-mlp_autoencoder_latent",
                                    index: 3) {{ id }} }}""",
    )
    assert body["data"] == {
        "a": {"id": f"{DEMO}/mlp_neuron/1/5"},
        "b": {"id": f"{DEMO}/mlp_autoencoder_latent/2/3"},
    }
    bad = await graphql(
        demo, f'{{ neuronpediaFeature(modelId: "{DEMO}", source: "res-jb", index: 1) {{ id }} }}'
    )
    assert error_codes(bad) == ["INVALID_ARGUMENT"]
    missing = await graphql(
        demo,
        f'{{ neuronpediaFeature(modelId: "{DEMO}", source: "9-mlp_neuron", index: 1) {{ id }} }}',
    )
    assert error_codes(missing) == ["INVALID_NODE"]


def test_a_folder_of_hand_written_features(tmp_path: Path) -> None:
    """The API's feature shape and an upload batch, read as they are written."""
    (tmp_path / "one.json").write_text(
        json.dumps(
            {
                "modelId": "gpt2-small",
                "source": "8-res-jb",
                "index": "12",
                "density": 0.0123,
                "explanations": [
                    {"description": "low", "typeName": "oai_token-act-pair",
                     "explanationModelName": "gpt-4o-mini", "score": 0.2},
                    {"description": "high", "typeName": "oai_token-act-pair",
                     "explanationModelName": "gpt-4o-mini", "score": 0.7},
                ],
                "activations": [
                    {"tokens": [" a", " b"], "values": [0.5, 1.0], "maxValue": 1.0},
                    {"tokens": [" c", " d"], "values": [3.0, 0.0], "maxValue": 3.0},
                ],
            }
        )
    )  # fmt: skip
    (tmp_path / "batch.json").write_text(
        json.dumps(
            {
                "modelId": "gpt2-small",
                "source": "3-tc",
                "features": [
                    {"index": 7, "density": 0.5,
                     "explanations": [{"text": "loops", "methodName": "np_max-act",
                                       "modelName": "claude"}],
                     "activations": [{"tokens": ["for"], "values": [2.0]}]},
                ],
            }
        )
    )  # fmt: skip
    (tmp_path / "notes.txt").write_text("not a feature")
    source = NeuronpediaFolderSource("np", str(tmp_path))
    a, b, none = NodeRef("m", "res-jb", 8, 12), NodeRef("m", "tc", 3, 7), NodeRef("m", "tc", 3, 8)
    records = source.read_records([a, b, none])
    assert records[2] is None
    first = records[0]
    assert first is not None and not isinstance(first, Exception)
    assert [e.tokens for e in first.top] == [(" c", " d"), (" a", " b")]  # highest first
    assert first.top[0].activations == (3.0, 0.0) and first.top[0].token_ids is None
    assert first.statistics.max == 3.0 and first.statistics.density == 0.0123
    explanations = source.read_explanations([a, b])
    assert [(e.text, e.score, e.explainer) for e in explanations[0]] == [  # type: ignore[union-attr]
        ("high", 0.7, "gpt-4o-mini"),
        ("low", 0.2, "gpt-4o-mini"),
    ]
    assert [(e.text, e.explainer, e.scorer) for e in explanations[1]] == [  # type: ignore[union-attr]
        ("loops", "claude", "np_max-act")
    ]
    assert sorted(source.list_explanations("m")) == [
        ("m/res-jb/8/12", "high", 0.7),
        ("m/res-jb/8/12", "low", 0.2),
        ("m/tc/3/7", "loops", None),
    ]


def test_a_broken_feature_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"source": "8-res-jb"}')
    with pytest.raises(FileProblem, match=r"bad\.json"):
        NeuronpediaFolderSource("np", str(tmp_path))


async def test_exported_features_serve_offline_as_a_source(tmp_path: Path) -> None:
    """The demo's nodes exported in the feature shape, then served from that folder alone (no
    other source) next to live inference: the same examples and explanations come back."""
    services = build_services(ServeOptions(explanation_store=":memory:"))
    app = create_app(services)
    fields = "topActivations(first: 20) { tokens activations } explanations { text score }"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        originals: list[dict[str, Any]] = []
        for i, node in enumerate(NODES):
            body = await graphql(client, f'{{ node(id: "{node}") {{ neuronpedia {fields} }} }}')
            assert "errors" not in body, body
            originals.append(body["data"]["node"])
            (tmp_path / f"{i}.json").write_text(json.dumps(body["data"]["node"]["neuronpedia"]))
    services.registry.close()

    offline = build_services(
        ServeOptions(explanation_store=":memory:", neuronpedia_sources=[f"np={tmp_path}"])
    )
    entry = offline.registry.get(DEMO)
    entry.sources[:] = [s for s in entry.sources if s.name == "np"]  # the folder alone
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(offline)), base_url="http://localhost"
    ) as client:
        for node, original in zip(NODES, originals, strict=True):
            body = await graphql(
                client,
                f"""{{ node(id: "{node}") {{ {fields} }}
                      model(name: "{DEMO}") {{ infer(input: {{prompt: "def f():"}}) {{ loss }} }}
                }}""",
            )
            assert "errors" not in body, body
            served = body["data"]["node"]
            assert served["topActivations"] == original["topActivations"]
            assert served["explanations"] == original["explanations"]
            assert body["data"]["model"]["infer"]["loss"] > 0
    offline.registry.close()
