// What the plain-JS pages (the node viewer, the graph page) share: one GraphQL request over
// HTTP, whose first error is thrown with its code. Loaded before each page's own script.
"use strict";

async function graphql(query, variables) {
  const response = await fetch("/graphql", {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify({ query, variables }),
  });
  const body = await response.json();
  if (body.errors && body.errors.length) {
    const [error] = body.errors;
    const code = error.extensions && error.extensions.code;
    throw new Error(code ? `${code}: ${error.message}` : error.message);
  }
  return body.data;
}
