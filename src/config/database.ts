// The database keys: which database, and the bounds that turn a database that stops answering
// (or, on SQLite, a connection that stays taken) into Unavailable rather than hung calls.
import { z } from "zod";
import { configKeys } from "./key-docs.js";

/** `database.*`: the URL, SQL logging, the state cache and the time bounds. */
export const databaseSchema = z
  .object({
    url: z.string().min(1).default("sqlite:./data/tessera.db").register(configKeys, {
      env: "TESSERA_DATABASE_URL",
      description:
        "sqlite:<file> (or sqlite::memory:) for the embedded database; postgres://… selects PostgreSQL.",
    }),
    debug: z
      .boolean()
      .default(false)
      .register(configKeys, { env: "TESSERA_DATABASE_DEBUG", description: "Log SQL (never parameters)." }),
    stateCacheSize: z.number().int().min(0).default(10_000).register(configKeys, {
      env: "TESSERA_STATE_CACHE_SIZE",
      description:
        "Subjects (users, tokens, machine users) whose authentication state is kept in memory per statement, emptied by any change to it (SQLite: triggers and data_version; PostgreSQL: LISTEN/NOTIFY, off while the listening session is down); 0 reads it per request.",
    }),
    // PostgreSQL only (SQLite is in-process): a database that stops answering must become
    // Unavailable within a bound, not hang calls (see storage/pg-bounds.ts).
    statementTimeoutMs: z.number().int().min(0).max(600_000).default(5_000).register(configKeys, {
      env: "TESSERA_DATABASE_STATEMENT_TIMEOUT_MS",
      description:
        "PostgreSQL: longest a statement may run (the server's statement_timeout); a database that does not answer at all is given up on by the client 1 s after it. Either way the call is answered Unavailable (503, Retry-After). Migrations and the start-up lock's wait are exempt. 0: no bound.",
    }),
    connectTimeoutMs: z.number().int().positive().max(120_000).default(5_000).register(configKeys, {
      env: "TESSERA_DATABASE_CONNECT_TIMEOUT_MS",
      description:
        "Longest wait for a database connection. PostgreSQL: for a new connection (TCP and start-up) and for a free pooled connection; past it the call is answered Unavailable. SQLite: for its one connection while other requests' transactions hold it (each 1 s at most); past it a state read is answered Unavailable. A write outside the ORM (audit, last-used times) waits its turn (the pool's own bound, 60 s, at most), and runs inside an open transaction only once that one has held the connection past 1 s (or past that bound).",
    }),
    barrierTimeoutMs: z.number().int().positive().max(60_000).default(1_000).register(configKeys, {
      env: "TESSERA_STATE_BARRIER_TIMEOUT_MS",
      description:
        "PostgreSQL: how long a write to authentication state waits for every instance to acknowledge it emptied its state cache; past it the silent instances' listening sessions are ended, which turns their caches off. Also how long an instance trusts its cache after the last query its listening session answered was sent: instances of one schema must share it.",
    }),
  })
  .strict()
  .prefault({});
