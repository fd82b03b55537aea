"""Loading the models a server is asked to serve into registry entries."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import torch

from interpql.backends.autoencoder_files import load_autoencoder_set, registered_input
from interpql.backends.base import AutoencoderInput, Backend
from interpql.backends.dictionaries.loading import read_dictionaries
from interpql.backends.gpt2.backend import NativeGPT2Backend
from interpql.backends.gpt2.loading import REGISTERED_MODELS, read_config
from interpql.backends.node_kinds import STRUCTURAL_TABLE, kind_table
from interpql.backends.transformerlens import TransformerLensBackend, read_architecture
from interpql.file_errors import FileProblem
from interpql.loaders.registry import NAME, ModelEntry
from interpql.loaders.sources import CompactSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The one place a --backend name maps to its class (each class's own `name`).
BACKEND_CLASSES: dict[str, type[NativeGPT2Backend] | type[TransformerLensBackend]] = {
    cls.name: cls for cls in (NativeGPT2Backend, TransformerLensBackend)
}
BACKENDS = tuple(BACKEND_CLASSES)


def default_name(spec: str) -> str:
    if spec in REGISTERED_MODELS:
        return spec
    if spec.startswith("random:"):
        return "random-" + spec.split(":")[1]
    return PurePosixPath(spec.rstrip("/")).name or "model"


def load_model(
    spec: str,
    *,
    name: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    with_weights: bool = True,
    backend: str = NativeGPT2Backend.name,
) -> ModelEntry:
    """`backend`: "native-gpt2" (our GPT-2) or "transformerlens" (any model TransformerLens
    bridges; ImportError naming the extra when it is not installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    name = name or default_name(spec)
    cls = BACKEND_CLASSES[backend]
    if not with_weights:
        native = cls is NativeGPT2Backend
        arch = read_config(spec).architecture if native else read_architecture(spec)
        return ModelEntry(name, arch, None, cls.name, device, dtype)
    loaded = cls.load(spec, device=device, dtype=DTYPES[dtype])
    return ModelEntry(name, loaded.architecture, loaded, loaded.name, str(loaded.device), dtype)


def attach_autoencoders(
    entry: ModelEntry, spec: str, role: str, reads: AutoencoderInput | None = None
) -> None:
    """Attaches a set of per-layer autoencoders; `role` is "mlp" or "attention".

    The input an MLP set reads is `reads`, or known for registered names, or read off its
    width (d_mlp: mlp_post_act, d_model: resid_delta_mlp). Every mismatch is a ValueError here,
    at start-up, never mid-request.
    """
    backend = entry.require_backend()
    loaded, source = load_autoencoder_set(spec, entry.architecture.n_layers)
    for layer, autoencoder in loaded.items():
        input = reads or _input_of(backend, spec, role, autoencoder.n_inputs)
        backend.attach_autoencoder(layer, input, autoencoder)
        entry.dictionary_sources[input.kind_name] = source


def attach_dictionaries(
    entry: ModelEntry, name: str, path: str, scaling_factor: float | None = None
) -> None:
    """Attaches every dictionary under `path` (dictionaries/loading.py) as the set `name`, its
    latents the node kind `name` (`<model>/<name>/<layer>/<index>`: Neuronpedia's source
    `8-res-jb` is layer 8 of a set named res-jb). FileProblem naming the file that does not
    fit the model, at start-up."""
    # The openai-format autoencoders' kinds are names of their own too (--mlp-autoencoder).
    reserved = [*STRUCTURAL_TABLE, *sorted({i.kind_name for i in AutoencoderInput})]
    if not NAME.match(name) or name in reserved:
        raise ValueError(
            f"dictionary name {name!r} must be 1-64 letters, digits, '.', '_' or '-', and not "
            f"a kind of node ({', '.join(reserved)})"
        )
    backend = entry.require_backend()
    for found in read_dictionaries(path, entry.architecture.n_layers, scaling_factor):
        try:
            backend.attach_dictionary(
                name, found.layer, found.dictionary, found.input, found.output
            )
            kind_table(backend)  # its layers on one side of the model
        except ValueError as exc:
            # With several models served, which one it was meant for.
            raise FileProblem(found.path, f"does not fit model {entry.name!r}: {exc}") from None
    previous = entry.dictionary_sources.get(name)
    entry.dictionary_sources[name] = path if previous is None else f"{previous}, {path}"


def attach_folder_extras(entry: ModelEntry, folder: Path) -> None:
    """What a model folder may carry besides its weights: `autoencoders/<input>/<layer>.pt`
    (openai-format sets, named by what they read), `dictionaries/<name>/` (SAELens folders or a
    circuit-tracer set, named as the set) and its node data (`add_folder_sources`)."""
    if entry.backend is not None:
        for input in AutoencoderInput:
            sets = folder / "autoencoders" / input.value
            if sets.is_dir():
                role = "attention" if input is AutoencoderInput.RESID_DELTA_ATTN else "mlp"
                attach_autoencoders(entry, str(sets), role, reads=input)
        dictionaries = folder / "dictionaries"
        for named in sorted(dictionaries.iterdir()) if dictionaries.is_dir() else []:
            attach_dictionaries(entry, named.name, str(named))
    add_folder_sources(entry, folder)


def add_folder_sources(entry: ModelEntry, folder: Path) -> None:
    """A model folder's compact store of node data (`records/`, `explanations/`:
    loaders/sources/compact_format.py), served as the model's first source."""
    if (folder / "records").is_dir():
        entry.sources.insert(0, CompactSource.open(entry.name, folder, entry.token_text))


def _input_of(backend: Backend, spec: str, role: str, width: int) -> AutoencoderInput:
    registered = registered_input(spec)
    if role == "attention":
        if registered not in (None, AutoencoderInput.RESID_DELTA_ATTN):
            raise ValueError(f"{spec!r} reads {registered}, not the attention output")
        return AutoencoderInput.RESID_DELTA_ATTN
    if registered is not None:
        if registered is AutoencoderInput.RESID_DELTA_ATTN:
            raise ValueError(f"{spec!r} reads the attention output; pass it as an attention set")
        return registered
    arch = backend.architecture
    by_width = {
        arch.d_mlp: AutoencoderInput.MLP_POST_ACT,
        arch.d_model: AutoencoderInput.RESID_DELTA_MLP,
    }
    if width not in by_width:
        raise ValueError(
            f"an MLP autoencoder must read d_mlp={arch.d_mlp} (mlp_post_act) or "
            f"d_model={arch.d_model} (resid_delta_mlp) values; {spec!r} reads {width}"
        )
    return by_width[width]
