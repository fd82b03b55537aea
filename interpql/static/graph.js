// The attribution graph page: one request draws a prompt's pruned graph (d3, by layer and
// position); clicking a latent asks the same API for its explanation, top examples and its
// activation on each token of the prompt. The state lives in the URL.
"use strict";

const MODELS_QUERY = `{ models { name nLayers dictionaries { name layer transcoder } } }`;

const GRAPH_QUERY = `query Graph($model: String!, $input: AttributionGraphInput!) {
  model(name: $model) {
    attributionGraph(input: $input) {
      id prompt
      tokens { index id text }
      nodes { id type layer tokenIndex token { text } influence activation probability node { id } }
      edges { source target weight }
      unpruned { features nodes edges }
      pruned { features nodes edges }
      replacementScore completenessScore jsonUrl
    }
  }
}`;

const FEATURE_QUERY = `query Feature($id: ID!, $prompt: String!) {
  node(id: $id) {
    id
    bestExplanation { text score }
    topActivations(first: 5) { tokens activations normalizedActivations }
    activations(prompt: $prompt) { tokens { text } values maxValue }
  }
}`;

const $ = (id) => document.getElementById(id);
const ROW_HEIGHT = 90;
const NODE_STEP = 18;
const MARGIN = { top: 20, right: 20, bottom: 50, left: 80 };
let current = null; // { models, graph, nLayers }
// Only the latest trace and the latest node clicked show their answers.
const traces = latestOnly();
const selections = latestOnly();

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function shown(text) {
  return text.replace(/\n/g, "↵");
}

function rowOf(node, nLayers) {
  if (node.type === "EMBEDDING") return 0;
  if (node.type === "LOGIT") return nLayers + 1;
  return node.layer + 1;
}

// Columns are the prompt's tokens, each as wide as its fullest cell needs (the last token
// usually holds most latents); rows are layers. Nodes sharing a cell are spread across it,
// most influential first, alternately a little up and down.
function columns(graph, nLayers) {
  const counts = new Map();
  for (const node of graph.nodes) {
    const key = `${rowOf(node, nLayers)}:${node.tokenIndex}`;
    counts.set(key, (counts.get(key) || 0) + 1);
  }
  const widths = graph.tokens.map((t) => {
    let most = 1;
    for (let row = 0; row < nLayers + 2; row += 1) most = Math.max(most, counts.get(`${row}:${t.index}`) || 0);
    return Math.max(56, 16 + NODE_STEP * most);
  });
  const starts = [];
  let x = MARGIN.left;
  for (const width of widths) {
    starts.push(x);
    x += width;
  }
  return { widths, starts, total: x - MARGIN.left };
}

function place(graph, nLayers, layout) {
  const cells = new Map();
  for (const node of graph.nodes) {
    const key = `${rowOf(node, nLayers)}:${node.tokenIndex}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(node);
  }
  const at = new Map();
  const height = (nLayers + 2) * ROW_HEIGHT;
  for (const [key, nodes] of cells) {
    const [row, column] = key.split(":").map(Number);
    nodes.sort((a, b) => b.influence - a.influence);
    const middle = layout.starts[column] + layout.widths[column] / 2;
    nodes.forEach((node, i) => {
      const x = middle + (i - (nodes.length - 1) / 2) * NODE_STEP;
      const y = MARGIN.top + height - (row + 0.5) * ROW_HEIGHT + (i % 2) * 16 - 8;
      at.set(node.id, { x, y });
    });
  }
  return at;
}

function draw(graph, nLayers) {
  const nTokens = graph.tokens.length;
  const layout = columns(graph, nLayers);
  const width = MARGIN.left + MARGIN.right + layout.total;
  const height = MARGIN.top + MARGIN.bottom + (nLayers + 2) * ROW_HEIGHT;
  const at = place(graph, nLayers, layout);
  const figure = d3.select("#graph");
  figure.selectAll("*").remove();
  const svg = figure.append("svg").attr("width", width).attr("height", height)
    .attr("role", "img").attr("aria-label", `attribution graph of ${nTokens} tokens`);
  const rowNames = ["embeddings", ...Array.from({ length: nLayers }, (_, i) => `layer ${i}`), "logits"];
  svg.append("g").selectAll("text").data(rowNames).join("text").attr("class", "row-label")
    .attr("x", 8).attr("y", (_, row) => MARGIN.top + (nLayers + 2 - row - 0.5) * ROW_HEIGHT + 4)
    .text((name) => name);
  svg.append("g").attr("class", "axis").selectAll("text").data(graph.tokens).join("text")
    .attr("x", (t) => layout.starts[t.index] + layout.widths[t.index] / 2)
    .attr("y", height - MARGIN.bottom + 22).attr("text-anchor", "middle")
    .text((t) => {
      const room = Math.max(3, Math.floor(layout.widths[t.index] / 8));
      const text = shown(t.text);
      return text.length > room ? `${text.slice(0, room - 1)}…` : text;
    })
    .append("title").text((t) => t.text);
  const largest = d3.max(graph.edges, (e) => Math.abs(e.weight)) || 1;
  const widthOf = d3.scaleLinear().domain([0, largest]).range([0.4, 5]);
  const opacityOf = d3.scaleLinear().domain([0, largest]).range([0.15, 0.85]);
  svg.append("g").selectAll("path")
    .data([...graph.edges].sort((a, b) => Math.abs(a.weight) - Math.abs(b.weight)))
    .join("path")
    .attr("class", (e) => `edge ${e.weight >= 0 ? "positive" : "negative"}`)
    .attr("d", (e) => {
      const s = at.get(e.source);
      const t = at.get(e.target);
      const bend = (t.y - s.y) / 2;
      return `M${s.x},${s.y} C${s.x},${s.y + bend} ${t.x},${t.y - bend} ${t.x},${t.y}`;
    })
    .attr("stroke", (e) => (e.weight >= 0 ? "#c92a2a" : "#1971c2"))
    .attr("stroke-width", (e) => widthOf(Math.abs(e.weight)))
    .attr("stroke-opacity", (e) => opacityOf(Math.abs(e.weight)))
    .append("title").text((e) => `${e.source} → ${e.target}: ${e.weight.toFixed(4)}`);
  const nodes = svg.append("g").selectAll("circle").data(graph.nodes).join("circle")
    .attr("class", (n) => `node ${n.type.toLowerCase()}`)
    .attr("data-id", (n) => n.id)
    .attr("cx", (n) => at.get(n.id).x).attr("cy", (n) => at.get(n.id).y)
    .attr("r", (n) => (n.type === "FEATURE" ? 4 + 6 * Math.sqrt(n.influence / d3.max(graph.nodes, (m) => m.influence)) : 7))
    .attr("tabindex", 0).attr("role", "button")
    .attr("aria-label", (n) => label(n))
    .on("click", (_, n) => select(n))
    .on("keydown", (event, n) => {
      if (event.key !== "Enter" && event.key !== " ") return;
      event.preventDefault(); // Space would scroll the page too
      select(n);
    });
  nodes.append("title").text((n) => label(n));
}

function label(node) {
  const where = `${shown(node.token.text)} @${node.tokenIndex}`;
  if (node.type === "FEATURE") return `latent ${node.id} at ${where}: activation ${node.activation.toFixed(3)}`;
  if (node.type === "ERROR") return `error of layer ${node.layer} at ${where}`;
  if (node.type === "EMBEDDING") return `embedding of ${where}`;
  return `logit ${shown(node.token.text)}: p=${node.probability.toFixed(3)}`;
}

function tokenSpans(tokens, values, peak) {
  return tokens.map((text, i) => {
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = shown(typeof text === "string" ? text : text.text);
    const value = values[i];
    span.dataset.activation = String(value);
    const alpha = peak > 0 ? Math.min(1, Math.abs(value) / peak) * 0.75 : 0;
    span.style.backgroundColor = value >= 0 ? `rgba(255, 140, 0, ${alpha.toFixed(3)})` : `rgba(70, 130, 255, ${alpha.toFixed(3)})`;
    span.title = `${value.toFixed(3)}`;
    return span;
  });
}

function element(tag, text, className) {
  const found = document.createElement(tag);
  if (text !== undefined) found.textContent = text;
  if (className) found.className = className;
  return found;
}

async function select(node) {
  const ticket = selections.next();
  d3.selectAll(".node").classed("selected", (n) => n.id === node.id);
  const details = $("details");
  const params = new URLSearchParams(location.search);
  params.set("node", node.id);
  history.replaceState(null, "", `?${params}`);
  details.replaceChildren(element("h3", label(node)));
  if (node.type !== "FEATURE") {
    details.append(element("p", node.type === "LOGIT" ? `probability ${node.probability.toFixed(4)}` : `influence ${node.influence.toFixed(4)}`));
    return;
  }
  details.append(element("p", `activation here ${node.activation.toFixed(4)} · influence ${node.influence.toFixed(4)}`, "activation-here"));
  const link = element("a", node.node.id);
  link.href = `/viewer?node=${encodeURIComponent(node.node.id)}`;
  details.append(link);
  try {
    const bos = current.graph.tokens[0].text === "<|endoftext|>" ? "<|endoftext|>" : "";
    const data = await graphql(FEATURE_QUERY, { id: node.node.id, prompt: bos + current.graph.prompt });
    if (!selections.is(ticket)) return; // another node was clicked meanwhile
    const found = data.node;
    details.append(element("h3", "Best explanation"));
    details.append(element("p", found.bestExplanation ? `${found.bestExplanation.text} (score ${found.bestExplanation.score === null ? "–" : found.bestExplanation.score.toFixed(2)})` : "No explanation is stored.", "explanation"));
    details.append(element("h3", "On the prompt"));
    const live = element("div", undefined, "record live");
    live.append(...tokenSpans(found.activations.tokens, found.activations.values, found.activations.maxValue));
    details.append(live);
    details.append(element("h3", "Top examples"));
    if (!found.topActivations.length) details.append(element("p", "No dataset examples are stored.", "empty"));
    for (const record of found.topActivations) {
      const row = element("div", undefined, "record top");
      const peak = Math.max(...record.activations);
      row.append(...tokenSpans(record.tokens, record.activations, peak));
      details.append(row);
    }
  } catch (error) {
    if (selections.is(ticket)) details.append(element("p", error.message, "error"));
  }
}

async function trace(model, dictionary, prompt) {
  const ticket = traces.next();
  selections.next(); // a node of the graph drawn before answers into nothing
  status(`Tracing ${JSON.stringify(prompt)}…`);
  $("graph").replaceChildren();
  $("details").replaceChildren(element("p", "Click a node to see what is known about it.", "empty"));
  $("summary").textContent = "";
  const params = new URLSearchParams({ model, dictionary, prompt });
  history.replaceState(null, "", `?${params}`);
  try {
    const data = await graphql(GRAPH_QUERY, { model, input: { prompt, dictionary } });
    if (!traces.is(ticket)) return null; // a later trace is under way
    const graph = data.model.attributionGraph;
    const nLayers = current.models.find((m) => m.name === model).nLayers;
    current = { ...current, graph, nLayers };
    draw(graph, nLayers);
    $("summary").textContent = `${graph.pruned.nodes} of ${graph.unpruned.nodes} nodes and ${graph.pruned.edges} of ${graph.unpruned.edges} edges kept · replacement score ${graph.replacementScore.toFixed(3)} · completeness ${graph.completenessScore.toFixed(3)} · `;
    const json = element("a", "graph JSON");
    json.href = graph.jsonUrl;
    $("summary").append(json);
    status(`${graph.id}`);
    return graph;
  } catch (error) {
    if (traces.is(ticket)) status(error.message, true);
    return null;
  }
}

// The model's transcoder sets in the select, `wanted` chosen; what is wrong with the choice
// (no such set, no transcoders at all), or null.
function fillDictionaries(models, model, wanted) {
  const found = models.find((m) => m.name === model);
  const sets = [...new Set(found.dictionaries.filter((d) => d.transcoder).map((d) => d.name))];
  $("dictionary-input").replaceChildren(...sets.map((name) => new Option(name, name, false, name === wanted)));
  $("trace").disabled = sets.length === 0;
  if (!sets.length) return `${model} has no transcoders: an attribution graph needs a set of them.`;
  if (wanted !== null && !sets.includes(wanted)) {
    return `${JSON.stringify(wanted)} is no transcoder set of ${model} (its sets: ${sets.join(", ")}): pick one and Trace.`;
  }
  return null;
}

async function main() {
  const params = new URLSearchParams(location.search);
  // First, so that a failure below never leaves the browser to submit the form itself.
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    if (current && current.models) trace($("model-input").value, $("dictionary-input").value, $("prompt-input").value);
  });
  if (typeof d3 === "undefined") {
    status("The graph page's drawing library (d3) is not installed here: run make serve, which installs it.", true);
    $("trace").disabled = true;
    return;
  }
  try {
    const { models } = await graphql(MODELS_QUERY, {});
    if (!models.length) {
      status("This server serves no model.", true);
      $("trace").disabled = true;
      return;
    }
    current = { models };
    const asked = params.get("model");
    const known = asked === null || models.some((m) => m.name === asked);
    const model = known && asked !== null ? asked : models[0].name;
    $("model-input").replaceChildren(...models.map((m) => new Option(m.name, m.name, false, m.name === model)));
    const problem = known
      ? fillDictionaries(models, model, params.get("dictionary"))
      : `No model ${JSON.stringify(asked)} is served here (served: ${models.map((m) => m.name).join(", ")}): pick one and Trace.`;
    if (!known) fillDictionaries(models, model, null);
    $("model-input").addEventListener("change", () => {
      const changed = fillDictionaries(models, $("model-input").value, null);
      status(changed || "", changed !== null);
    });
    $("prompt-input").value = params.get("prompt") || "import os\nimport sys\nimport";
    if (problem !== null) {
      status(problem, true);
      return;
    }
    if (params.get("prompt") !== null) {
      const graph = await trace(model, $("dictionary-input").value, params.get("prompt"));
      const wanted = graph && graph.nodes.find((n) => n.id === params.get("node"));
      if (wanted) select(wanted);
    }
  } catch (error) {
    status(error.message, true);
  }
}

main();
