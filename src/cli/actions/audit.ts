import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Command } from "commander";
import { type AuditEvent, AuditEventSchema, AuditService } from "../../../gen/tessera/v1/audit_service_pb.js";
import { ClientConfigError } from "../../sdk/errors.js";
import type { AuditListFlags } from "../audit-commands.js";
import { messageJson, when } from "../messages.js";
import { readPages } from "./pages.js";
import { parseDuration, withClient } from "./run.js";

// `tessera audit list`, loaded only when it runs (see audit-commands.ts).

/** "2026-12-04T10:00:00Z" as that instant; "90m", "12h", "7d" as that long ago. */
export function parseInstant(value: string, flag: string, now = Date.now()): Date {
  if (/^\d+\s*[smhdw]?$/.test(value.trim())) return new Date(now - parseDuration(value) * 1000);
  const d = new Date(value);
  if (Number.isNaN(d.getTime()))
    throw new ClientConfigError(
      `invalid ${flag} "${value}": use an ISO 8601 time or a duration ago (e.g. 12h)`,
    );
  return d;
}

/**
 * An action as the server records it: a bare "UserService/Login" is in package tessera.v1;
 * the OAuth endpoints' own actions ("oauth2/revoke") are not RPCs and stay as they are.
 */
function fullAction(action: string): string {
  return action.includes(".") || action.startsWith("oauth2/") ? action : `tessera.v1.${action}`;
}

function auditRow(e: AuditEvent): string[] {
  return [
    when(e.time),
    e.action.replace(/^tessera\.v1\./, ""),
    e.outcome,
    e.reason || "-",
    e.actorId ? `${e.actorKind}:${e.actorId}` : e.actorKind,
    e.targetId || "-",
    e.requestId,
  ];
}

/** `tessera audit list`. */
export async function auditList(flags: AuditListFlags, cmd: Command): Promise<void> {
  const limit = Number(flags.limit);
  if (!Number.isInteger(limit) || limit <= 0)
    throw new ClientConfigError(`invalid --limit "${flags.limit}": a positive integer`);
  if (flags.outcome && flags.outcome !== "success" && flags.outcome !== "failure")
    throw new ClientConfigError(`invalid --outcome "${flags.outcome}": success or failure`);
  const filters = {
    ...(flags.tenant ? { tenantId: flags.tenant } : {}),
    ...(flags.actor ? { actorId: flags.actor } : {}),
    ...(flags.action ? { action: fullAction(flags.action) } : {}),
    ...(flags.outcome ? { outcome: flags.outcome } : {}),
    ...(flags.target ? { targetId: flags.target } : {}),
    ...(flags.requestId ? { requestId: flags.requestId } : {}),
    ...(flags.since ? { startTime: timestampFromDate(parseInstant(flags.since, "--since")) } : {}),
    ...(flags.until ? { endTime: timestampFromDate(parseInstant(flags.until, "--until")) } : {}),
  };
  await withClient(cmd, async ({ api, out }) => {
    const read = await readPages(
      AuditEventSchema,
      async (pageToken, count) => {
        const res = await api.client(AuditService).listAuditEvents({
          ...filters,
          pageSize: Math.min(200, limit - count),
          pageToken,
        });
        return { items: res.events, next: res.nextPageToken };
      },
      (count) => count >= limit,
    );
    const events = read.items.slice(0, limit);
    const pageToken = read.next;
    out.list(
      { events: events.map((e) => messageJson(AuditEventSchema, e)) },
      ["TIME", "ACTION", "OUTCOME", "REASON", "ACTOR", "TARGET", "REQUEST"],
      events.map(auditRow),
    );
    if (read.capped)
      out.note(
        `(more events: the CLI reads at most ${read.capped} of one list; narrow with --since/--until)`,
      );
    else if (pageToken && !out.json) out.note(`(more events: raise --limit, or narrow with --since/--until)`);
  });
}
