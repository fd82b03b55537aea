// A typed subscription through the standard `graphql-ws` client (graphql-transport-ws
// protocol): a greedy generation streamed one token per event, then the whole result.
//   npm run codegen && npm run build && node dist/subscribe.js [URL] [MODEL] [PROMPT] [TOKENS]
import { createClient } from "graphql-ws";
import WebSocket from "ws";

import { graphql } from "./gql/gql.js";
import type { StreamGenerationSubscription } from "./gql/graphql.js";

export const StreamGeneration = graphql(`
  subscription StreamGeneration($model: String!, $prompt: String!, $maxTokens: Int!) {
    generate(model: $model, input: { prompt: $prompt, maxTokens: $maxTokens }) {
      step
      unsteeredToken {
        id
        text
      }
      result {
        unsteered {
          text
        }
      }
    }
  }
`);

type Event = StreamGenerationSubscription["generate"];

export async function streamGeneration(
  url: string,
  model: string,
  prompt: string,
  maxTokens: number,
  onEvent: (event: Event) => void,
): Promise<void> {
  const client = createClient({ url, webSocketImpl: WebSocket, lazy: true, retryAttempts: 0 });
  try {
    const events = client.iterate<StreamGenerationSubscription>({
      query: StreamGeneration.toString(),
      variables: { model, prompt, maxTokens },
    });
    for await (const { data, errors } of events) {
      if (errors !== undefined || data === undefined || data === null) {
        const [error] = errors ?? [];
        throw new Error(`${error?.extensions?.["code"] ?? "ERROR"}: ${error?.message ?? ""}`);
      }
      onEvent(data.generate);
    }
  } finally {
    await client.dispose();
  }
}

const [
  url = "ws://127.0.0.1:8000/graphql",
  model = "tiny-stdlib",
  prompt = "import os\n",
  tokens = "5",
] = process.argv.slice(2);
await streamGeneration(url, model, prompt, Number(tokens), (event) => {
  console.log(JSON.stringify(event));
});
