// What the plain-JS pages (the node viewer, the graph page) share: one GraphQL request over
// HTTP, whose first error is thrown with its code, and a guard that lets only the latest of
// several requests show its answer. Loaded before each page's own script.
"use strict";

async function graphql(query, variables) {
  const response = await fetch("/graphql", {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json" },
    body: JSON.stringify({ query, variables }),
  });
  let body;
  try {
    body = await response.json();
  } catch {
    // A proxy's HTML error page, or a connection cut short.
    throw new Error(`The server answered ${response.status} without a GraphQL body.`);
  }
  if (body.errors && body.errors.length) {
    const [error] = body.errors;
    const code = error.extensions && error.extensions.code;
    throw new Error(code ? `${code}: ${error.message}` : error.message);
  }
  if (!body.data) throw new Error(`The server answered ${response.status} with no data.`);
  return body.data;
}

// `const ticket = latest.next()` before a request; after it, `latest.is(ticket)` is false when
// a later request started meanwhile, whose answer the page should show instead.
function latestOnly() {
  let issued = 0;
  return { next: () => ++issued, is: (ticket) => ticket === issued };
}
