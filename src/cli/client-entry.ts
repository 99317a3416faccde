/**
 * Everything the client commands run, as one module: their actions and the mapping of
 * their errors to exit codes. The build bundles this file with all it imports into
 * dist/cli/client.bundle.js (scripts/bundle-cli.ts), because Node 20 loads the Connect and
 * protobuf runtimes as hundreds of small modules at about twice the cost of one file.
 * The error mapping is here too: it must see the error classes of the copy that threw.
 */
export { auditList } from "./audit-actions.js";
export { actions, describeClientError } from "./client-actions.js";
