// The keys of VerificationService's revocation feed (WatchRevocations): heartbeats, the
// reader's poll, how many streams are open at once, and how long events are kept.
import { z } from "zod";
import { configKeys } from "./key-docs.js";

/** `verification.*`: WatchRevocations and the revocation feed behind it. */
export const verificationSchema = z
  .object({
    watchHeartbeatSeconds: z.number().int().min(1).max(3600).default(10).register(configKeys, {
      env: "TESSERA_WATCH_HEARTBEAT_SECONDS",
      description:
        "WatchRevocations sends a heartbeat (with the current cursor) after this many seconds without a message; a client that hears nothing for twice as long must treat the stream as down. No heartbeat is sent while the instance cannot read the feed (the stream ends with Unavailable instead).",
    }),
    watchPollMs: z.number().int().min(10).max(60_000).default(250).register(configKeys, {
      env: "TESSERA_WATCH_POLL_MS",
      description:
        "How often each instance's one reader of the revocation feed looks for new events besides being woken: on PostgreSQL a notification wakes it at once, on SQLite the write itself does (with the state cache on); this is the fallback (on PostgreSQL while the listening session is down; on SQLite the delay when `database.stateCacheSize` is 0).",
    }),
    watchMaxStreamsPerCaller: z.number().int().min(0).default(8).register(configKeys, {
      env: "TESSERA_WATCH_MAX_STREAMS_PER_CALLER",
      description:
        "WatchRevocations streams one caller (machine user) may hold open on an instance; more are refused with ResourceExhausted. 0: no limit.",
    }),
    watchMaxStreams: z.number().int().min(0).default(1000).register(configKeys, {
      env: "TESSERA_WATCH_MAX_STREAMS",
      description:
        "WatchRevocations streams open at once on an instance, all callers together; more are refused with ResourceExhausted. 0: no limit.",
    }),
    revocationRetentionSeconds: z.number().int().min(60).default(86_400).register(configKeys, {
      env: "TESSERA_REVOCATION_RETENTION_SECONDS",
      description:
        "Revocation events older than this are deleted (every minute; the newest is always kept). A WatchRevocations cursor older than the oldest event kept answers reset: true.",
    }),
    revocationMaxEvents: z.number().int().min(1).default(1_000_000).register(configKeys, {
      env: "TESSERA_REVOCATION_MAX_EVENTS",
      description: "At most this many revocation events are kept (the oldest go first), whatever their age.",
    }),
  })
  .strict()
  .prefault({});
