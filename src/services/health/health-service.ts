import type { ServiceImpl } from "@connectrpc/connect";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  type Health,
  HealthCheckResponse_ServingStatus as Status,
} from "../../../gen/grpc/health/v1/health_pb.js";
import { ServingState } from "./serving-state.js";

/**
 * grpc.health.v1.Health. The overall status ("") and each served service are SERVING
 * while the database answers; unknown service names are NotFound, as the protocol says.
 * A Watch ends with OK after `maxWatchMs` (0: never): it is public, and an endless one
 * would hold its connection (and a DB query every 5 s) for ever; clients re-watch. From
 * the start of a shutdown (`serving`) every status is NOT_SERVING, and once the server
 * stops accepting, watches end with OK (see serving-state.ts).
 */
export function createHealthService(deps: {
  ping: () => Promise<boolean>;
  services: readonly string[];
  maxWatchMs?: number;
  serving?: ServingState;
}): ServiceImpl<typeof Health> {
  const maxWatchMs = deps.maxWatchMs ?? 0;
  const serving = deps.serving ?? new ServingState();
  const known = new Set(["", ...deps.services]);
  // Draining is read after the ping too: a drain begun while the database answered is told.
  const status = async () =>
    !serving.draining && (await deps.ping()) && !serving.draining ? Status.SERVING : Status.NOT_SERVING;
  return {
    async check(req) {
      if (!known.has(req.service)) throw new ConnectError(`unknown service ${req.service}`, Code.NotFound);
      return { status: await status() };
    },
    async list() {
      const s = await status();
      const statuses: Record<string, { status: Status }> = {};
      for (const name of known) statuses[name] = { status: s };
      return { statuses };
    },
    async *watch(req, ctx) {
      if (!known.has(req.service)) {
        yield { status: Status.SERVICE_UNKNOWN };
        return;
      }
      let last: Status | undefined;
      const endAt = maxWatchMs > 0 ? Date.now() + maxWatchMs : Number.POSITIVE_INFINITY;
      for (;;) {
        if (ctx.signal.aborted) return;
        const seen = serving.phase;
        const s = await status();
        if (s !== last) {
          last = s;
          yield { status: s };
        }
        if (serving.closed || Date.now() >= endAt) return;
        // Ends at once on a signal aborted meanwhile (or before: a listener added then never
        // fired, and the call slept 5 s) or a shutdown's step, and leaves no listener behind per turn.
        await serving.sleep(Math.min(5000, endAt - Date.now()), ctx.signal, seen);
      }
    },
  };
}
