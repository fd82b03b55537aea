// A typed interpql query: codegen derives the result and variable types from schema.graphql, so
// `data.node.activations.values` is a number[] here and a misspelt field fails to compile.
//   npm run codegen && npm run build && node dist/example.js [URL] [NODE_ID] [PROMPT]
import { graphql } from "./gql/gql.js";
import type { TypedDocumentString } from "./gql/graphql.js";

export const NodeOnPrompt = graphql(`
  query NodeOnPrompt($id: ID!, $prompt: String!) {
    node(id: $id) {
      id
      kind
      layerIndex
      model {
        name
        nLayers
      }
      bestExplanation {
        text
        score
      }
      activations(prompt: $prompt) {
        tokens {
          text
        }
        values
        maxValue
        maxTokenIndex
      }
    }
  }
`);

interface GraphQLError {
  message: string;
  extensions?: { code?: string };
}

export async function execute<Result, Variables>(
  url: string,
  document: TypedDocumentString<Result, Variables>,
  variables: Variables,
): Promise<Result> {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify({ query: document.toString(), variables }),
  });
  const body = (await response.json()) as { data?: Result; errors?: GraphQLError[] };
  const [error] = body.errors ?? [];
  if (error !== undefined || body.data === undefined) {
    throw new Error(`${error?.extensions?.code ?? response.status}: ${error?.message ?? ""}`);
  }
  return body.data;
}

async function main(url: string, id: string, prompt: string): Promise<void> {
  const { node } = await execute(url, NodeOnPrompt, { id, prompt });
  const { tokens, values, maxValue, maxTokenIndex } = node.activations;
  console.log(`${node.id}: ${node.kind} in layer ${node.layerIndex} of ${node.model.name}`);
  console.log(`explanation: ${node.bestExplanation?.text ?? "none stored"}`);
  tokens.forEach((token, i) => {
    console.log(`${JSON.stringify(token.text).padEnd(14)} ${values[i]?.toFixed(4)}`);
  });
  console.log(`max ${maxValue.toFixed(4)} at token ${maxTokenIndex}`);
}

const [
  url = "http://127.0.0.1:8000/graphql",
  id = "tiny-random/mlp_neuron/0/0",
  prompt = "def f(x):",
] = process.argv.slice(2);
await main(url, id, prompt);
