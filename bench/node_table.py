"""Transformer Debugger's node table: interpql next to the bare forward and backward pass and
next to Transformer Debugger's own server code, on the same model folders and prompt.

Models (bench/tdb/export_models.py): a seeded random GPT-2-small-shaped model and the embedded
demo, written as Transformer Debugger folders that both servers read. Prompt: 39 tokens of
Python, target " True", distractor " False" (the request of issue 17).

Timed alternately in one run, each the median of --repeats after warm-up:
  bare pass       the backend's forward and backward pass of the loss, saving what the table
                  reads (the work the table cannot do without), in this process;
  table request   over HTTP to `interpql serve`: the node table (four groups, top and bottom
                  10, per-token sums; as columns) and the top and bottom 100 logits;
  full request    everything Transformer Debugger's UI request returns: the above, each row's
                  scored tokens (10 up, 10 down, 10 upvoting inputs) and attended-to tokens;
  full, rows      the same with one GraphQL object per row and per token (`rows`).
Then Transformer Debugger (commit 87e6db7, its own venv, bench/tdb/setup_venv.sh) answers its
UI's request for the same prompt through its FastAPI route in-process (bench/tdb/run_tdb.py),
and bench/tdb/compare.py checks the full request's content against its answer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.common import save, server, summary, timed
from bench.tdb.compare import compare
from bench.tdb.export_models import export
from interpql.backends.base import ForwardRequest, HookPoint, Location
from interpql.loaders.models import load_model
from interpql.loaders.node_table import table_needs
from interpql.specs import LossKind, LossSpec

PROMPT = "def check(x):\n    if x > 3:\n        return True\n    return False\n\nok = check(5) =="
TARGET, DISTRACTOR = " True", " False"
TDB_DIR = Path(__file__).parent / "tdb"
TDB_VENV = Path("/tmp/tdbvenv")

ROW = "node { id } tokenIndex keyTokenIndex activation writeNorm directEffect actTimesGrad"
SCORED = "{ token { id } value }"
COLUMNS = "nodeIds tokenIndex keyTokenIndex activation writeNorm directEffect actTimesGrad"
TOKEN_COLUMNS = "{ ids values }"
SUMS = "tokenSums { embedding mlp attentionFrom attentionTo }"


def query(model: str, form: str) -> str:
    """form: "table" (columns, no tokens), "full" (columns with every row's tokens) or
    "full_rows" (the same as one object per row)."""
    if form == "full_rows":
        table = (
            f"rows {{ {ROW} upvotedOutputTokens {SCORED} downvotedOutputTokens {SCORED} "
            f"upvotingInputTokens {SCORED} attendedToTokens {{ tokenIndex value }} }}"
        )
    else:
        extras = (
            f"upvotedOutputTokens {TOKEN_COLUMNS} downvotedOutputTokens {TOKEN_COLUMNS} "
            f"upvotingInputTokens {TOKEN_COLUMNS} attendedToTokens {{ tokenIndex values }}"
        )
        table = f"columns {{ {COLUMNS} {extras if form == 'full' else ''} }}"
    loss = f'{{kind: LOGIT_DIFF, targetTokens: ["{TARGET}"], distractorTokens: ["{DISTRACTOR}"]}}'
    return f"""query($p: String!) {{ model(name: "{model}") {{
      infer(input: {{prompt: $p, loss: {loss}}}) {{
        objective tokens {{ id text }}
        nodeTable(k: 10) {{ {table} {SUMS} }}
        topPredictions(k: 100) {{ token {{ id }} logit }}
        bottomPredictions(k: 100) {{ token {{ id }} logit }}
    }} }} }}"""


def rows_of(columns: dict[str, Any]) -> list[dict[str, Any]]:
    """The columns' rows, in NodeTableRow's shape (for compare.py)."""
    rows = []
    for i, node in enumerate(columns["nodeIds"]):
        row: dict[str, Any] = {"node": {"id": node}}
        for field in COLUMNS.split()[1:]:
            row[field] = columns[field][i]
        for field in ("upvotedOutputTokens", "downvotedOutputTokens"):
            ids, values = columns[field]["ids"][i], columns[field]["values"][i]
            row[field] = [
                {"token": {"id": t}, "value": v} for t, v in zip(ids, values, strict=True)
            ]
        rows.append(row)
    return rows


def bare_pass(folder: Path) -> tuple[Any, Any]:
    """The backend and the forward-and-backward request that computes what the table reads."""
    entry = load_model(str(folder), name="bare")
    backend = entry.require_backend()
    layers = range(entry.architecture.n_layers)
    ranked = [(0, "token_embedding")] + [
        (layer, kind) for layer in layers for kind in ("attention_head", "mlp_neuron")
    ]
    needs = table_needs(entry, ranked)
    final = HookPoint(entry.architecture.n_layers - 1, Location.RESID_POST)
    [target], [distractor] = (backend.tokenizer.encode(t) for t in (TARGET, DISTRACTOR))
    request = ForwardRequest(
        tokens=(tuple(backend.tokenizer.encode(PROMPT)),),
        save=needs.hook_points(entry),
        backward=LossSpec(kind=LossKind.LOGIT_DIFF, targets=(target,), distractors=(distractor,)),
        save_grads=needs.gradient_points(entry, final),
        frozen_norm_inputs=frozenset({final}),
    )
    return backend, request


def run_tdb(folder: Path, repeats: int, out: Path) -> dict[str, Any]:
    python = TDB_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["bash", str(TDB_DIR / "setup_venv.sh"), str(TDB_VENV)], check=True)
    subprocess.run(
        [
            str(python),
            str(TDB_DIR / "run_tdb.py"),
            *("--model-dir", str(folder), "--prompt", PROMPT),
            *("--target", TARGET, "--distractor", DISTRACTOR, "--k", "10"),
            *("--repeats", str(repeats), "--out", str(out)),
        ],
        check=True,
    )
    found: dict[str, Any] = json.loads(out.read_text())
    return found


def measure(name: str, folder: Path, repeats: int, tdb_repeats: int) -> dict[str, Any]:
    backend, request = bare_pass(folder)
    forms = ("table", "full", "full_rows")
    bodies = {form: {"query": query(name, form), "variables": {"p": PROMPT}} for form in forms}
    times: dict[str, list[float]] = {"bare": [], **{form: [] for form in forms}}
    answers: dict[str, Any] = {}
    args = ("--model", str(folder), "--name", name, "--cached-runs", "0")
    with server(*args) as url, httpx.Client(timeout=300) as client:

        def post(kind: str) -> None:
            response = client.post(url + "/graphql", json=bodies[kind])
            answer = orjson.loads(response.content)
            assert "errors" not in answer, answer["errors"]
            answers[kind] = (answer, len(response.content))

        for _ in range(3):  # warm-up
            backend.forward(request)
            for form in forms:
                post(form)
        for _ in range(repeats):
            times["bare"].append(timed(lambda: backend.forward(request)))
            for form in forms:
                times[form].append(timed(lambda form=form: post(form)))
    tdb = run_tdb(folder, tdb_repeats, Path(f"/tmp/tdb-node-table-{name}.json"))
    full, full_bytes = answers["full"]
    infer = full["data"]["model"]["infer"]
    infer["nodeTable"]["rows"] = rows_of(infer["nodeTable"]["columns"])
    token_text = {
        t: backend.tokenizer.decode([t])
        for row in infer["nodeTable"]["rows"]
        for field in ("upvotedOutputTokens", "downvotedOutputTokens")
        for t in (s["token"]["id"] for s in row[field])
    }
    figures = {kind: summary(values) for kind, values in times.items()}
    tdb_route = tdb["timings"]["route"]["median_ms"]
    return {
        "model": name,
        "prompt_tokens": len(request.tokens[0]),
        **figures,
        "table_over_bare": figures["table"]["median_ms"] / figures["bare"]["median_ms"],
        "full_over_bare": figures["full"]["median_ms"] / figures["bare"]["median_ms"],
        "table_response_bytes": answers["table"][1],
        "full_response_bytes": full_bytes,
        "full_rows_response_bytes": answers["full_rows"][1],
        "tdb_route_median_ms": tdb_route,
        "tdb_handler_median_ms": tdb["timings"]["handler"]["median_ms"],
        "tdb_response_bytes": tdb["timings"]["route_response_bytes"],
        "tdb_over_full": tdb_route / figures["full"]["median_ms"],
        "content": compare(infer, tdb, token_text),
    }


def main(
    repeats: int = 15, tdb_repeats: int = 5, out: str = "/tmp/interpql-tdb-models"
) -> dict[str, Any]:
    folders = export(Path(out))
    result = {
        "runs": [measure(name, folder, repeats, tdb_repeats) for name, folder in folders.items()],
        "targets": {"table_over_bare": 1.3, "tdb_over_full": 3.0, "full_ms_gpt2_small": 2850},
    }
    save("node_table", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tdb-repeats", type=int, default=5)
    parser.add_argument("--out", default="/tmp/interpql-tdb-models", help="where the folders go")
    options = parser.parse_args()
    main(options.repeats, options.tdb_repeats, options.out)
