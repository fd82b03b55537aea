"""The models a server serves (loaders/registry.py): node counts per kind from the
architecture and the attached dictionaries, and references that exist or a typed error."""

from __future__ import annotations

import pytest

from interpql.backends.autoencoder import SparseAutoencoder
from interpql.backends.base import AutoencoderInput
from interpql.backends.gpt2 import NativeGPT2Backend
from interpql.backends.gpt2.loading import random_model
from interpql.errors import InterpqlError
from interpql.loaders.registry import ModelEntry, ModelRegistry
from interpql.specs import NodeRef, parse_node_id
from tests.conftest import SMALL


@pytest.fixture(scope="module")
def entry() -> ModelEntry:
    backend = NativeGPT2Backend(random_model(SMALL, seed=3))
    backend.attach_autoencoder(1, AutoencoderInput.MLP_POST_ACT, SparseAutoencoder(SMALL.d_mlp, 30))
    backend.attach_autoencoder(2, AutoencoderInput.RESID_DELTA_ATTN, SparseAutoencoder(48, 12))
    return ModelEntry("m", SMALL.architecture, backend, backend.name, "cpu", "float32")


def test_node_counts_per_kind_and_layer(entry: ModelEntry) -> None:
    counts = {
        (kind.name, layer): entry.node_count(kind.name, layer)
        for kind in entry.kinds()
        for layer in range(SMALL.n_layers)
    }
    for layer in range(SMALL.n_layers):
        assert counts[("mlp_neuron", layer)] == SMALL.d_mlp
        assert counts[("attention_head", layer)] == SMALL.n_heads
        assert counts[("residual_channel", layer)] == SMALL.d_model
        assert counts[("token_embedding", layer)] == (1 if layer == 0 else 0)
    assert [counts[("mlp_autoencoder_latent", layer)] for layer in range(3)] == [0, 30, 0]
    assert [counts[("attention_autoencoder_latent", layer)] for layer in range(3)] == [0, 0, 12]
    assert entry.node_count("no_such_kind", 0) == 0


def test_a_model_without_dictionaries_lists_only_its_structural_kinds() -> None:
    bare = ModelEntry("b", SMALL.architecture, None, "native-gpt2", "cpu", "float32")
    assert [k.name for k in bare.kinds()] == [
        "token_embedding",
        "mlp_neuron",
        "attention_head",
        "residual_channel",
    ]


@pytest.mark.parametrize(
    ("node_id", "why"),
    [
        ("m/mlp_neuron/0/80", "index must be in [0, 80)"),
        ("m/mlp_neuron/3/0", "layer must be in [0, 3)"),
        ("m/mlp_autoencoder_latent/0/0", "layer 0 of 'm' has no mlp_autoencoder_latent nodes"),
        ("m/attention_autoencoder_latent/2/12", "index must be in [0, 12)"),
        ("m/neuron/0/0", "unknown kind 'neuron'"),
        ("other/mlp_neuron/0/0", "no model named 'other'"),
    ],
)
def test_references_to_nodes_that_do_not_exist(entry: ModelEntry, node_id: str, why: str) -> None:
    registry = ModelRegistry()
    registry.add(entry)
    with pytest.raises(InterpqlError) as refused:
        registry.resolve(parse_node_id(node_id))
    assert refused.value.code == "INVALID_NODE" and why in refused.value.message


def test_references_that_exist(entry: ModelEntry) -> None:
    registry = ModelRegistry()
    registry.add(entry)
    for node_id in ("m/mlp_neuron/2/79", "m/attention_head/0/2", "m/mlp_autoencoder_latent/1/29"):
        assert registry.resolve(parse_node_id(node_id)) == parse_node_id(node_id)
    assert entry.node("residual_channel", 1, 47) == NodeRef("m", "residual_channel", 1, 47)


def test_names_are_checked_and_unique(entry: ModelEntry) -> None:
    registry = ModelRegistry()
    registry.add(entry)
    with pytest.raises(ValueError, match="already registered"):
        registry.add(entry)
    bad = ModelEntry("bad name/x", SMALL.architecture, None, "native-gpt2", "cpu", "float32")
    with pytest.raises(ValueError, match="must be 1-64 letters"):
        registry.add(bad)


def test_every_kind_in_the_table_is_in_the_schema() -> None:
    """The schema's NodeKind enum maps structural kinds by name (one missing would answer any
    field that lists that kind with an internal error); every dictionary set's latents are
    DICTIONARY_LATENT, the openai-format sets keeping their own members."""
    from interpql.backends.base import AutoencoderInput
    from interpql.backends.node_kinds import STRUCTURAL_TABLE
    from interpql.schema.enums import NodeKind, node_kind

    openai_sets = {input.kind_name for input in AutoencoderInput}
    assert {member.value for member in NodeKind} == set(STRUCTURAL_TABLE) | openai_sets | {
        "dictionary_latent"
    }
    assert node_kind("res-jb") is NodeKind.DICTIONARY_LATENT
