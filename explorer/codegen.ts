import type { CodegenConfig } from "@graphql-codegen/cli";

// The explorer's typed documents, generated from the schema interpql exports (schema.graphql),
// as clients/typescript does.
const config: CodegenConfig = {
  schema: ["../schema.graphql", "../clients/typescript/federation.graphql"],
  documents: ["src/**/*.ts", "!src/gql/**"],
  generates: {
    "src/gql/": {
      preset: "client",
      config: {
        documentMode: "string",
        useTypeImports: true,
        enumsAsTypes: true,
        scalars: {
          ID: "string",
          FloatArray: "number[][]",
          StringArray: "string[]",
          IntArray: "(number | null)[]",
        },
      },
      presetConfig: { fragmentMasking: false },
    },
  },
  silent: true,
};

export default config;
