// An Apollo Federation v2 gateway on 127.0.0.1, composing the subgraphs given on the command line:
//   node gateway.mjs PORT NAME=URL [NAME=URL ...]
// It prints "gateway ready at URL" once the supergraph is composed and it listens.
import { ApolloServer } from "@apollo/server";
import { startStandaloneServer } from "@apollo/server/standalone";
import { ApolloGateway, IntrospectAndCompose } from "@apollo/gateway";

const [port, ...specs] = process.argv.slice(2);
const subgraphs = specs.map((spec) => {
  const split = spec.indexOf("=");
  return { name: spec.slice(0, split), url: spec.slice(split + 1) };
});

const gateway = new ApolloGateway({ supergraphSdl: new IntrospectAndCompose({ subgraphs }) });
const server = new ApolloServer({ gateway });
const { url } = await startStandaloneServer(server, {
  listen: { host: "127.0.0.1", port: Number(port) },
});
console.log(`gateway ready at ${url}`);

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, async () => {
    await server.stop();
    process.exit(0);
  });
}
