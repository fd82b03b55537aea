// Every request the explorer makes: one per view, each asking for what that view shows.
import { graphql } from "./gql";

export const TABLE_ROW = graphql(`
  fragment TableRow on NodeTableRow {
    node { id kind dictionary layerIndex bestExplanation { text } }
    tokenIndex
    keyTokenIndex
    activation
    writeNorm
    directEffect
    actTimesGrad
  }
`);

export const PASS = graphql(`
  fragment Pass on InferenceResult {
    tokens { index text }
    loss
    tokenLosses
    topPredictions(k: 5) { token { text } probability }
    nodeTable(k: $k, scoredTokens: 0) {
      rows { ...TableRow }
      tokenSums { embedding mlp attentionFrom attentionTo }
    }
  }
`);

// What the controls offer, asked once when the page opens (before any view answers).
export const SERVED = graphql(`
  query ExploreServed {
    models { name dictionaries { name transcoder hookIn } }
  }
`);

export const TABLE_VIEW = graphql(`
  query ExploreTable($model: String!, $input: InferenceInput!, $k: Int!) {
    model(name: $model) {
      infer(input: $input) { ...Pass }
    }
  }
`);

export const ABLATION_VIEW = graphql(`
  query ExploreAblation($model: String!, $input: InferenceInput!, $ablated: InferenceInput!, $k: Int!) {
    model(name: $model) {
      original: infer(input: $input) { ...Pass }
      ablated: infer(input: $ablated) { ...Pass }
    }
  }
`);

export const TRACE_VIEW = graphql(`
  query ExploreTrace($model: String!, $input: InferenceInput!, $k: Int!) {
    model(name: $model) {
      infer(input: $input) {
        tokens { index text }
        objective
        nodeTable(k: $k, scoredTokens: 0) { rows { ...TableRow } }
      }
    }
  }
`);

export const HEAD_VIEW = graphql(`
  query ExploreHead($model: String!, $input: InferenceInput!, $head: ID!) {
    model(name: $model) {
      infer(input: $input) {
        activations(nodeIds: [$head]) {
          tokens { index text }
          attentionPattern
          tokenPairAttribution
        }
      }
    }
  }
`);

export const STEER_VIEW = graphql(`
  subscription ExploreSteer($model: String!, $input: GenerateInput!) {
    generate(model: $model, input: $input) {
      step
      unsteeredToken { text }
      steeredToken { text }
    }
  }
`);
