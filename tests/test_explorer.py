"""The explorer (/explore) in Debian's chromium: each view (the node table; an ablation beside
the original; a head's attention; a trace; a steered generation; a shared URL reloaded; bad
input) shows what the API answers to the very request the page made, each view makes one
request, and that request asks for the fields the page shows. Screenshots go to
test-artifacts/."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from graphql import FieldNode, parse, visit
from graphql.language import Visitor
from playwright.sync_api import Page, WebSocket, expect

from tests.test_browser import Served, browser, page, screenshot, served  # noqa: F401

PROMPT = "import os\nimport sys\nimport"

# What the table view shows, field by field: the tokens and their losses and act x grad sums,
# the loss, the top predictions and the node table's rows.
TABLE_FIELDS = {
    "model", "infer", "tokens", "index", "text", "loss", "tokenLosses", "topPredictions",
    "token", "probability", "nodeTable", "rows", "node", "id", "kind", "dictionary",
    "layerIndex", "bestExplanation", "tokenIndex", "keyTokenIndex", "activation", "writeNorm",
    "directEffect", "actTimesGrad", "tokenSums", "embedding", "mlp", "attentionFrom",
    "attentionTo",
}  # fmt: skip
# What the page asks once when it opens, for its controls: the models and their sets.
SERVED_FIELDS = {"models", "name", "dictionaries", "transcoder", "hookIn"}


class Requests:
    """The page's GraphQL requests: each view's (HTTP bodies), the one it makes on opening
    for its controls (`opening`), subscriptions (WebSocket messages) and uncaught errors."""

    def __init__(self, tab: Page) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.opening: list[dict[str, Any]] = []
        self.subscriptions: list[dict[str, Any]] = []
        self.page_errors: list[str] = []
        tab.on("request", self._request)
        tab.on("websocket", self._websocket)
        tab.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def _request(self, request: Any) -> None:
        if request.url.endswith("/graphql") and request.method == "POST":
            body = json.loads(request.post_data or "{}")
            opening = "query ExploreServed" in body.get("query", "")
            (self.opening if opening else self.bodies).append(body)

    def _websocket(self, socket: WebSocket) -> None:
        def sent(payload: str | bytes) -> None:
            message = json.loads(payload)
            if message.get("type") == "subscribe":
                self.subscriptions.append(message["payload"])

        socket.on("framesent", sent)


@pytest.fixture
def requests(page: Page) -> Iterator[Requests]:  # noqa: F811
    yield Requests(page)


def replay(served: Served, body: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    """The API's answer to the page's own request."""
    answer: dict[str, Any] = httpx.post(served.url + "/graphql", json=body, timeout=60).json()
    return answer


def fields_of(query: str) -> set[str]:
    found: set[str] = set()

    class Fields(Visitor):
        def enter_field(self, node: FieldNode, *_: Any) -> None:
            found.add(node.name.value)

    visit(parse(query), Fields())
    return found


def row_key(row: dict[str, Any]) -> str:
    key = row["keyTokenIndex"]
    return f"{row['node']['id']}@{row['tokenIndex']}" + ("" if key is None else f">{key}")


def values(tab: Page, selector: str) -> list[float]:
    found: list[str] = tab.locator(selector).evaluate_all("es => es.map(e => e.dataset.value)")
    return [float(v) for v in found]


def check_table(tab: Page, scope: str, answer: dict[str, Any]) -> None:
    """The rows shown under `scope` are the answer's, value for value."""
    rows = answer["nodeTable"]["rows"]
    shown = tab.locator(f"{scope} table.node-table tbody tr")
    expect(shown).to_have_count(len(rows))
    keys = shown.evaluate_all("rs => rs.map(r => r.dataset.row)")
    assert keys == [row_key(r) for r in rows]
    for i in (0, len(rows) // 2, len(rows) - 1):
        cells = values(tab, f"{scope} table.node-table tbody tr >> nth={i} >> td.number")
        row = rows[i]
        expected = [row["activation"], row["writeNorm"], row["directEffect"], row["actTimesGrad"]]
        assert cells == pytest.approx(expected, rel=1e-6, abs=1e-9)
        explanation = (row["node"]["bestExplanation"] or {}).get("text", "")
        text = tab.locator(f"{scope} table.node-table tbody tr >> nth={i} >> td.explanation")
        assert text.inner_text() == explanation


def open_table(page: Page, served: Served, requests: Requests) -> dict[str, Any]:  # noqa: F811
    params = httpx.QueryParams({"prompt": PROMPT})
    page.goto(f"{served.url}/explore?{params}")
    expect(page.locator('#view[data-view="table"]')).to_be_visible()
    assert len(requests.bodies) == 1
    answer = replay(served, requests.bodies[0])
    assert "errors" not in answer, answer
    data: dict[str, Any] = answer["data"]
    return data


def test_the_table_view(page: Page, served: Served, requests: Requests) -> None:  # noqa: F811
    data = open_table(page, served, requests)
    assert fields_of(requests.bodies[0]["query"]) == TABLE_FIELDS
    [opening] = requests.opening
    assert fields_of(opening["query"]) == SERVED_FIELDS
    found = data["model"]["infer"]
    assert values(page, ".pass .loss") == pytest.approx([found["loss"]])
    losses = [0.0 if v is None else v for v in found["tokenLosses"]]
    assert values(page, ".tokens .token") == pytest.approx(losses, rel=1e-6)
    assert page.locator(".tokens .token").all_inner_texts() == [
        t["text"].replace("\n", "↵") for t in found["tokens"]
    ]
    check_table(page, "#view", found)
    shown = page.locator(".predictions li").evaluate_all("ls => ls.map(l => l.dataset.probability)")
    assert [float(p) for p in shown] == pytest.approx(
        [p["probability"] for p in found["topPredictions"]]
    )
    # Colouring by an act x grad sum is the same answer, shown another way: no new request.
    page.locator("#colour").select_option("mlp")
    page.locator("#run").click()
    expect(page.locator('.tokens[aria-label="tokens coloured by mlp"]')).to_be_visible()
    assert len(requests.bodies) == 1
    assert values(page, ".tokens .token") == pytest.approx(found["nodeTable"]["tokenSums"]["mlp"])
    # Any attached dictionary can stand for a side: the demo's transcoders for the MLPs.
    page.locator("#mlp").select_option("transcoder")
    page.locator("#run").click()
    expect(page.locator("#view td >> text=transcoder").first).to_be_visible()
    assert len(requests.bodies) == 2
    assert requests.bodies[1]["variables"]["input"]["mlpDictionary"] == "transcoder"
    latents = replay(served, requests.bodies[1])["data"]["model"]["infer"]
    assert any(r["node"]["dictionary"] == "transcoder" for r in latents["nodeTable"]["rows"])
    check_table(page, "#view", latents)
    link = page.locator("#graph-link").get_attribute("href") or ""
    assert link.startswith("/graph?") and "dictionary=transcoder" in link
    screenshot(page, "explore-table.png")


def first_row(data: dict[str, Any], kind: str) -> int:
    rows = data["model"]["infer"]["nodeTable"]["rows"]
    return next(i for i, r in enumerate(rows) if r["node"]["kind"] == kind)


def test_ablating_a_node_shows_the_difference(
    page: Page,  # noqa: F811
    served: Served,  # noqa: F811
    requests: Requests,
) -> None:
    data = open_table(page, served, requests)
    row = first_row(data, "MLP_NEURON")
    button = page.locator(f"#view table.node-table tbody tr >> nth={row} >> button").first
    button.focus()
    page.keyboard.press("Enter")  # keyboard-usable
    expect(page.locator('#view[data-view="ablate"]')).to_be_visible()
    assert len(requests.bodies) == 2
    answer = replay(served, requests.bodies[1])["data"]["model"]
    original, ablated = answer["original"], answer["ablated"]
    assert values(page, ".ablated .pass .loss") == pytest.approx([ablated["loss"]])
    assert values(page, ".original .pass .loss") == pytest.approx([original["loss"]])
    check_table(page, ".ablated", ablated)
    changed = page.locator(".ablated td.diff-changed, .ablated tr.diff-new").count()
    assert changed > 0
    screenshot(page, "explore-ablate.png")
    # A shared URL opens the same view with the same numbers.
    page.reload()
    expect(page.locator('#view[data-view="ablate"]')).to_be_visible()
    assert values(page, ".ablated .pass .loss") == pytest.approx([ablated["loss"]])


def test_a_heads_attention_heatmap(page: Page, served: Served, requests: Requests) -> None:  # noqa: F811
    data = open_table(page, served, requests)
    row = first_row(data, "ATTENTION_HEAD")
    page.locator(
        f"#view table.node-table tbody tr >> nth={row} >> button:has-text('attention')"
    ).click()
    expect(page.locator('#view[data-view="head"]')).to_be_visible()
    assert len(requests.bodies) == 2
    assert fields_of(requests.bodies[1]["query"]) == {
        "model", "infer", "activations", "tokens", "index", "text", "attentionPattern",
        "tokenPairAttribution",
    }  # fmt: skip
    [head] = replay(served, requests.bodies[1])["data"]["model"]["infer"]["activations"]
    n = len(head["tokens"])
    pattern = values(page, "#pattern rect.cell")
    assert len(pattern) == n * n
    assert pattern == pytest.approx([v for row in head["attentionPattern"] for v in row], abs=1e-7)
    pairs = values(page, "#pair-attribution rect.cell")
    assert pairs == pytest.approx(
        [v for row in head["tokenPairAttribution"] for v in row], rel=1e-6, abs=1e-9
    )
    screenshot(page, "explore-head.png", full_page=True)


def test_tracing_from_a_node(page: Page, served: Served, requests: Requests) -> None:  # noqa: F811
    data = open_table(page, served, requests)
    row = first_row(data, "MLP_NEURON")
    page.locator(
        f"#view table.node-table tbody tr >> nth={row} >> button:has-text('trace')"
    ).click()
    expect(page.locator('#view[data-view="trace"]')).to_be_visible()
    assert len(requests.bodies) == 2
    found = replay(served, requests.bodies[1])["data"]["model"]["infer"]
    assert values(page, ".objective") == pytest.approx([found["objective"]])
    check_table(page, "#view", found)
    screenshot(page, "explore-trace.png")


def test_steering_streams_a_continuation(
    page: Page,  # noqa: F811
    served: Served,  # noqa: F811
    requests: Requests,
) -> None:
    data = open_table(page, served, requests)
    row = first_row(data, "MLP_NEURON")
    page.locator(
        f"#view table.node-table tbody tr >> nth={row} >> button:has-text('steer')"
    ).click()
    expect(page.locator('#view[data-view="steer"]')).to_be_visible()
    expect(page.locator("#status")).to_have_text("")  # the stream has ended
    assert len(requests.bodies) == 1 and len(requests.subscriptions) == 1
    given = requests.subscriptions[0]
    answer = replay(
        served,
        {
            "query": "query($m: String!, $i: GenerateInput!) { model(name: $m) { generate(input: $i) "
            "{ unsteered { text } steered { text } } } }",
            "variables": {"m": given["variables"]["model"], "i": given["variables"]["input"]},
        },
    )["data"]["model"]["generate"]
    assert page.locator("#unsteered mark").inner_text() == answer["unsteered"]["text"]
    assert page.locator("#steered mark").inner_text() == answer["steered"]["text"]
    assert answer["steered"]["text"] != answer["unsteered"]["text"]
    screenshot(page, "explore-steer.png", full_page=True)


@pytest.mark.parametrize(
    "params",
    [{"prompt": "x " * 400}, {"prompt": PROMPT, "target": " os", "distractor": "requests"}],
    ids=["too long", "distractor of two tokens"],
)
def test_bad_input_shows_the_apis_error(
    page: Page,  # noqa: F811
    served: Served,  # noqa: F811
    requests: Requests,
    params: dict[str, str],
) -> None:
    page.goto(f"{served.url}/explore?{httpx.QueryParams(params)}")
    expect(page.locator("#status.error")).not_to_be_empty()
    [error] = replay(served, requests.bodies[0])["errors"]
    expect(page.locator("#status")).to_have_text(
        f"{error['extensions']['code']}: {error['message']}"
    )
    assert not math.isnan(len(requests.bodies))


@pytest.mark.parametrize(
    ("params", "notice"),
    [
        ({"colour": "bogus"}, 'colour="bogus" is not one of loss, embedding, mlp'),
        ({"k": "many"}, 'k="many" is no number: 5 is used.'),
        ({"mlp": "bogus"}, 'tiny-stdlib has no dictionary set "bogus"'),
    ],
    ids=["colour", "k", "dictionary"],
)
def test_what_a_stale_url_gets_wrong_is_said_and_can_be_changed(
    page: Page,  # noqa: F811
    served: Served,  # noqa: F811
    requests: Requests,
    params: dict[str, str],
    notice: str,
) -> None:
    """`?colour=bogus` crashed the page; `?mlp=bogus` left a select that could not be changed
    back (its only option already chosen), so no click recovered the page."""
    page.goto(f"{served.url}/explore?{httpx.QueryParams({'prompt': PROMPT, **params})}")
    expect(page.locator("#notices")).to_contain_text(notice)
    if "mlp" in params:
        expect(page.locator("#status.error")).to_contain_text("INVALID_ARGUMENT")
        assert page.locator("#mlp").input_value() == "bogus"
        page.locator("#mlp").select_option("")  # neurons
        page.locator("#run").click()
        expect(page.locator("#notices")).to_have_count(0)
    expect(page.locator('#view[data-view="table"]')).to_be_visible()
    answer = replay(served, requests.bodies[-1])["data"]["model"]["infer"]
    check_table(page, "#view", answer)
    assert requests.page_errors == []


def test_a_view_opened_from_its_url_shows_its_choices(
    page: Page,  # noqa: F811
    served: Served,  # noqa: F811
    requests: Requests,
) -> None:
    """An ablation over transcoders opened from its URL showed "neurons" in the MLP select:
    the sets were known only after a table view."""
    node = "tiny-stdlib/mlp_neuron/1/149"
    params = {"prompt": PROMPT, "view": "ablate", "mlp": "transcoder", "node": node, "at": "3"}
    page.goto(f"{served.url}/explore?{httpx.QueryParams(params)}")
    expect(page.locator('#view[data-view="ablate"]')).to_be_visible()
    assert page.locator("#mlp").input_value() == "transcoder"
    assert requests.bodies[0]["variables"]["input"]["mlpDictionary"] == "transcoder"
    assert requests.page_errors == []


def test_the_attention_view_of_a_node_that_is_no_head_says_so(
    page: Page,  # noqa: F811
    served: Served,  # noqa: F811
    requests: Requests,
) -> None:
    """It drew two empty heatmaps."""
    params = {"prompt": PROMPT, "view": "head", "node": "tiny-stdlib/mlp_neuron/1/149"}
    page.goto(f"{served.url}/explore?{httpx.QueryParams(params)}")
    expect(page.locator("#status.error")).to_have_text(
        "tiny-stdlib/mlp_neuron/1/149 is no attention head: only heads have an attention pattern."
    )
    expect(page.locator("figure.heatmap")).to_have_count(0)
    assert requests.page_errors == []
