/**
 * Bounds on every PostgreSQL use, so that a database that stops answering (a frozen host,
 * a partition that drops packets without a reset) makes calls fail as an outage within a
 * known time instead of hanging them:
 * - connecting: pg's `connectionTimeoutMillis` (TCP and the start-up exchange) and knex's
 *   `acquireConnectionTimeout` (waiting for a pooled connection, all of them stuck included);
 * - each statement: the server's `statement_timeout` (a start-up parameter of every pooled
 *   session: a slow statement is cancelled by PostgreSQL itself, SQLSTATE 57014), and pg's
 *   client-side `query_timeout`, {@link CLIENT_TIMEOUT_MARGIN_MS} later, for a server that
 *   cannot say anything at all. A connection whose statement timed out on the client is
 *   closed: its protocol state is unknown, and the statements queued behind it would wait
 *   on it.
 *
 * Statements that may legitimately run longer opt out explicitly: migrations (`exempt`
 * of {@link pgBoundOptions} plus `set local statement_timeout = 0` in their transaction)
 * and the start-up lock's wait (its own bound, see startup-lock.ts).
 */

import { watchCommits } from "./commit-outcome.js";

/** How much later than the server's statement_timeout the client gives up on a statement. */
export const CLIENT_TIMEOUT_MARGIN_MS = 1_000;

/** The bounds a storage was opened with (milliseconds; statementTimeoutMs 0: none). */
export interface PgBounds {
  statementTimeoutMs: number;
  connectTimeoutMs: number;
}

/** The message of pg's client-side `query_timeout` error. */
export const QUERY_READ_TIMEOUT = "Query read timeout";

/** The few members of a pg client the pool hook uses. */
interface PgPooledClient {
  query(config: unknown, ...rest: unknown[]): unknown;
  processID?: number | null;
  connection?: { stream?: { destroy(): void } };
  __knex__disposed?: unknown;
}

/**
 * The knex options (MikroORM's `driverOptions`, merged into its knex configuration: see
 * AbstractSqlConnection.getKnexOptions) and the pool options carrying `bounds`, and
 * `exempt(fn)`: run `fn` with no client-side bound on what this pool sends meanwhile (the
 * server-side one is lifted by `set local statement_timeout = 0` in the caller's
 * transaction); the whole pool's while it runs, so meant for work nothing else runs
 * beside (migrations, before serving).
 */
export function pgBoundOptions(bounds: PgBounds): {
  driverOptions: { acquireConnectionTimeout: number; connection: Record<string, unknown> };
  pool: { afterCreate(conn: PgPooledClient, done: (err: Error | null, conn: unknown) => void): void };
  exempt<T>(fn: () => Promise<T>): Promise<T>;
} {
  const clientTimeout =
    bounds.statementTimeoutMs > 0 ? bounds.statementTimeoutMs + CLIENT_TIMEOUT_MARGIN_MS : 0;
  const state = { exemptions: 0 };
  return {
    async exempt(fn) {
      state.exemptions++;
      try {
        return await fn();
      } finally {
        state.exemptions--;
      }
    },
    driverOptions: {
      acquireConnectionTimeout: bounds.connectTimeoutMs,
      connection: {
        connectionTimeoutMillis: bounds.connectTimeoutMs,
        ...(bounds.statementTimeoutMs > 0 ? { statement_timeout: bounds.statementTimeoutMs } : {}),
        // A socket whose peer vanished without a reset is found by TCP as well.
        keepAlive: true,
      },
    },
    pool: {
      afterCreate(conn, done) {
        // A COMMIT whose answer is lost (this bound among the causes) is marked as such.
        watchCommits(conn);
        if (clientTimeout > 0) boundQueries(conn, clientTimeout, state);
        done(null, conn);
      },
    },
  };
}

/**
 * Give every query of `conn` pg's `query_timeout` (unless the query sets its own, or an
 * exemption is under way), and close the connection when one fires.
 */
function boundQueries(conn: PgPooledClient, timeoutMs: number, state: { exemptions: number }): void {
  const query = conn.query.bind(conn);
  conn.query = (config: unknown, ...rest: unknown[]) => {
    if (config === null || typeof config !== "object" || state.exemptions > 0) return query(config, ...rest);
    const q = config as { query_timeout?: number; callback?: unknown };
    if (q.query_timeout === undefined) q.query_timeout = timeoutMs;
    // knex passes a callback (postgres dialect `_query`): wrap it to see the timeout.
    const cb = rest[rest.length - 1];
    if (typeof cb === "function") {
      rest[rest.length - 1] = (err: unknown, res: unknown) => {
        if (err instanceof Error && err.message === QUERY_READ_TIMEOUT) drop(conn, err);
        (cb as (e: unknown, r: unknown) => void)(err, res);
      };
      return query(config, ...rest);
    }
    const result = query(config, ...rest);
    if (result instanceof Promise)
      result.catch((err: unknown) => {
        if (err instanceof Error && err.message === QUERY_READ_TIMEOUT) drop(conn, err);
      });
    return result;
  };
}

/** Take `conn` out of the pool for good: knex discards a disposed connection when it is next acquired. */
function drop(conn: PgPooledClient, err: Error): void {
  conn.__knex__disposed = err;
  conn.connection?.stream?.destroy();
}
