// The node viewer: one node's best explanation, its top dataset examples and, for a prompt, its
// live activation on each token, with tokens coloured by activation. Plain JS, one query a view.
"use strict";

const NODE_QUERY = `query Viewer($id: ID!, $prompt: String!, $withPrompt: Boolean!) {
  node(id: $id) {
    topActivations { tokens activations normalizedActivations }
    bestExplanation { text score }
    activations(prompt: $prompt) @include(if: $withPrompt) { tokens { text } values maxValue }
  }
}`;
const DEFAULT_NODE_QUERY = "{ models { name } }";

const $ = (id) => document.getElementById(id);

// Orange for positive activations, blue for negative; `strength` in [-1, 1]. The strongest
// colour stays light enough to read the token on it.
function colour(strength) {
  const alpha = (0.75 * Math.min(1, Math.abs(strength))).toFixed(3);
  return strength >= 0 ? `rgba(255, 140, 0, ${alpha})` : `rgba(70, 130, 255, ${alpha})`;
}

function tokenSpan(text, value, strength) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = text.replace(/\n/g, "↵");
  span.dataset.activation = String(value);
  span.title = `${JSON.stringify(text)}: ${value.toFixed(3)}`;
  span.style.backgroundColor = colour(strength);
  return span;
}

function show(element, children, emptyText) {
  element.replaceChildren(...children);
  element.classList.toggle("empty", children.length === 0);
  if (children.length === 0) element.textContent = emptyText;
}

function explanationView(explanation) {
  if (!explanation) return [];
  const text = document.createElement("span");
  text.textContent = explanation.text;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent =
    explanation.score === null ? "not scored" : `score ${explanation.score.toFixed(2)}`;
  return [text, score];
}

function recordViews(records) {
  return records.map((record) => {
    const row = document.createElement("div");
    row.className = "record";
    record.tokens.forEach((text, i) => {
      row.append(tokenSpan(text, record.activations[i], record.normalizedActivations[i] / 10));
    });
    const peak = document.createElement("span");
    peak.className = "peak";
    peak.textContent = `max ${Math.max(...record.activations).toFixed(3)}`;
    row.append(peak);
    return row;
  });
}

function liveViews(activations) {
  const scale = Math.max(...activations.values.map(Math.abs)) || 1;
  const row = document.createElement("div");
  row.className = "record";
  activations.tokens.forEach((token, i) => {
    const value = activations.values[i];
    row.append(tokenSpan(token.text, value, value / scale));
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  legend.textContent =
    `max ${activations.maxValue.toFixed(3)}; colour relative to the largest |value| ` +
    "on this prompt (orange positive, blue negative); hover a token for its value.";
  return [row, legend];
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function defaultNodeId() {
  const data = await graphql(DEFAULT_NODE_QUERY, {});
  return data.models.length ? `${data.models[0].name}/mlp_neuron/0/0` : "";
}

const renders = latestOnly();

// What a failed or pending view shows: nothing of the node shown before.
function clearViews(text) {
  for (const section of ["explanation", "live", "records"]) show($(section), [], text);
}

async function render() {
  const ticket = renders.next();
  const id = $("node-input").value.trim();
  const prompt = $("prompt-input").value;
  const params = new URLSearchParams({ node: id });
  if (prompt) params.set("prompt", prompt);
  // Slashes stay readable in the address bar: node ids are paths.
  history.replaceState(null, "", `?${params.toString().replace(/%2F/g, "/")}`);
  setStatus(`Loading ${id}…`);
  clearViews("…");
  try {
    const { node } = await graphql(NODE_QUERY, { id, prompt, withPrompt: prompt !== "" });
    if (!renders.is(ticket)) return; // a later Show is under way: its answer is the one to show
    show(
      $("explanation"),
      explanationView(node.bestExplanation),
      "No explanation is stored for this node.",
    );
    show(
      $("records"),
      recordViews(node.topActivations),
      "No dataset examples are stored for this node: the model has no records. " +
        "Its live activations on a prompt are above.",
    );
    if (node.activations) show($("live"), liveViews(node.activations), "");
    else show($("live"), [], "Enter a prompt to see this node's activation on each token.");
    setStatus(id);
  } catch (error) {
    if (!renders.is(ticket)) return;
    clearViews("—");
    setStatus(error.message, true);
  }
}

async function start() {
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    render();
  });
  const params = new URLSearchParams(window.location.search);
  $("prompt-input").value = params.get("prompt") || "";
  try {
    $("node-input").value = params.get("node") || (await defaultNodeId());
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  if ($("node-input").value) await render();
}

start();
