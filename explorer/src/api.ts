// The explorer's one way to the API: typed documents (generated from schema.graphql) posted to
// /graphql, errors turned into messages that name their code; and the generation stream.
import { createClient } from "graphql-ws";
import type { TypedDocumentString } from "./gql/graphql";

export class ApiError extends Error {}

export async function request<Result, Variables>(
  document: TypedDocumentString<Result, Variables>,
  variables: Variables,
): Promise<Result> {
  const response = await fetch("/graphql", {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify({ query: document.toString(), variables }),
  });
  let body: { data?: Result; errors?: { message: string; extensions?: { code?: string } }[] };
  try {
    body = await response.json();
  } catch {
    throw new ApiError(`The server answered ${response.status} without a GraphQL body.`);
  }
  if (body.errors && body.errors.length) {
    const [error] = body.errors;
    const code = error.extensions?.code;
    throw new ApiError(code ? `${code}: ${error.message}` : error.message);
  }
  if (!body.data) throw new ApiError("The server sent no data.");
  return body.data;
}

let socket: ReturnType<typeof createClient> | null = null;

export function subscribe<Result, Variables>(
  document: TypedDocumentString<Result, Variables>,
  variables: Variables,
  onEvent: (event: Result) => void,
): Promise<void> {
  socket ??= createClient({ url: `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/graphql` });
  const client = socket;
  return new Promise((resolve, reject) => {
    client.subscribe<Result>(
      { query: document.toString(), variables: variables as Record<string, unknown> },
      {
        next: (message) => {
          if (message.errors && message.errors.length) {
            const [error] = message.errors;
            const code = (error.extensions as { code?: string } | undefined)?.code;
            reject(new ApiError(code ? `${code}: ${error.message}` : error.message));
          } else if (message.data) onEvent(message.data);
        },
        error: (error) => reject(new ApiError(error instanceof Error ? error.message : String(error))),
        complete: () => resolve(),
      },
    );
  });
}
