import type { CodegenConfig } from "@graphql-codegen/cli";

// Types for every operation in src/, generated from the schema interpql exports (schema.graphql).
const config: CodegenConfig = {
  schema: ["../../schema.graphql", "federation.graphql"],
  documents: ["src/**/*.ts", "!src/gql/**"],
  generates: {
    "src/gql/": {
      preset: "client",
      config: {
        // Documents as plain strings with their types attached: no GraphQL runtime needed.
        documentMode: "string",
        useTypeImports: true,
        enumsAsTypes: true,
        scalars: {
          ID: "string",
          FloatArray: "number[] | number[][] | number[][][]",
          StringArray: "string[]",
        },
      },
      presetConfig: { fragmentMasking: false },
    },
  },
  // Relative imports with .js extensions, as Node.js ES modules need.
  emitLegacyCommonJSImports: false,
  silent: true,
};

export default config;
