"""GraphiQL and the node viewer in a real browser: Debian's chromium driven by Playwright.

Every request the pages make to anything but the server is refused and recorded, so these tests
also prove that both pages work offline. Screenshots go to test-artifacts/. What the pages show is
checked against the server's own answers, so the tests hold for whichever default model it serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, Route, expect, sync_playwright

from tests.test_server import ROOT, serve

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "def area(r): return 3.14 * r * r"


@dataclass(frozen=True)
class Served:
    url: str
    model: dict[str, Any]  # the default model, as `{ models { ... } }` gives it
    node: str  # the MLP neuron of layer 0 most active on PROMPT: a lively page to look at

    def query(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(
            self.url + "/graphql", json={"query": query, "variables": variables or {}}, timeout=30
        )
        body: dict[str, Any] = response.json()
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serve() as url:
        probe = Served(url, {}, "")
        [model] = probe.query("{ models { name backend nLayers dModel } }")["models"]
        layer = probe.query(
            "query($m: String!, $p: String!) { model(name: $m) { infer(input: {prompt: $p}) "
            "{ layerActivations(layer: 0, kind: MLP_NEURON) { values } } } }",
            {"m": model["name"], "p": PROMPT},
        )["model"]["infer"]["layerActivations"]["values"]
        peaks = [max(column) for column in zip(*layer, strict=True)]
        yield Served(url, model, f"{model['name']}/mlp_neuron/0/{peaks.index(max(peaks))}")


@contextmanager
def chromium(profile: Path, timeout_ms: int = 20_000) -> Iterator[BrowserContext]:
    """Debian's chromium, headless, driven by Playwright."""
    assert CHROMIUM.exists(), "Debian's chromium is needed: `make test` installs it"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        context.set_default_timeout(timeout_ms)
        yield context
        context.close()


@contextmanager
def offline_page(context: BrowserContext, server: str) -> Iterator[Page]:
    """A page whose requests to anything but `server` are refused; at the end, none may have
    been asked for and the page may have raised nothing."""
    page = context.new_page()
    outside: list[str] = []
    errors: list[str] = []

    def only_the_server(route: Route) -> None:
        if route.request.url.startswith(server):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_server)
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    page.close()
    assert outside == [], f"the page asked for outside resources: {outside}"
    assert errors == [], f"the page raised: {errors}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(browser: BrowserContext, served: Served) -> Iterator[Page]:
    with offline_page(browser, served.url) as page:
        yield page


def screenshot(page: Page, name: str, full_page: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=full_page)


def alpha(css_colour: str) -> float:
    match = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", css_colour)
    assert match is not None, css_colour
    return 1.0 if match[4] is None else float(match[4])


def background_colours(page: Page, selector: str) -> list[str]:
    colours: list[str] = page.locator(selector).evaluate_all(
        "ts => ts.map(t => getComputedStyle(t).backgroundColor)"
    )
    return colours


def test_graphiql_runs_a_typed_query(page: Page, served: Served) -> None:
    page.goto(served.url + "/graphql")
    editor = page.locator(".graphiql-query-editor .CodeMirror").first
    expect(editor).to_be_visible()
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    # Inserted like a paste: typed key by key, CodeMirror would close every brace a second time.
    page.keyboard.insert_text(
        f'{{\n  model(name: "{served.model["name"]}") {{\n    name\n    backend\n    nLayers\n'
        "    dModel\n    nodeKinds { kind count }\n  }\n}\n"
    )
    page.keyboard.press("Control+Enter")
    response = page.locator(".graphiql-response")
    expect(response).to_contain_text(f'"name": "{served.model["name"]}"')
    text = response.inner_text()
    assert f'"backend": "{served.model["backend"]}"' in text
    assert f'"nLayers": {served.model["nLayers"]}' in text
    assert f'"dModel": {served.model["dModel"]}' in text
    assert '"kind": "MLP_NEURON"' in text
    screenshot(page, "graphiql.png")


def test_graphiql_docs_show_descriptions(page: Page, served: Served) -> None:
    page.goto(served.url + "/graphql")
    page.get_by_role("button", name=re.compile("documentation", re.IGNORECASE)).first.click()
    docs = page.locator(".graphiql-doc-explorer")
    docs.get_by_text("Query", exact=True).first.click()
    expect(docs).to_contain_text("Every model this server serves.")
    docs.get_by_text("node", exact=True).first.click()
    expect(docs).to_contain_text("One node by id")


def test_viewer_colours_a_prompt_and_shows_what_is_stored(page: Page, served: Served) -> None:
    stored = served.query(
        "query($id: ID!) { node(id: $id) { topActivations { tokens } bestExplanation { text } } }",
        {"id": served.node},
    )["node"]
    page.goto(f"{served.url}/viewer?node={served.node}&prompt={PROMPT}")
    expect(page.locator("#status")).to_have_text(served.node)
    tokens = page.locator("#live .token")
    expect(tokens.first).to_be_visible()
    assert "".join(tokens.all_inner_texts()) == PROMPT
    values = [float(v) for v in tokens.evaluate_all("ts => ts.map(t => t.dataset.activation)")]
    colours = background_colours(page, "#live .token")
    # The strongest activation has the strongest colour, and the colours vary with the values.
    strongest = max(range(len(values)), key=lambda i: abs(values[i]))
    assert alpha(colours[strongest]) == max(map(alpha, colours)) > 0.5, colours
    assert len(set(colours)) > 3, colours
    # Records and explanations where the model has them; where not, the page says so.
    if stored["topActivations"]:
        expect(page.locator("#records .record")).to_have_count(len(stored["topActivations"]))
    else:
        expect(page.locator("#records")).to_contain_text("No dataset examples are stored")
    if stored["bestExplanation"]:
        expect(page.locator("#explanation")).to_contain_text(stored["bestExplanation"]["text"])
    else:
        expect(page.locator("#explanation")).to_contain_text("No explanation is stored")
    screenshot(page, "viewer.png")


def test_viewer_changes_node_from_its_text_box(page: Page, served: Served) -> None:
    page.goto(f"{served.url}/viewer?node={served.node}&prompt=hello world")
    expect(page.locator("#live .token")).to_have_count(2)
    other = f"{served.model['name']}/attention_head/0/1"
    page.locator("#node-input").fill(other)
    page.locator("#show").click()
    expect(page.locator("#status")).to_have_text(other)
    assert f"node={other}&" in page.url
    page.locator("#node-input").fill(f"{served.model['name']}/mlp_neuron/999/0")
    page.locator("#show").click()
    expect(page.locator("#status")).to_contain_text("INVALID_NODE")


def test_viewer_without_a_node_opens_the_first_models_first_neuron(
    page: Page, served: Served
) -> None:
    page.goto(f"{served.url}/viewer")
    first = f"{served.model['name']}/mlp_neuron/0/0"
    expect(page.locator("#status")).to_have_text(first)
    expect(page.locator("#node-input")).to_have_value(first)


# Stored examples and an explanation, as a model with records has them.
RECORDS = [
    {
        "tokens": ["for", " i", " in", " range", "(", "10", "):"],
        "activations": [0.0, 0.1, 0.3, 2.4, 0.9, 0.2, -0.05],
        "normalizedActivations": [0, 0, 1, 10, 4, 1, 0],
    },
    {
        "tokens": ["x", " =", " range", "(", "n", ")"],
        "activations": [0.0, 0.05, 1.9, 0.6, 0.1, 0.0],
        "normalizedActivations": [0, 0, 8, 3, 0, 0],
    },
]
EXPLANATION = {"text": "the builtin range and its opening parenthesis", "score": 0.61}


def test_viewer_shows_records_and_explanation(page: Page, served: Served) -> None:
    def with_records(route: Route) -> None:
        # The real server answers the viewer's query; these records replace what it stores.
        if "topActivations" not in (route.request.post_data or ""):
            route.fallback()
            return
        response = route.fetch()
        body: dict[str, Any] = response.json()
        body["data"]["node"].update(topActivations=RECORDS, bestExplanation=EXPLANATION)
        route.fulfill(response=response, body=json.dumps(body))

    page.route(served.url + "/graphql", with_records)
    page.goto(f"{served.url}/viewer?node={served.node}&prompt={PROMPT}")
    records = page.locator("#records .record")
    expect(records).to_have_count(2)
    expect(records.nth(0).locator(".token")).to_have_count(7)
    colours = background_colours(page, "#records .record >> nth=0 >> .token")
    assert alpha(colours[3]) == max(map(alpha, colours)) > 0.5, colours  # " range": 10 of 10
    expect(records.nth(1)).to_contain_text("max 1.900")
    expect(page.locator("#explanation")).to_contain_text(EXPLANATION["text"])
    expect(page.locator("#explanation")).to_contain_text("score 0.61")
    expect(page.locator("#live .token").first).to_be_visible()
    screenshot(page, "viewer-records.png")


GRAPH_PROMPT = "import os\nimport sys\nimport"


def test_graph_page_draws_the_apis_graph_and_explains_a_latent(page: Page, served: Served) -> None:
    model = served.model["name"]
    graph = served.query(
        "query($m: String!, $p: String!) { model(name: $m) { attributionGraph(input: "
        '{prompt: $p, dictionary: "transcoder"}) { id nodes { id type influence activation '
        "node { id } } edges { weight } } } }",
        {"m": model, "p": GRAPH_PROMPT},
    )["model"]["attributionGraph"]
    params = httpx.QueryParams({"model": model, "dictionary": "transcoder", "prompt": GRAPH_PROMPT})
    page.goto(f"{served.url}/graph?{params}")
    expect(page.locator("#status")).to_have_text(graph["id"])
    expect(page.locator("#graph .node")).to_have_count(len(graph["nodes"]))
    expect(page.locator("#graph .edge")).to_have_count(len(graph["edges"]))
    for kind in ("embedding", "feature", "logit"):
        assert page.locator(f"#graph .node.{kind}").count() == sum(
            n["type"] == kind.upper() for n in graph["nodes"]
        )
    # Edges coloured by sign.
    positives = sum(e["weight"] >= 0 for e in graph["edges"])
    assert page.locator("#graph .edge.positive").count() == positives
    screenshot(page, "graph.png", full_page=True)
    feature = max(
        (n for n in graph["nodes"] if n["type"] == "FEATURE"), key=lambda n: n["influence"]
    )
    stored = served.query(
        "query($id: ID!, $p: String!) { node(id: $id) { bestExplanation { text } "
        "topActivations(first: 5) { tokens } activations(prompt: $p) { values } } }",
        {"id": feature["node"]["id"], "p": "<|endoftext|>" + GRAPH_PROMPT},
    )["node"]
    page.locator(f'#graph .node[data-id="{feature["id"]}"]').click()
    details = page.locator("#details")
    expect(details.locator(".activation-here")).to_contain_text(f"{feature['activation']:.4f}")
    if stored["bestExplanation"]:
        expect(details.locator(".explanation")).to_contain_text(stored["bestExplanation"]["text"])
    expect(details.locator(".record.top")).to_have_count(len(stored["topActivations"]))
    live = details.locator(".record.live .token")
    expect(live).to_have_count(len(stored["activations"]["values"]))
    shown = [float(v) for v in live.evaluate_all("ts => ts.map(t => t.dataset.activation)")]
    assert shown == pytest.approx(stored["activations"]["values"])
    assert f"node={feature['id']}" in page.url
    screenshot(page, "graph-feature.png", full_page=True)
    # The state is in the URL: reloading opens the same latent.
    page.reload()
    expect(page.locator("#graph .node.selected")).to_have_count(1)
    expect(details.locator(".activation-here")).to_contain_text(f"{feature['activation']:.4f}")


def test_graph_page_shows_the_apis_error(page: Page, served: Served) -> None:
    params = httpx.QueryParams({"model": served.model["name"], "prompt": "x" * 2000})
    page.goto(f"{served.url}/graph?{params}")
    expect(page.locator("#status.error")).to_contain_text("PROMPT_TOO_LONG")


class HeldRequests:
    """Holds the page's GraphQL requests whose body contains `marker` until released: a slow
    answer, arriving after the page asked something else."""

    def __init__(self, page: Page, server: str, marker: str) -> None:
        self.held: list[Route] = []
        self.marker = marker
        page.route(server + "/graphql", self._route)

    def _route(self, route: Route) -> None:
        if self.marker in (route.request.post_data or "") and not self.held:
            self.held.append(route)  # only the first: the later ones are answered at once
        else:
            route.fallback()

    def release(self, page: Page) -> None:
        [route] = self.held
        route.fallback()
        page.wait_for_timeout(1500)  # time for the late answer to arrive and be (not) shown


def test_viewer_clears_the_node_shown_before_when_a_load_fails(page: Page, served: Served) -> None:
    """The explanation, records and live activations of the previous node stayed on screen
    under the failed node's URL."""
    page.goto(f"{served.url}/viewer?node={served.node}&prompt={PROMPT}")
    expect(page.locator("#live .token").first).to_be_visible()
    page.locator("#node-input").fill(f"{served.model['name']}/mlp_neuron/0/99999")
    page.locator("#show").click()
    expect(page.locator("#status.error")).to_contain_text("INVALID_NODE")
    for section in ("#explanation", "#live", "#records"):
        expect(page.locator(section)).to_have_text("—")
    expect(page.locator(".token")).to_have_count(0)


def test_viewer_shows_the_latest_node_asked_for(page: Page, served: Served) -> None:
    """A slow answer for the node asked for first was shown under the second one's URL."""
    first = f"{served.model['name']}/mlp_neuron/0/0"
    second = f"{served.model['name']}/mlp_neuron/0/1"
    slow = HeldRequests(page, served.url, f'"{first}"')
    page.goto(f"{served.url}/viewer?node={first}&prompt={PROMPT}")
    expect(page.locator("#status")).to_have_text(f"Loading {first}…")
    page.locator("#node-input").fill(second)
    page.locator("#show").click()
    expect(page.locator("#status")).to_have_text(second)
    expected = served.query(
        "query($id: ID!, $p: String!) { node(id: $id) { activations(prompt: $p) { values } } }",
        {"id": second, "p": PROMPT},
    )["node"]["activations"]["values"]
    slow.release(page)
    expect(page.locator("#status")).to_have_text(second)
    live = page.locator("#live .token")
    shown = [float(v) for v in live.evaluate_all("ts => ts.map(t => t.dataset.activation)")]
    assert shown == pytest.approx(expected)


def test_pages_say_when_the_server_answers_no_graphql(page: Page, served: Served) -> None:
    """A proxy's HTML error page was shown as JSON.parse's words."""
    page.route(
        served.url + "/graphql",
        lambda route: route.fulfill(status=502, body="<html><body>Bad Gateway</body></html>"),
    )
    page.goto(f"{served.url}/viewer?node={served.node}")
    expect(page.locator("#status.error")).to_have_text(
        "The server answered 502 without a GraphQL body."
    )
    page.goto(f"{served.url}/graph")
    expect(page.locator("#status.error")).to_have_text(
        "The server answered 502 without a GraphQL body."
    )


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"model": "no-such-model"}, 'No model "no-such-model" is served here (served: '),
        ({"dictionary": "res-sae"}, '"res-sae" is no transcoder set of '),
    ],
    ids=["model", "dictionary"],
)
def test_graph_page_says_what_its_url_names_wrongly(
    page: Page, served: Served, params: dict[str, str], said: str
) -> None:
    """An unknown model showed "Cannot read properties of undefined" and left the form to
    submit itself; a set that is no transcoder was quietly replaced and traced."""
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.post_data or "") if r.method == "POST" else None)
    page.goto(f"{served.url}/graph?{httpx.QueryParams({'prompt': GRAPH_PROMPT, **params})}")
    expect(page.locator("#status.error")).to_contain_text(said)
    assert not any("attributionGraph" in body for body in requests)
    # The form still works: Trace draws the chosen model's graph.
    page.locator("#trace").click()
    expect(page.locator("#graph .node").first).to_be_visible()
    assert page.url.endswith(".json") is False and "/graph?" in page.url


def test_graph_page_shows_the_latest_trace_and_the_latest_node(page: Page, served: Served) -> None:
    """A slow first graph was drawn under the second prompt; two clicked latents' details
    were mixed under the second one's heading."""
    second_prompt = "def f(x):\n    return"
    slow = HeldRequests(page, served.url, "import os")
    params = httpx.QueryParams({"model": served.model["name"], "prompt": GRAPH_PROMPT})
    page.goto(f"{served.url}/graph?{params}")
    expect(page.locator("#status")).to_contain_text("Tracing")
    page.locator("#prompt-input").fill(second_prompt)
    page.locator("#trace").click()
    graph = served.query(
        "query($m: String!, $p: String!) { model(name: $m) { attributionGraph(input: "
        '{prompt: $p, dictionary: "transcoder"}) { id nodes { id type } } } }',
        {"m": served.model["name"], "p": second_prompt},
    )["model"]["attributionGraph"]
    expect(page.locator("#status")).to_have_text(graph["id"])
    slow.release(page)
    expect(page.locator("#status")).to_have_text(graph["id"])
    expect(page.locator("#graph .node")).to_have_count(len(graph["nodes"]))
    first, second = [n["id"] for n in graph["nodes"] if n["type"] == "FEATURE"][:2]
    slow_feature = HeldRequests(page, served.url, "query Feature")
    page.locator(f'#graph .node[data-id="{first}"]').click()
    page.locator(f'#graph .node[data-id="{second}"]').click()
    details = page.locator("#details")
    expect(details.locator("h3", has_text="Best explanation")).to_have_count(1)
    slow_feature.release(page)
    expect(details.locator("h3", has_text="Best explanation")).to_have_count(1)
    expect(details.locator("h3").first).to_contain_text(f"latent {second}")
