import { ConnectError } from "@connectrpc/connect";
import {
  ConnectionException,
  ConstraintViolationException,
  DriverException,
  UniqueConstraintViolationException,
} from "@mikro-orm/core";
import { TesseraError } from "../errors.js";
import { lostCommit, outcomeUnknownError } from "./commit-outcome.js";

/**
 * Database errors a handler did not expect, as the client's or the infrastructure's fault
 * rather than a bug: a unique constraint lost to a concurrent request is AlreadyExists
 * (the loser of two CreateUser for one name), another constraint (foreign key, not null,
 * check) FailedPrecondition, a lost connection Unavailable, and a value the database
 * refuses (SQLSTATE class 22: too long, bad encoding; 54000: too large for an index entry,
 * e.g. a SAN URI of 2,048 multi-byte characters) InvalidArgument. The messages name
 * no value: a driver's message embeds the SQL with its parameters (hashes included).
 * Anything else stays a bug (undefined here: Internal).
 */
export function driverErrorAsTesseraError(err: unknown): TesseraError | undefined {
  // Tessera's own errors (every refusal) are already what they mean: no look at them here.
  if (err instanceof TesseraError || err instanceof ConnectError) return undefined;
  // A COMMIT whose answer was lost: an outage too, but the change may have been saved, and
  // the client is told so (metadata.outcome = "unknown"); see commit-outcome.ts.
  if (lostCommit(err) !== undefined) return outcomeUnknownError();
  // First, and for any error (the raw SQL path's better-sqlite3 and pg errors, a pool's
  // timeout): a database that is away, busy or full is a fault to retry, never a bug.
  if (isOutage(err))
    return new TesseraError("UNAVAILABLE", "database unavailable", { headers: { "retry-after": "1" } });
  // A value PostgreSQL refused on the raw SQL path (its driver's error, not wrapped by the
  // ORM): the same client mistake as through the ORM.
  if (!(err instanceof DriverException)) return isRawPgValueError(err) ? valueNotAcceptable() : undefined;
  if (err instanceof UniqueConstraintViolationException)
    return new TesseraError("ALREADY_EXISTS", "the object already exists");
  if (err instanceof ConstraintViolationException)
    return new TesseraError("FAILED_PRECONDITION", "the change conflicts with related objects");
  if (isValueCode(err.code)) return valueNotAcceptable();
  return undefined;
}

/**
 * SQLSTATE class 22 (data exception) and 54000 (program_limit_exceeded: PostgreSQL's
 * "index row size exceeds btree maximum", a value longer in bytes than an index entry
 * holds, which a length bound in characters does not prevent).
 */
function isValueCode(code: unknown): boolean {
  return typeof code === "string" && (/^22[0-9A-Z]{3}$/.test(code) || code === "54000");
}

function valueNotAcceptable(): TesseraError {
  return new TesseraError("INVALID_ARGUMENT", "a value is not acceptable");
}

/** A pg driver error (it carries the server's `severity` and SQLSTATE) of class 22, data exception. */
function isRawPgValueError(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  const { code, severity } = err as { code?: unknown; severity?: unknown };
  return typeof severity === "string" && isValueCode(code);
}

/** Node's socket errors: the database's host is not there, or the connection broke. */
const SOCKET_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EPIPE",
  "ENOTFOUND",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EAI_AGAIN",
  "EADDRNOTAVAIL",
  "ENETDOWN",
  "EHOSTDOWN",
  "ECONNABORTED",
]);

/**
 * Messages of errors that carry no code: pg's "Connection terminated unexpectedly" (the
 * server closed the socket), its connect timeout, its client-side statement bound
 * ("Query read timeout": the server did not answer in time, see pg-bounds.ts) and its
 * connect bound (the socket destroyed with "timeout expired": no start-up answer in time), knex's pool timeout (every pooled
 * connection is stuck on a database that does not answer), and knex's "Transaction query
 * already complete": a transaction whose BEGIN (or an earlier statement) failed on a lost
 * connection is marked complete by knex, which keeps the socket error to itself and
 * refuses the ORM's next statement with this message (seen under load when PostgreSQL was
 * cut mid-flush). Tessera's code never issues a statement on a finished transaction (every
 * transaction is an `em.transactional` callback), so here it means a lost connection.
 */
const OUTAGE_MESSAGES =
  /Connection terminated|Query read timeout|^timeout expired$|Timeout acquiring a connection|timeout exceeded when trying to connect|Connection ended unexpectedly|Client has encountered a connection error|connection is closed|The database connection is not open|Transaction query already complete/i;

/**
 * Whether `err` (or an error it wraps) says the database cannot serve the request now,
 * rather than that the request or the code is wrong: a refused, reset or timed-out
 * connection; PostgreSQL's SQLSTATE class 08 (connection exception), class 28 and 3D000 (a
 * new session refused: the role's password rotated ahead of the configuration, its LOGIN
 * taken away, pg_hba.conf, the database renamed or being restored), 57P01-57P05 (shut
 * down, crashed, starting, database dropped, idle session timeout), 25P03/25P04 (a
 * session's idle-in-transaction or transaction timeout ended it), class 53 (insufficient resources: too many connections, disk
 * or memory full), 57014 (statement timeout), 55P03 (a lock not granted within a
 * `lock_timeout` the deployment set on its role or database: another session holds it),
 * 40001/40P01 (serialization failure, deadlock: worth a retry), 25006 (a write refused by
 * a database that is read-only now: a primary demoted by a failover, a standby, or
 * `default_transaction_read_only` set for maintenance; as a read-only SQLite file) and class
 * 58 (the database's own system or I/O error: its disk, not the request);
 * SQLite's BUSY and LOCKED (another process holds the write lock past the busy timeout),
 * FULL (disk full), IOERR, READONLY and CANTOPEN (the file or its folder went away or
 * became read-only). Each is answered Unavailable with Retry-After.
 */
export function isOutage(err: unknown): boolean {
  for (let e = err, depth = 0; e instanceof Error && depth < 4; e = e.cause, depth++) {
    if (e instanceof ConnectionException || e.name === "KnexTimeoutError") return true;
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") {
      if (
        code.startsWith("08") ||
        /^28[0-9A-Z]{3}$/.test(code) ||
        code === "3D000" ||
        /^57P0[1-5]$/.test(code) ||
        code === "25P03" ||
        code === "25P04" ||
        code.startsWith("53") ||
        code.startsWith("58") ||
        ["57014", "55P03", "40001", "40P01", "25006"].includes(code) ||
        SOCKET_CODES.has(code) ||
        /^SQLITE_(BUSY|LOCKED|FULL|IOERR|READONLY|CANTOPEN|PROTOCOL|NOLFS)/.test(code)
      )
        return true;
    }
    if (OUTAGE_MESSAGES.test(e.message)) return true;
  }
  return false;
}

/**
 * Whether the database refused a write for what it holds (a constraint, a value out of
 * range or too long) rather than for its own state: retrying the same row cannot help.
 */
export function isContentError(err: unknown): boolean {
  if (isOutage(err)) return false;
  for (let e = err, depth = 0; e instanceof Error && depth < 4; e = e.cause, depth++) {
    if (e instanceof ConstraintViolationException) return true;
    const code = (e as { code?: unknown }).code;
    if (
      typeof code === "string" &&
      (/^2[23]/.test(code) || code === "54000" || /^SQLITE_(CONSTRAINT|TOOBIG|MISMATCH|RANGE)/.test(code))
    )
      return true;
  }
  return false;
}

/**
 * What a log line may say about an error. A database driver's error (MikroORM's
 * DriverException, or the driver's own under it) is described by its class, code and
 * constraint only: its message and stack embed the SQL with its parameter values
 * (password hashes, token hashes), and PostgreSQL's `detail` repeats the key's value.
 */
export function loggableError(err: unknown): Record<string, unknown> {
  if (isDriverError(err)) {
    const e = err as Error & { code?: unknown; constraint?: unknown; table?: unknown };
    return {
      name: e.name,
      ...(e.code !== undefined ? { code: String(e.code) } : {}),
      ...(typeof e.constraint === "string" ? { constraint: e.constraint } : {}),
      ...(typeof e.table === "string" ? { table: e.table } : {}),
    };
  }
  if (err instanceof Error) {
    const cause = err.cause === undefined ? {} : { cause: loggableError(err.cause) };
    return { name: err.name, message: err.message, ...(err.stack ? { stack: err.stack } : {}), ...cause };
  }
  return { name: "unknown", message: String(err) };
}

/** A MikroORM driver exception, or a raw driver error (pg's carry a SQLSTATE, better-sqlite3's are SqliteError). */
function isDriverError(err: unknown): boolean {
  if (err instanceof DriverException) return true;
  if (!(err instanceof Error)) return false;
  if (err.name === "SqliteError") return true;
  const e = err as { code?: unknown; severity?: unknown; routine?: unknown };
  return typeof e.code === "string" && /^[0-9A-Z]{5}$/.test(e.code) && e.severity !== undefined;
}
