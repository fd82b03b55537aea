"""`interpql serve` refusing to start: with bad files or settings it exits with status 2 and a
one-line message naming the file, never a traceback, and before loading anything it does not
need to find the problem."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import interpql
from interpql.backends.gpt2.loading import (
    load_weights,
    read_json_config,
    save_hf_folder,
    save_tdb_folder,
    tdb_config_from_json,
)
from interpql.file_errors import FileProblem
from interpql.loaders.sources import ExplanationStore
from interpql.specs import parse_node_id
from tests.processes import free_port


def start_up(*args: str, prefix: tuple[str, ...] = ()) -> tuple[int, str, float]:
    """Runs `interpql serve ARGS` to its end; returns its exit status, what it printed and how
    long it ran. A server that does start is a failure of the test (it is stopped)."""
    command = [*prefix, sys.executable, "-m", "interpql.cli", "serve", *args]
    if "--port" not in args:
        command += ["--port", str(free_port())]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(f"the server started: {expired.stdout!r} {expired.stderr!r}") from None
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def assert_refused(output: tuple[int, str, float], *named: str | Path) -> str:
    status, text, _ = output
    assert status == 2, text
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("interpql: cannot start:")]
    assert len(lines) == 1, text
    for name in named:
        assert str(name) in lines[0], lines[0]
    return lines[0]


TINY = ("--model", "random:tiny")


def filled_store(path: Path) -> None:
    store = ExplanationStore(path)
    for index in range(400):
        node = parse_node_id(f"random-tiny/mlp_neuron/0/{index}")
        store.add(node, f"explanation number {index} " * 5, 0.5, "scorer", "explainer")
    store.close()


def test_a_garbage_explanation_store(tmp_path: Path) -> None:
    store = tmp_path / "store.sqlite"
    store.write_bytes(b"this is not a database\n" * 100)
    line = assert_refused(start_up(*TINY, "--explanation-store", str(store)), store)
    assert "not a SQLite database" in line


def test_another_programs_database_is_not_taken_for_an_explanation_store(tmp_path: Path) -> None:
    """It was accepted, and the server created its table inside it."""
    store = tmp_path / "theirs.sqlite"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    line = assert_refused(start_up(*TINY, "--explanation-store", str(store)), store)
    assert "holds tables that are not an explanation store's (invoices)" in line
    with sqlite3.connect(store) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master")]
    assert tables == ["invoices"]
    # Nothing else made beside it by a start that was refused (a job store was).
    assert [path.name for path in tmp_path.iterdir()] == [store.name]


def test_a_store_path_whose_folders_do_not_exist_is_refused(tmp_path: Path) -> None:
    """Only the store's own folder is made: a mistyped path made a tree of folders."""
    store = tmp_path / "typo" / "deeper" / "store.sqlite"
    line = assert_refused(start_up(*TINY, "--explanation-store", str(store)), store.parent)
    assert f"{tmp_path / 'typo'} does not exist" in line
    assert list(tmp_path.iterdir()) == []


def test_an_explanation_store_with_a_corrupt_index_page(tmp_path: Path) -> None:
    store = tmp_path / "store.sqlite"
    filled_store(store)
    with sqlite3.connect(store) as db:
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        (root,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'explanations_by_node'"
        ).fetchone()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(store.read_bytes())
    start = (root - 1) * page_size
    data[start : start + page_size] = bytes([0x5A]) * page_size  # the index's root page
    store.write_bytes(bytes(data))
    line = assert_refused(start_up(*TINY, "--explanation-store", str(store)), store)
    assert "corrupt" in line


def test_a_read_only_explanation_store(tmp_path: Path) -> None:
    store = tmp_path / "store.sqlite"
    filled_store(store)
    store.chmod(0o444)
    # Root writes read-only files: run the server as root without that power (setpriv is in
    # util-linux, part of every Debian system).
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed"
    prefix = (setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--")
    line = assert_refused(start_up(*TINY, "--explanation-store", str(store), prefix=prefix), store)
    assert "not writable" in line


def test_a_garbage_autoencoder_file(tmp_path: Path) -> None:
    folder = tmp_path / "autoencoders"
    folder.mkdir()
    (folder / "0.pt").write_bytes(b"\x80\x02garbage" * 50)
    line = assert_refused(start_up(*TINY, "--mlp-autoencoder", str(folder)), folder / "0.pt")
    assert "state dict" in line


def test_weights_holding_nan_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    """They loaded, and served NaN (no GraphQL Float carries it) or silent zeros."""
    cfg, state = load_weights("random:tiny")
    state["xf_layers.0.mlp.in_layer.weight"][3, 5] = float("nan")
    folder = tmp_path / "hf"
    save_hf_folder(folder, cfg, state)
    line = assert_refused(start_up("--model", str(folder)), folder)
    assert "holds 1 NaN or infinite values" in line


def test_a_dictionary_holding_infinities_is_refused_naming_the_file(tmp_path: Path) -> None:
    from interpql.backends.dictionaries.saelens import read_saelens, saelens_config, write_saelens
    from interpql.file_errors import FileProblem
    from tests.test_dictionaries import random_tensors

    tensors = random_tensors("topk", 8, 8, 16, seed=1)
    tensors["W_dec"][2, 1] = float("inf")
    config = saelens_config("topk", 8, 16, "blocks.0.hook_resid_post", k=4)
    write_saelens(tmp_path / "sae", config, tensors)
    with pytest.raises(FileProblem, match="'W_dec' holds 1 NaN or infinite values") as raised:
        read_saelens(str(tmp_path / "sae"))
    assert "sae_weights.safetensors" in str(raised.value)


def test_weights_that_do_not_fit_their_config_are_named_on_one_line(tmp_path: Path) -> None:
    """torch's shape mismatch was two lines, naming no file."""
    folder = tmp_path / "hf"
    save_hf_folder(folder, *load_weights("random:tiny"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 2 * config["n_embd"]}))
    line = assert_refused(start_up("--model", str(folder)), folder)
    assert "the weights do not fit the config" in line and "size mismatch" in line


def test_a_truncated_safetensors_file(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    save_hf_folder(folder, *load_weights("random:tiny"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = assert_refused(start_up("--model", str(folder)), weights)
    assert "safetensors" in line


def test_bad_config_files(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    save_hf_folder(hf, *load_weights("random:tiny"))
    (hf / "config.json").write_text("{not json")
    assert_refused(start_up("--model", str(hf)), hf / "config.json")
    tdb = tmp_path / "tdb"
    save_tdb_folder(tdb, *load_weights("random:tiny"))
    config = json.loads((tdb / "config.json").read_text())
    del config["d_model"]
    (tdb / "config.json").write_text(json.dumps(config))
    line = assert_refused(start_up("--model", str(tdb)), tdb / "config.json")
    assert "d_model" in line


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"ctx_window": -5}, "ctx_window must be a whole number of at least 1, not -5"),
        ({"n_heads": 0}, "n_heads must be a whole number of at least 1, not 0"),
        ({"n_layers": 2.5}, "n_layers must be a whole number of at least 1, not 2.5"),
        ({"d_model": "128"}, "d_model must be a whole number of at least 1, not '128'"),
        ({"n_heads": 3}, "does not divide into 3 heads"),
    ],
)
def test_config_sizes_that_no_model_has_are_refused_by_name(
    tmp_path: Path, change: dict[str, object], said: str
) -> None:
    """A negative context was 'weights that do not fit' (torch's negative dimension); zero
    heads a ZeroDivisionError."""
    config = tmp_path / "config.json"
    good = {"enc": "gpt2", "ctx_window": 64, "d_model": 128, "n_layers": 2, "n_heads": 4}
    config.write_text(json.dumps(good | change))
    with pytest.raises(FileProblem, match=re.escape(said)) as refused:
        read_json_config(str(config), tdb_config_from_json)
    assert refused.value.path == str(config)


def test_a_compact_model_missing_a_tensor_is_named(tmp_path: Path) -> None:
    """The message named no file."""
    folder = tmp_path / "compact"
    folder.mkdir()
    demo = Path(interpql.__file__).parent / "data" / "tiny-stdlib"
    shutil.copy(demo / "config.json", folder)
    tensors = load_file(demo / "weights.safetensors")
    del tensors["pos_embed.weight"]
    save_file(tensors, folder / "weights.safetensors")
    line = assert_refused(start_up("--model", str(folder)), folder)
    assert "missing ['pos_embed.weight']" in line


def test_a_source_folder_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-records"
    spec = f"name=folder,kind=mlp_neuron,records={missing}"
    assert_refused(start_up(*TINY, "--source", spec), missing)


def test_a_port_in_use_is_found_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A model that takes long to build: the refusal must not wait for it.
        started = time.monotonic()
        line = assert_refused(
            start_up("--model", "random:gpt2-medium", "--port", str(port)), f"127.0.0.1:{port}"
        )
        assert "in use" in line
        refused_in = time.monotonic() - started
    building = time.monotonic()
    load_weights("random:gpt2-medium")
    assert refused_in < time.monotonic() - building


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--header-timeout", "-1"),
        ("--max-batch", "-1"),
        ("--inference-timeout", "nan"),
        ("--explainer-temperature", "inf"),
        ("--port", "99999"),
        ("--workers", "0"),
    ],
)
def test_a_number_out_of_its_bounds_is_refused_naming_the_option(flag: str, value: str) -> None:
    """Before the model loads: a limit of -1 or nan refused every request, or none, silently;
    a port out of range was a traceback."""
    status, text, _ = start_up(*TINY, flag, value)
    assert status == 2 and "Traceback" not in text, text
    [line] = [line for line in text.splitlines() if "error:" in line]
    assert f"argument {flag}: must be a finite number" in line and value in line


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--cors-origin-regex", "("), "--cors-origin-regex '(' is no regex"),
        (("--redis", "redis://127.0.0.1:99999"), "--redis redis://127.0.0.1:99999: Port out"),
        (("--redis", "redis://127.0.0.1:6390/abc"), "the database must be a number, not 'abc'"),
        (("--explanation-store", ""), "--explanation-store must name a file"),
        (("--api-key-hash", "xyz"), "--api-key-hash 'xyz': expected a key's SHA-256 digest"),
        (("--otel-endpoint", "collector:4318"), "expected an http:// or https:// URL"),
        (("--otel-endpoint", "http://collector:99999"), "Port out of range"),
    ],
)
def test_options_that_fail_later_are_refused_before_the_model_loads(
    args: tuple[str, ...], named: str
) -> None:
    """They were tracebacks, or one line only after the model had loaded, not naming the
    option."""
    assert_refused(start_up(*TINY, "--no-model", *args), named)


def test_sources_that_cannot_be_told_apart_are_refused(tmp_path: Path) -> None:
    source = f"name=t,kind=mlp_neuron,records={tmp_path}"
    twice = assert_refused(start_up(*TINY, "--source", source, "--source", source))
    assert "two node-data sources are named 't'" in twice
    repeated = assert_refused(start_up(*TINY, "--source", f"{source},records={tmp_path}"))
    assert "each of name, kind, records and explanations once" in repeated


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("export-schema", "-o", "/nonexistent/dir/schema.graphql"), "cannot write /nonexistent"),
        (("build-demo", "--only-explanations", "--out", "{empty}"), "holds no built demo"),
        (("build-demo", "--quick", "--out", "{file}"), "is a file, not a folder"),
    ],
)
def test_other_commands_refuse_in_one_line(
    tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    given = [a.format(empty=tmp_path / "empty", file=tmp_path / "file") for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "interpql.cli", *given], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("interpql: cannot") and said in line, line


def test_storage_that_cannot_be_reached_is_given_up_in_bounded_time() -> None:
    """A model on remote storage this machine cannot reach (here: an Azure account that does
    not exist, which blobfile retries forever): the load gives up after --remote-timeout
    seconds without a byte, naming what it waited for (it printed nothing for 35 minutes)."""
    url = "az://interpqlnosuchaccount/models/tiny"
    started = time.monotonic()
    line = assert_refused(start_up("--model", url, "--remote-timeout", "3"), url)
    assert "no data arrived for 3 s" in line and "--remote-timeout" in line
    assert time.monotonic() - started < 30
