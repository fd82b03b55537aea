"""Finding the dictionaries under a path and where each one hooks into the model.

A path is one of
    a SAELens folder (cfg.json + sae_weights.safetensors): one dictionary, its layer and hooks
        read off the config's hook names;
    a folder of SAELens folders (a release: one subfolder per layer or hook);
    circuit-tracer's per-layer transcoder set (config.yaml + layer_{i}.safetensors).
Hook names are TransformerLens's (`blocks.L.hook_resid_post`, `blocks.L.mlp.hook_in`, ...), the
names both formats use, mapped here to our locations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import blobfile as bf

from interpql.backends import remote
from interpql.backends.base import Location
from interpql.backends.dictionaries import circuit_tracer, saelens
from interpql.backends.dictionaries.base import Dictionary
from interpql.file_errors import FileProblem

# TransformerLens's hook names within a block, by our location (the first name is the one we
# show; mlp.hook_out is what circuit-tracer calls the MLP's output).
HOOK_NAMES: dict[Location, tuple[str, ...]] = {
    Location.RESID_PRE: ("hook_resid_pre",),
    Location.ATTN_Z: ("attn.hook_z",),
    Location.ATTN_OUT: ("hook_attn_out",),
    Location.RESID_MID: ("hook_resid_mid",),
    Location.MLP_NORMALIZED: ("ln2.hook_normalized",),
    Location.MLP_IN: ("mlp.hook_in",),
    Location.MLP_POST: ("mlp.hook_post",),
    Location.MLP_OUT: ("hook_mlp_out", "mlp.hook_out"),
    Location.RESID_POST: ("hook_resid_post",),
}
_BY_NAME = {name: location for location, names in HOOK_NAMES.items() for name in names}
_HOOK = re.compile(r"^blocks\.(\d{1,4})\.(.+)$")


def hook_name(layer: int, location: Location) -> str:
    return f"blocks.{layer}.{HOOK_NAMES[location][0]}"


def parse_hook(name: str) -> tuple[int, Location]:
    """`blocks.L.<hook>` -> (L, location); ValueError naming the hooks dictionaries may use."""
    match = _HOOK.match(name)
    if match is None or match.group(2) not in _BY_NAME:
        known = ", ".join(f"blocks.L.{n}" for n in _BY_NAME)
        raise ValueError(f"hook {name!r} is not one a dictionary can use ({known})")
    return int(match.group(1)), _BY_NAME[match.group(2)]


@dataclass(frozen=True)
class FoundDictionary:
    layer: int
    input: Location
    output: Location
    dictionary: Dictionary
    path: str  # the file its weights came from


def read_dictionaries(
    path: str, n_layers: int, scaling_factor: float | None = None
) -> list[FoundDictionary]:
    """Every dictionary under `path`; FileProblem naming the file that does not fit."""
    path = path.rstrip("/")
    if not remote.call(lambda: bf.isdir(path), "a dictionary folder", path):
        raise FileProblem(path, "is not a folder (a SAELens folder or a transcoder set)")
    files = sorted(remote.call(lambda: list(bf.listdir(path)), "a dictionary folder", path))
    if circuit_tracer.is_transcoder_set(files):
        return [
            _found(f"{found.path}", found.dictionary, n_layers)
            for found in circuit_tracer.read_transcoder_set(path, n_layers)
        ]
    if saelens.CONFIG_FILE in files:
        return [_found(path, saelens.read_saelens(path, scaling_factor), n_layers)]
    candidates = [f"{path}/{name.rstrip('/')}" for name in files]
    subfolders = [
        folder
        for folder in candidates
        if remote.call(partial(bf.exists, f"{folder}/{saelens.CONFIG_FILE}"), "a folder", folder)
    ]
    if not subfolders:
        raise FileProblem(
            path,
            f"holds no {saelens.CONFIG_FILE} (SAELens), no {circuit_tracer.CONFIG_FILE} "
            "(circuit-tracer) and no subfolders with either",
        )
    return [
        _found(folder, saelens.read_saelens(folder, scaling_factor), n_layers)
        for folder in subfolders
    ]


def _found(path: str, dictionary: saelens.SaeLensDictionary, n_layers: int) -> FoundDictionary:
    cfg = dictionary.cfg
    try:
        layer, input = parse_hook(cfg.hook_name)
        output = input
        if cfg.hook_name_out is not None:
            out_layer, output = parse_hook(cfg.hook_name_out)
            if out_layer != layer:
                raise ValueError(
                    f"a transcoder reading layer {layer} writes layer {out_layer}: only "
                    "transcoders within one layer are read"
                )
        if not 0 <= layer < n_layers:
            raise ValueError(f"hook {cfg.hook_name!r}: the model has layers 0-{n_layers - 1}")
    except ValueError as exc:
        raise FileProblem(path, str(exc)) from None
    return FoundDictionary(layer, input, output, dictionary, path)
