import { existsSync } from "node:fs";

/** The client commands' implementations (src/cli/client-entry.ts). */
export type ClientModule = typeof import("./client-entry.js");

/**
 * Where the build puts the bundle, seen from this module compiled into dist/src/cli/.
 * Run from the TypeScript sources (tsx), this module's URL ends in .ts and the bundle is
 * never used: it would be a stale build of other sources.
 */
const BUNDLE = new URL("../../cli/client.bundle.js", import.meta.url);
const COMPILED = import.meta.url.endsWith(".js");

let loading: Promise<ClientModule> | undefined;

/**
 * Load the client commands' implementations once: the bundle when running from dist/
 * and the build made one, the separate modules otherwise. Every caller gets the same
 * copy, so an error class thrown by an action is the one `describeClientError` checks.
 */
export function loadClientModule(): Promise<ClientModule> {
  loading ??=
    COMPILED && existsSync(BUNDLE)
      ? (import(BUNDLE.href) as Promise<ClientModule>)
      : import("./client-entry.js");
  return loading;
}
