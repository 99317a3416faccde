import type { Command } from "commander";
import type { OutputFormat } from "../output.js";

// The global flags as client commands read them; apart from run.ts (the SDK client) so that
// whoami's own call (whoami.ts) reads them without loading the client.

/** Options every client command accepts (declared once, on the program). */
export interface GlobalFlags {
  profile?: string;
  server?: string;
  certFolder?: string;
  caFile?: string;
  protocol?: "grpc" | "connect";
  output: OutputFormat;
}

/** The program's global flags as a command sees them. */
export function globals(cmd: Command): GlobalFlags {
  return cmd.optsWithGlobals() as GlobalFlags;
}

/** The connection-related global flags as SDK options. */
export function connectionFlags(g: GlobalFlags) {
  return {
    profile: g.profile,
    server: g.server,
    certFolder: g.certFolder,
    caFile: g.caFile,
    protocol: g.protocol,
  };
}
