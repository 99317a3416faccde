import {
  ConnectionException,
  ConstraintViolationException,
  DriverException,
  UniqueConstraintViolationException,
} from "@mikro-orm/core";
import { TesseraError } from "../errors.js";

/**
 * Database errors a handler did not expect, as the client's or the infrastructure's fault
 * rather than a bug: a unique constraint lost to a concurrent request is AlreadyExists
 * (the loser of two CreateUser for one name), another constraint (foreign key, not null,
 * check) FailedPrecondition, a lost connection Unavailable, and a value the database
 * refuses (SQLSTATE class 22: too long, bad encoding) InvalidArgument. The messages name
 * no value: a driver's message embeds the SQL with its parameters (hashes included).
 * Anything else stays a bug (undefined here: Internal).
 */
export function driverErrorAsTesseraError(err: unknown): TesseraError | undefined {
  if (!(err instanceof DriverException)) return undefined;
  if (err instanceof UniqueConstraintViolationException)
    return new TesseraError("ALREADY_EXISTS", "the object already exists");
  if (err instanceof ConstraintViolationException)
    return new TesseraError("FAILED_PRECONDITION", "the change conflicts with related objects");
  if (err instanceof ConnectionException || isConnectionLoss(err))
    return new TesseraError("UNAVAILABLE", "database unavailable", { headers: { "retry-after": "1" } });
  if (typeof err.code === "string" && err.code.startsWith("22"))
    return new TesseraError("INVALID_ARGUMENT", "a value is not acceptable");
  return undefined;
}

/**
 * PostgreSQL's ways of saying the database is not there, which MikroORM leaves as a plain
 * DriverException: SQLSTATE class 08 (connection exception), 57P01-57P03 (shut down,
 * crashed, not accepting connections yet), 53300 (too many connections), and the socket's
 * own errors.
 */
function isConnectionLoss(err: DriverException): boolean {
  const code = typeof err.code === "string" ? err.code : "";
  return (
    code.startsWith("08") ||
    /^57P0[123]$/.test(code) ||
    code === "53300" ||
    ["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "ENOTFOUND"].includes(code)
  );
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
