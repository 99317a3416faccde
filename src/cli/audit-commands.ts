import type { Command } from "commander";
import { idValue } from "./client-commands.js";

/** Flags of `tessera audit list`. */
export interface AuditListFlags {
  tenant?: string;
  actor?: string;
  action?: string;
  outcome?: string;
  target?: string;
  requestId?: string;
  since?: string;
  until?: string;
  limit: string;
}

/**
 * `tessera audit list`: the audit log, newest first (needs admin:audit). Only commander
 * here: the action loads actions/audit.ts (the SDK core, the generated client) when it
 * runs.
 */
export function registerAuditCommands(program: Command): void {
  const audit = program.command("audit").description("the audit log (needs admin:audit)");
  audit
    .command("list")
    .description("list audit events, newest first (your tenant's; every tenant's with *)")
    .option("--tenant <id>", "only this tenant's events (with *)", idValue("--tenant"))
    .option("--actor <id>", "only events of this actor (user, machine user)", idValue("--actor"))
    .option(
      "--action <rpc>",
      'only this RPC, e.g. "UserService/Login" or "tessera.v1.TokenService/RevokeApiKey"',
    )
    .option("--outcome <outcome>", "only success or failure")
    .option("--target <id>", "only events whose target is this id")
    .option("--request-id <id>", "only the event of this request")
    .option("--since <time>", "only events at or after this time (ISO 8601, or a duration ago: 90m, 12h, 7d)")
    .option("--until <time>", "only events before this time (ISO 8601, or a duration ago)")
    .option("--limit <n>", "print at most this many events", "100")
    .action(async (flags: AuditListFlags, cmd: Command) => {
      const { auditList } = await import("./actions/audit.js");
      await auditList(flags, cmd);
    });
}
