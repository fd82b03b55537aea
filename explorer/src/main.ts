// The explorer (/explore): a prompt becomes Transformer Debugger's node table, each row with its
// explanation; a click ablates a node (the result beside the original, differences marked),
// traces from it, shows a head's attention, or steers a continuation. One request per view,
// typed from schema.graphql; the state lives in the URL.
import { html } from "htm/preact";
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { scaleDiverging, scaleSequential } from "d3-scale";
import { interpolateBlues, interpolateRdBu } from "d3-scale-chromatic";
import { ApiError, request, subscribe } from "./api";
import type {
  ExploreAblationQuery,
  ExploreHeadQuery,
  ExploreServedQuery,
  ExploreTableQuery,
  ExploreTraceQuery,
  InferenceInput,
  PassFragment,
  TableRowFragment,
} from "./gql/graphql";
import { ABLATION_VIEW, HEAD_VIEW, SERVED, STEER_VIEW, TABLE_VIEW, TRACE_VIEW } from "./queries";

type LossKind = "NEXT_TOKEN" | "LOGIT_DIFF";
type Colouring = "loss" | "embedding" | "mlp" | "attentionFrom" | "attentionTo";

// Everything a view is, as it appears in the URL.
interface State {
  model: string;
  prompt: string;
  target: string;
  distractor: string;
  loss: LossKind;
  mlp: string; // "" neurons, else a dictionary set
  attention: string; // "" heads
  residual: string; // "" none
  k: number;
  colour: Colouring;
  view: "table" | "ablate" | "trace" | "head" | "steer";
  node: string; // the node acted on
  at: string; // its token index, or "" (everywhere; for traces: the token)
  key: string; // a trace's key token (attention)
  through: string; // a trace through attention: Q, K, QK or V ("" none)
  strength: number;
}

const DEFAULTS: State = {
  model: "",
  prompt: "import os\nimport sys\nimport",
  target: "",
  distractor: "",
  loss: "NEXT_TOKEN",
  mlp: "",
  attention: "",
  residual: "",
  k: 5,
  colour: "loss",
  view: "table",
  node: "",
  at: "",
  key: "",
  through: "",
  strength: 20,
};

// The values a choice in the URL may take; any other is replaced by the default, and said.
const CHOICES: Partial<Record<keyof State, readonly string[]>> = {
  loss: ["NEXT_TOKEN", "LOGIT_DIFF"],
  colour: ["loss", "embedding", "mlp", "attentionFrom", "attentionTo"],
  view: ["table", "ablate", "trace", "head", "steer"],
  through: ["", "Q", "K", "QK", "V"],
};

// The state the URL names, and what in it was not understood (each replaced by its default).
function readState(): { state: State; notices: string[] } {
  const params = new URLSearchParams(location.search);
  // The server names its first model in the page; the URL may name another.
  const served = document.querySelector<HTMLMetaElement>('meta[name="interpql-model"]')?.content ?? "";
  const state: Record<string, unknown> = { ...DEFAULTS, model: served };
  const notices: string[] = [];
  for (const [name, fallback] of Object.entries(DEFAULTS)) {
    const given = params.get(name);
    if (given === null) continue;
    const allowed = CHOICES[name as keyof State];
    if (typeof fallback === "number" && !Number.isFinite(Number(given))) {
      notices.push(`${name}=${JSON.stringify(given)} is no number: ${fallback} is used.`);
    } else if (allowed && !allowed.includes(given)) {
      notices.push(`${name}=${JSON.stringify(given)} is not one of ${allowed.filter(Boolean).join(", ")}: ${JSON.stringify(fallback) } is used.`);
    } else {
      state[name] = typeof fallback === "number" ? Number(given) : given;
    }
  }
  return { state: state as unknown as State, notices };
}

// A choice the URL made that the model does not have (a stale bookmark): said, and offered in
// its select, so that picking another one is a change.
function unknownChoices(state: State, models: Served[]): string[] {
  const model = models.find((m) => m.name === state.model);
  if (!model) return models.length ? [`No model ${JSON.stringify(state.model)} is served here (served: ${models.map((m) => m.name).join(", ")}).`] : [];
  const names = new Set(model.dictionaries.map((d) => d.name));
  return (["mlp", "attention", "residual"] as const)
    .filter((side) => state[side] !== "" && !names.has(state[side]))
    .map((side) => `${state.model} has no dictionary set ${JSON.stringify(state[side])} (its sets: ${[...names].join(", ") || "none"}): pick another ${side} choice.`);
}

type Served = ExploreServedQuery["models"][number]; // a model and its dictionary sets

function writeState(state: State): void {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(state)) {
    if (value !== (DEFAULTS as unknown as Record<string, unknown>)[name]) params.set(name, String(value));
  }
  history.replaceState(null, "", `${location.pathname}?${params}`);
}

function inputOf(state: State): InferenceInput {
  const input: InferenceInput = { prompt: state.prompt };
  if (state.loss === "LOGIT_DIFF" || state.target) {
    input.loss = {
      kind: state.distractor ? "LOGIT_DIFF" : "LOGIT_MINUS_MEAN",
      targetTokens: state.target ? [state.target] : [],
      distractorTokens: state.distractor ? [state.distractor] : [],
    };
  }
  if (state.mlp) input.mlpDictionary = state.mlp;
  if (state.attention) input.attentionDictionary = state.attention;
  if (state.residual) input.residualDictionary = state.residual;
  return input;
}

const shown = (text: string) => text.replace(/\n/g, "↵");
const fixed = (value: number | null | undefined, digits = 3) =>
  value === null || value === undefined ? "–" : value.toFixed(digits);

function rowKey(row: TableRowFragment): string {
  return `${row.node.id}@${row.tokenIndex}${row.keyTokenIndex === null || row.keyTokenIndex === undefined ? "" : `>${row.keyTokenIndex}`}`;
}

function where(row: TableRowFragment, tokens: { text: string }[]): string {
  const query = shown(tokens[row.tokenIndex]?.text ?? "?");
  if (row.keyTokenIndex === null || row.keyTokenIndex === undefined) return `${query} @${row.tokenIndex}`;
  return `${query} @${row.tokenIndex} ← ${shown(tokens[row.keyTokenIndex]?.text ?? "?")} @${row.keyTokenIndex}`;
}

function viewerLink(state: State, id: string) {
  const params = new URLSearchParams({ node: id, prompt: state.prompt });
  // The model's name is the page's: the link shows kind/layer/index.
  const short = id.startsWith(`${state.model}/`) ? id.slice(state.model.length + 1) : id;
  return html`<a class="node-link" href=${`/viewer?${params}`} title=${id}>${short}</a>`;
}

// --- tokens ---------------------------------------------------------------------------------

function Tokens(props: { pass: PassFragment; colour: Colouring }) {
  const { pass, colour } = props;
  const values =
    colour === "loss"
      ? (pass.tokenLosses ?? []).map((v) => (v === null || v === undefined ? 0 : v))
      : pass.nodeTable.tokenSums[colour];
  const peak = Math.max(1e-9, ...values.map((v) => Math.abs(v)));
  const paint =
    colour === "loss"
      ? scaleSequential(interpolateBlues).domain([0, peak])
      : scaleDiverging(interpolateRdBu).domain([peak, 0, -peak]);
  return html`<p class="tokens" aria-label=${`tokens coloured by ${colour}`}>
    ${pass.tokens.map((token, i) => {
      const value = values[i] ?? 0;
      return html`<span class="token" data-value=${String(value)} title=${`${JSON.stringify(token.text)}: ${fixed(value)}`}
        style=${{ backgroundColor: paint(value) }}>${shown(token.text)}</span>`;
    })}
  </p>`;
}

function Predictions(props: { pass: PassFragment; other?: PassFragment }) {
  const before = new Map((props.other?.topPredictions ?? []).map((p) => [p.token.text, p.probability]));
  return html`<ol class="predictions">
    ${props.pass.topPredictions.map((p) => {
      const was = before.get(p.token.text);
      const change = was === undefined ? "" : ` (${p.probability - was >= 0 ? "+" : ""}${(p.probability - was).toFixed(3)})`;
      return html`<li data-token=${p.token.text} data-probability=${String(p.probability)}>
        <code>${JSON.stringify(p.token.text)}</code> ${p.probability.toFixed(3)}${props.other && was === undefined ? html` <mark>new</mark>` : change}</li>`;
    })}
  </ol>`;
}

// --- the node table -------------------------------------------------------------------------

interface TableProps {
  state: State;
  rows: TableRowFragment[];
  tokens: { text: string }[];
  compareTo?: TableRowFragment[];
  act?: (next: Partial<State>) => void;
}

function NodeTable(props: TableProps) {
  const { rows, tokens, compareTo, act, state } = props;
  const others = compareTo ? new Map(compareTo.map((r) => [rowKey(r), r])) : null;
  return html`<table class="node-table">
    <thead><tr>
      <th scope="col">node</th><th scope="col">kind</th><th scope="col">layer</th><th scope="col">token(s)</th>
      <th scope="col">activation</th><th scope="col">write norm</th><th scope="col">direct effect</th>
      <th scope="col">act × grad</th><th scope="col">explanation</th>${act ? html`<th scope="col">act</th>` : null}
    </tr></thead>
    <tbody>${rows.map((row) => {
      const other = others?.get(rowKey(row));
      const changed = (value: number, before: number | undefined) =>
        others === null ? "" : before === undefined ? "diff-new" : Math.abs(value - before) > 1e-4 * Math.max(1, Math.abs(before)) ? "diff-changed" : "";
      const cell = (value: number, before: number | undefined) =>
        html`<td class=${`number ${changed(value, before)}`} data-value=${String(value)}>${fixed(value)}${
          before !== undefined && changed(value, before) ? html`<small> (was ${fixed(before)})</small>` : null}</td>`;
      const head = row.node.kind === "ATTENTION_HEAD";
      return html`<tr data-row=${rowKey(row)} class=${others !== null && other === undefined ? "diff-new" : ""}>
        <td>${viewerLink(state, row.node.id)}</td>
        <td>${row.node.dictionary ?? row.node.kind.toLowerCase()}</td>
        <td>${row.node.layerIndex}</td>
        <td>${where(row, tokens)}</td>
        ${cell(row.activation, other?.activation)}
        ${cell(row.writeNorm, other?.writeNorm)}
        ${cell(row.directEffect, other?.directEffect)}
        ${cell(row.actTimesGrad, other?.actTimesGrad)}
        <td class="explanation">${row.node.bestExplanation?.text ?? ""}</td>
        ${act ? html`<td class="actions">
          ${row.node.kind === "TOKEN_EMBEDDING" ? null : html`
          <button type="button" aria-label=${`ablate ${row.node.id} at token ${row.tokenIndex}`}
            onClick=${() => act({ view: "ablate", node: row.node.id, at: String(row.tokenIndex) })}>ablate here</button>
          <button type="button" aria-label=${`ablate ${row.node.id} everywhere`}
            onClick=${() => act({ view: "ablate", node: row.node.id, at: "" })}>ablate all</button>`}
          <button type="button" aria-label=${`trace from ${row.node.id}`}
            onClick=${() => act({ view: "trace", node: row.node.id, at: String(row.tokenIndex), through: head && row.keyTokenIndex !== null && row.keyTokenIndex !== undefined ? "V" : "", key: head && row.keyTokenIndex !== null && row.keyTokenIndex !== undefined ? String(row.keyTokenIndex) : "" })}>trace</button>
          ${head ? html`<button type="button" aria-label=${`attention of ${row.node.id}`}
            onClick=${() => act({ view: "head", node: row.node.id })}>attention</button>` : null}
          ${row.node.kind === "TOKEN_EMBEDDING" ? null : html`<button type="button" aria-label=${`steer with ${row.node.id}`}
            onClick=${() => act({ view: "steer", node: row.node.id })}>steer</button>`}
        </td>` : null}
      </tr>`;
    })}</tbody>
  </table>`;
}

function PassSummary(props: { title: string; pass: PassFragment; other?: PassFragment; colour: Colouring }) {
  const { pass, other } = props;
  const delta = other && pass.loss !== null && other.loss !== null && pass.loss !== undefined && other.loss !== undefined
    ? ` (${pass.loss - other.loss >= 0 ? "+" : ""}${(pass.loss - other.loss).toFixed(4)})` : "";
  return html`<section class="pass">
    <h2>${props.title}</h2>
    <p>loss <strong class="loss" data-value=${String(pass.loss)}>${fixed(pass.loss, 4)}</strong>${delta}</p>
    <${Tokens} pass=${pass} colour=${props.colour} />
    <h3>Top predictions</h3>
    <${Predictions} pass=${pass} other=${other} />
  </section>`;
}

// --- views ----------------------------------------------------------------------------------

type Loaded =
  | { view: "table"; data: ExploreTableQuery }
  | { view: "ablate"; data: ExploreAblationQuery }
  | { view: "trace"; data: ExploreTraceQuery }
  | { view: "head"; data: ExploreHeadQuery }
  | { view: "steer"; unsteered: string[]; steered: string[]; done: boolean };

async function load(state: State, onSteer: (s: Loaded) => void): Promise<Loaded> {
  const input = inputOf(state);
  if (state.view === "ablate") {
    const ablation = { nodeId: state.node, value: 0, ...(state.at === "" ? {} : { tokenIndex: Number(state.at) }) };
    const ablated = { ...input, ablations: [ablation] };
    return { view: "ablate", data: await request(ABLATION_VIEW, { model: state.model, input, ablated, k: state.k }) };
  }
  if (state.view === "trace") {
    const trace = {
      upstreamNodeId: state.node,
      tokenIndex: Number(state.at),
      ...(state.through ? { attentionTraceType: state.through as "Q" | "K" | "QK" | "V", keyTokenIndex: Number(state.key) } : {}),
    };
    return { view: "trace", data: await request(TRACE_VIEW, { model: state.model, input: { ...input, trace }, k: state.k }) };
  }
  if (state.view === "head") {
    const data = await request(HEAD_VIEW, { model: state.model, input, head: state.node });
    if (!data.model.infer.activations[0]?.attentionPattern) {
      throw new ApiError(`${state.node} is no attention head: only heads have an attention pattern.`);
    }
    return { view: "head", data };
  }
  if (state.view === "steer") {
    const shown: Loaded & { view: "steer" } = { view: "steer", unsteered: [], steered: [], done: false };
    await subscribe(
      STEER_VIEW,
      { model: state.model, input: { prompt: state.prompt, maxTokens: 16, steering: [{ nodeId: state.node, strength: state.strength }] } },
      (event) => {
        if (event.generate.unsteeredToken) shown.unsteered.push(event.generate.unsteeredToken.text);
        if (event.generate.steeredToken) shown.steered.push(event.generate.steeredToken.text);
        onSteer({ ...shown, unsteered: [...shown.unsteered], steered: [...shown.steered] });
      },
    );
    return { ...shown, done: true };
  }
  return { view: "table", data: await request(TABLE_VIEW, { model: state.model, input, k: state.k }) };
}

function Heatmap(props: { title: string; tokens: { text: string }[]; values: number[][]; diverging: boolean; id: string }) {
  const { tokens, values } = props;
  const n = tokens.length;
  const cell = Math.max(14, Math.min(34, 520 / n));
  const peak = Math.max(1e-9, ...values.flat().map((v) => Math.abs(v)));
  const paint = props.diverging
    ? scaleDiverging(interpolateRdBu).domain([peak, 0, -peak])
    : scaleSequential(interpolateBlues).domain([0, peak]);
  const margin = 90;
  return html`<figure class="heatmap" id=${props.id}>
    <figcaption>${props.title} (rows: query tokens, columns: key tokens)</figcaption>
    <svg width=${margin + n * cell + 10} height=${margin + n * cell + 10} role="img" aria-label=${props.title}>
      ${tokens.map((t, i) => html`
        <text class="label" x=${margin - 4} y=${margin + i * cell + cell * 0.7} text-anchor="end">${shown(t.text).slice(0, 10)}</text>
        <text class="label" transform=${`translate(${margin + i * cell + cell * 0.7}, ${margin - 4}) rotate(-60)`}>${shown(t.text).slice(0, 10)}</text>`)}
      ${values.map((row, q) => row.map((value, k) => html`<rect class="cell" x=${margin + k * cell} y=${margin + q * cell}
        width=${cell - 1} height=${cell - 1} fill=${k > q ? "#f3f4f7" : paint(value)} data-query=${q} data-key=${k}
        data-value=${String(value)}><title>${`${shown(tokens[q].text)} → ${shown(tokens[k].text)}: ${value.toFixed(4)}`}</title></rect>`))}
    </svg>
  </figure>`;
}

function Body(props: { state: State; loaded: Loaded; act: (next: Partial<State>) => void }) {
  const { state, loaded, act } = props;
  const back = html`<button type="button" class="back" onClick=${() => act({ view: "table", node: "", at: "", key: "", through: "" })}>← back to the table</button>`;
  if (loaded.view === "table") {
    const pass = loaded.data.model.infer;
    return html`<${PassSummary} title="The prompt" pass=${pass} colour=${state.colour} />
      <h2>Node table</h2>
      <${NodeTable} state=${state} rows=${pass.nodeTable.rows} tokens=${pass.tokens} act=${act} />`;
  }
  if (loaded.view === "ablate") {
    const { original, ablated } = loaded.data.model;
    const what = `${state.node} ${state.at === "" ? "at every token" : `at token ${state.at}`}`;
    return html`${back}
      <p class="acting">Ablated: ${viewerLink(state, state.node)} ${state.at === "" ? "at every token" : `at token ${state.at}`}</p>
      <div class="side-by-side">
        <div class="original"><${PassSummary} title="Original" pass=${original} colour=${state.colour} /></div>
        <div class="ablated"><${PassSummary} title=${`Ablated ${what}`} pass=${ablated} other=${original} colour=${state.colour} /></div>
      </div>
      <div class="ablated">
        <h2>Node table after the ablation</h2>
        <p class="legend">${[
          html`<span class="diff-changed">changed</span>`,
          " values show the original's; ",
          html`<span class="diff-new">new</span>`,
          " rows were not in the original's table; ",
          `${original.nodeTable.rows.filter((r) => !ablated.nodeTable.rows.some((a) => rowKey(a) === rowKey(r))).length} of its rows left it.`,
        ]}</p>
        <${NodeTable} state=${state} rows=${ablated.nodeTable.rows} tokens=${ablated.tokens} compareTo=${original.nodeTable.rows} />
      </div>`;
  }
  if (loaded.view === "trace") {
    const found = loaded.data.model.infer;
    return html`${back}
      <p class="acting">Traced from ${viewerLink(state, state.node)} at token ${state.at}${state.through ? ` through ${state.through} from key ${state.key}` : ""}:
        value <strong class="objective" data-value=${String(found.objective)}>${fixed(found.objective, 4)}</strong></p>
      <h2>Upstream nodes</h2>
      <${NodeTable} state=${state} rows=${found.nodeTable.rows} tokens=${found.tokens} />`;
  }
  if (loaded.view === "head") {
    const [head] = loaded.data.model.infer.activations;
    return html`${back}
      <p class="acting">Attention of ${viewerLink(state, state.node)}</p>
      <div class="side-by-side">
        <${Heatmap} id="pattern" title="Attention pattern" tokens=${head.tokens} values=${head.attentionPattern ?? []} diverging=${false} />
        <${Heatmap} id="pair-attribution" title="Token-pair attribution (act × grad)" tokens=${head.tokens} values=${head.tokenPairAttribution ?? []} diverging=${true} />
      </div>`;
  }
  return html`${back}
    <p class="acting">Steering with ${viewerLink(state, state.node)}, strength ${state.strength}${loaded.done ? "" : " (generating…)"}</p>
    <div class="side-by-side continuations">
      <section><h2>Unsteered</h2><pre id="unsteered">${state.prompt}<mark>${loaded.unsteered.join("")}</mark></pre></section>
      <section><h2>Steered</h2><pre id="steered">${state.prompt}<mark>${loaded.steered.join("")}</mark></pre></section>
    </div>`;
}

function Controls(props: { state: State; models: string[]; dictionaries: Served["dictionaries"]; submit: (next: State) => void }) {
  const [draft, setDraft] = useState(props.state);
  useEffect(() => setDraft(props.state), [props.state]);
  const set = (name: keyof State) => (event: Event) => {
    const target = event.currentTarget as HTMLInputElement;
    setDraft({ ...draft, [name]: target.type === "number" ? Number(target.value) : target.value });
  };
  const sets = [...new Set(props.dictionaries.map((d) => d.name))];
  const side = (test: (hook: string, transcoder: boolean) => boolean) =>
    sets.filter((name) => props.dictionaries.some((d) => d.name === name && test(d.hookIn, d.transcoder)));
  // A choice the model does not have stays in its select (marked) until another is picked.
  const options = (names: string[], none: string, chosen: string) => [
    html`<option value="" selected=${chosen === ""}>${none}</option>`,
    ...names.map((name) => html`<option value=${name} selected=${chosen === name}>${name}</option>`),
    ...(chosen !== "" && !names.includes(chosen) ? [html`<option value=${chosen} selected>${chosen} (not served)</option>`] : []),
  ];
  return html`<form id="controls" onSubmit=${(event: Event) => { event.preventDefault(); props.submit({ ...draft, view: "table", node: "" }); }}>
    <label>Model <select id="model" value=${draft.model} onChange=${set("model")}>
      ${props.models.map((name) => html`<option value=${name} selected=${name === draft.model}>${name}</option>`)}</select></label>
    <label class="wide">Prompt <textarea id="prompt" rows="2" cols="50" value=${draft.prompt} onInput=${set("prompt")} /></label>
    <label>Target token <input id="target" size="8" value=${draft.target} onInput=${set("target")} placeholder="next token" /></label>
    <label>Distractor <input id="distractor" size="8" value=${draft.distractor} onInput=${set("distractor")} /></label>
    <label>MLP <select id="mlp" onChange=${set("mlp")}>${options(side((h, t) => t || h.includes("mlp")), "neurons", draft.mlp)}</select></label>
    <label>Attention <select id="attention" onChange=${set("attention")}>${options(side((h) => h.includes("attn")), "heads", draft.attention)}</select></label>
    <label>Residual <select id="residual" onChange=${set("residual")}>${options(side((h) => h.includes("resid")), "none", draft.residual)}</select></label>
    <label>Top and bottom k <input id="k" type="number" min="1" max="50" value=${draft.k} onInput=${set("k")} /></label>
    <label>Colour tokens by <select id="colour" onChange=${set("colour")}>
      ${["loss", "embedding", "mlp", "attentionFrom", "attentionTo"].map((c) => html`<option value=${c} selected=${draft.colour === c}>${c === "loss" ? "per-token loss" : `act × grad: ${c}`}</option>`)}
    </select></label>
    <label>Steering strength <input id="strength" type="number" step="1" value=${draft.strength} onInput=${set("strength")} /></label>
    <button id="run" type="submit">Explore</button>
  </form>`;
}

const OPENED = readState();

function App() {
  const [state, setState] = useState<State>(OPENED.state);
  const [served, setServed] = useState<Served[]>([]);
  const [loaded, setLoaded] = useState<Loaded | null>(null);
  const [error, setError] = useState<string>("");
  const [busy, setBusy] = useState(false);
  const [notices, setNotices] = useState<string[]>(OPENED.notices);
  const models = served.map((m) => m.name);
  const dictionaries = served.find((m) => m.name === state.model)?.dictionaries ?? [];

  // What the controls offer, whatever the first view's fate.
  useEffect(() => {
    request(SERVED, {}).then(
      (data) => {
        setServed(data.models);
        setNotices((earlier) => [...earlier, ...unknownChoices(state, data.models)]);
      },
      (e: unknown) => setError(e instanceof Error ? e.message : String(e)),
    );
  }, []);

  useEffect(() => writeState(state), [JSON.stringify(state)]);
  // Colouring and steering strength change how an answer is shown, not what is asked: the
  // colouring redraws, the strength is read when a steer view starts.
  const { colour: _colour, strength: _strength, ...asked } = state;
  useEffect(() => {
    let current = true;
    setBusy(true);
    setError("");
    const run = async () => {
      const result = await load(state, (partial) => current && setLoaded(partial));
      if (!current) return;
      setLoaded(result);
    };
    run().catch((e: unknown) => current && setError(e instanceof ApiError || e instanceof Error ? e.message : String(e)))
      .finally(() => current && setBusy(false));
    return () => { current = false; };
  }, [JSON.stringify(asked), state.view === "steer" ? state.strength : 0]);

  const act = (next: Partial<State>) => setState({ ...state, ...next });
  const submit = (next: State) => {
    setNotices([]); // what the URL got wrong is either fixed or chosen again
    setState(next);
  };
  const graphParams = new URLSearchParams({ model: state.model, prompt: state.prompt, ...(dictionaries.some((d) => d.transcoder) ? { dictionary: dictionaries.find((d) => d.transcoder)!.name } : {}) });
  return html`<header>
      <h1>interpql <span>explorer</span></h1>
      <nav><a href=${`/graph?${graphParams}`} id="graph-link">Attribution graph</a> · <a href="/viewer">Node viewer</a> · <a href="/graphql">GraphiQL</a></nav>
    </header>
    <${Controls} state=${state} models=${models.includes(state.model) ? models : [...models, state.model]} dictionaries=${dictionaries} submit=${submit} />
    ${notices.length ? html`<ul id="notices" role="status">${notices.map((text) => html`<li>${text}</li>`)}</ul>` : null}
    <p id="status" role="status" aria-live="polite" class=${error ? "error" : ""}>${error || (busy ? "Running…" : "")}</p>
    ${loaded && !error ? html`<main id="view" data-view=${loaded.view}><${Body} state=${state} loaded=${loaded} act=${act} /></main>` : null}`;
}

render(html`<${App} />`, document.getElementById("app")!);
