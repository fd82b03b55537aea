// Proof that the generated types are real, not `any`: each line below must fail to compile, and
// tsc fails on an @ts-expect-error that has no error to expect.
import type { NodeOnPromptQuery, NodeOnPromptQueryVariables } from "./gql/graphql.js";

declare const result: NodeOnPromptQuery;

// @ts-expect-error: values are numbers.
export const value: string = result.node.activations.values[0] ?? "";
// @ts-expect-error: there is no such field.
export const missing = result.node.notAField;
// @ts-expect-error: prompt is required.
export const variables: NodeOnPromptQueryVariables = { id: "m/mlp_neuron/0/0" };
// The explanation is nullable: its text cannot be read without a check.
// @ts-expect-error: object is possibly null.
export const text: string = result.node.bestExplanation.text;
