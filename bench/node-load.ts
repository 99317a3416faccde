import http2 from "node:http2";
import type { LoadShape, RawLoad } from "./stats.js";

/** One run of the Node load generator. */
export interface NodeLoadOptions extends LoadShape {
  /** https://host:port */
  origin: string;
  path: string;
  body: Uint8Array;
  /** gRPC: also require `grpc-status: 0` in the trailers (or headers, for trailers-only responses). */
  grpc: boolean;
  tls: { ca: Buffer; cert?: Buffer; key?: Buffer };
  /**
   * Headers added to each request in turn (round-robin over all lanes), after `headers`:
   * e.g. one credential of a working set per request.
   */
  headerSets?: readonly Record<string, string>[];
}

/**
 * A small HTTP/2 load generator on node:http2, for what h2load cannot do: present a
 * client certificate (mTLS-only authentication). N sessions × M streams in flight, each
 * lane sending its next request when the previous one ends, latency per request from
 * `process.hrtime`. It checks more than h2load does: for gRPC, the `grpc-status`
 * trailer of every response. It is slower than h2load (JavaScript, one core), so every
 * scenario it drives is compared with a baseline driven by it too.
 */
export async function runNodeLoad(options: NodeLoadOptions): Promise<RawLoad> {
  const sessions: http2.ClientHttp2Session[] = [];
  for (let i = 0; i < options.connections; i++) {
    const session = http2.connect(options.origin, { ...options.tls, rejectUnauthorized: true });
    session.on("error", () => undefined);
    await new Promise<void>((resolve, reject) => {
      session.once("connect", () => resolve());
      session.once("error", reject);
    });
    sessions.push(session);
  }
  const latenciesUs: number[] = [];
  const statuses: Record<string, number> = {};
  let errors = 0;
  const started = process.hrtime.bigint();
  const warmupNs = BigInt(
    Math.round((options.requests === undefined ? (options.warmupSeconds ?? 1) : 0) * 1e9),
  );
  const measureFrom = started + warmupNs;
  const deadline =
    options.requests === undefined
      ? measureFrom + BigInt(Math.round((options.durationSeconds ?? 10) * 1e9))
      : null;
  let remaining = options.requests ?? Number.POSITIVE_INFINITY;
  let cpuAtStart: number | undefined;
  const cpuTimer = options.serverCpuMs
    ? setTimeout(
        () => {
          cpuAtStart = options.serverCpuMs!();
        },
        Number(warmupNs / 1_000_000n),
      )
    : undefined;
  const headers = { ":method": "POST", ":path": options.path, ...options.headers };
  const sets = options.headerSets?.map((h) => ({ ...headers, ...h }));
  let turn = 0;

  const one = (session: http2.ClientHttp2Session): Promise<void> =>
    new Promise((resolve) => {
      const t0 = process.hrtime.bigint();
      let status = -1;
      let grpcStatus: string | undefined;
      const req = session.request(sets ? sets[turn++ % sets.length]! : headers);
      req.on("response", (h) => {
        status = Number(h[":status"]);
        if (h["grpc-status"] !== undefined) grpcStatus = String(h["grpc-status"]);
      });
      req.on("trailers", (t) => {
        if (t["grpc-status"] !== undefined) grpcStatus = String(t["grpc-status"]);
      });
      req.on("data", () => undefined);
      req.on("error", () => undefined);
      req.on("close", () => {
        const t1 = process.hrtime.bigint();
        if (t0 >= measureFrom && (deadline === null || t1 <= deadline)) {
          const ok = status === options.expectStatus && (!options.grpc || grpcStatus === "0");
          statuses[String(status)] = (statuses[String(status)] ?? 0) + 1;
          if (!ok) errors++;
          latenciesUs.push(Number(t1 - t0) / 1000);
        }
        resolve();
      });
      req.end(options.body);
    });

  const lane = async (session: http2.ClientHttp2Session) => {
    for (;;) {
      if (deadline !== null && process.hrtime.bigint() >= deadline) return;
      if (deadline === null) {
        if (remaining <= 0) return;
        remaining--;
      }
      await one(session);
    }
  };
  await Promise.all(sessions.flatMap((s) => Array.from({ length: options.streams }, () => lane(s))));
  const ended = process.hrtime.bigint();
  clearTimeout(cpuTimer);
  const cpuAtEnd = options.serverCpuMs?.();
  await Promise.all(sessions.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
  const seconds = deadline === null ? Number(ended - started) / 1e9 : (options.durationSeconds ?? 10);
  return {
    generator: "node-http2",
    latenciesUs,
    seconds,
    errors,
    statuses,
    ...(cpuAtStart !== undefined && cpuAtEnd !== undefined ? { serverCpuMs: cpuAtEnd - cpuAtStart } : {}),
  };
}
