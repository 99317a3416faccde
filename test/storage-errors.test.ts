import {
  ConnectionException,
  DriverException,
  ForeignKeyConstraintViolationException,
  NotNullConstraintViolationException,
  UniqueConstraintViolationException,
} from "@mikro-orm/core";
import { describe, expect, it } from "vitest";
import { driverErrorAsTesseraError, isContentError, isOutage, loggableError } from "../src/storage/errors.js";
import { knexLog } from "../src/storage/orm.js";
import { REFUSED_SESSION_LOG_INTERVAL_MS, reportRefusedSession } from "../src/storage/refused-sessions.js";

/** A driver error as MikroORM wraps it: the driver's message embeds the SQL with its values. */
function driverError<T extends DriverException>(
  Kind: new (previous: Error) => T,
  props: Record<string, unknown> = {},
): T {
  const cause = Object.assign(
    new Error("insert into users (password_hash) values ('pbkdf2-sha256$1000$c2FsdA==$aGFzaA==')"),
    props,
  );
  return new Kind(cause);
}

describe("database errors a handler did not expect", () => {
  it("answer a lost unique constraint AlreadyExists, another constraint FailedPrecondition", () => {
    expect(driverErrorAsTesseraError(driverError(UniqueConstraintViolationException))?.reason).toBe(
      "ALREADY_EXISTS",
    );
    expect(driverErrorAsTesseraError(driverError(ForeignKeyConstraintViolationException))?.reason).toBe(
      "FAILED_PRECONDITION",
    );
    expect(driverErrorAsTesseraError(driverError(NotNullConstraintViolationException))?.reason).toBe(
      "FAILED_PRECONDITION",
    );
  });

  it("answer a database that is gone Unavailable with Retry-After", () => {
    for (const e of [
      driverError(ConnectionException),
      driverError(DriverException, { code: "57P01" }),
      driverError(DriverException, { code: "08006" }),
      driverError(DriverException, { code: "ECONNREFUSED" }),
      // Read-only (a failover's demoted primary), a session refused (password, LOGIN, pg_hba), the database gone.
      driverError(DriverException, { code: "25006" }),
      driverError(DriverException, { code: "28P01" }),
      driverError(DriverException, { code: "28000" }),
      driverError(DriverException, { code: "3D000" }),
    ]) {
      const mapped = driverErrorAsTesseraError(e);
      expect(mapped?.reason).toBe("UNAVAILABLE");
      expect(mapped?.headers["retry-after"]).toBe("1");
    }
  });

  it("answer a value the database refuses (SQLSTATE class 22, or 54000: too large for an index entry) InvalidArgument", () => {
    for (const code of ["22021", "54000"]) {
      const e = driverError(DriverException, { code });
      expect(driverErrorAsTesseraError(e)?.reason).toBe("INVALID_ARGUMENT");
      expect(isContentError(e)).toBe(true);
    }
    // A program limit that is not about a value stays a bug.
    expect(driverErrorAsTesseraError(driverError(DriverException, { code: "54001" }))).toBeUndefined();
  });

  it("answer a value PostgreSQL refused on the raw SQL path (pg's own error) InvalidArgument", () => {
    // As pg raises it for a timestamp past year 9999 in a raw query's parameter.
    const raw = Object.assign(new Error('time zone displacement out of range: "+275760-09-13"'), {
      name: "error",
      severity: "ERROR",
      code: "22009",
    });
    const mapped = driverErrorAsTesseraError(raw)!;
    expect(mapped.reason).toBe("INVALID_ARGUMENT");
    expect(mapped.message).not.toMatch(/275760/);
    const syntax = Object.assign(new Error("x"), { name: "error", severity: "ERROR", code: "42601" });
    expect(driverErrorAsTesseraError(syntax)).toBeUndefined();
  });

  it("leave anything else a bug, and never repeat a value in their message", () => {
    expect(driverErrorAsTesseraError(driverError(DriverException, { code: "42P01" }))).toBeUndefined();
    expect(driverErrorAsTesseraError(new Error("not a driver error"))).toBeUndefined();
    const mapped = driverErrorAsTesseraError(driverError(UniqueConstraintViolationException))!;
    expect(mapped.message).not.toMatch(/pbkdf2|insert/);
  });

  it("are logged by class, code and constraint only, never their message or stack", () => {
    const e = driverError(UniqueConstraintViolationException, {
      code: "23505",
      constraint: "users_username_unique",
      detail: "Key (username)=(alice) already exists.",
    });
    const logged = loggableError(e);
    expect(logged).toEqual({
      name: "UniqueConstraintViolationException",
      code: "23505",
      constraint: "users_username_unique",
    });
    // A driver error wrapped as the cause of another is described the same way.
    const wrapped = loggableError(new Error("flush failed", { cause: e }));
    expect(JSON.stringify(wrapped)).not.toMatch(/pbkdf2|alice|insert/);
  });

  it("answer every way a database is away, busy or full Unavailable, raw driver errors included", () => {
    const sqlite = (code: string) => Object.assign(new Error("x"), { name: "SqliteError", code });
    for (const e of [
      sqlite("SQLITE_BUSY"),
      sqlite("SQLITE_FULL"),
      sqlite("SQLITE_READONLY"),
      sqlite("SQLITE_IOERR_WRITE"),
      sqlite("SQLITE_CANTOPEN"),
      driverError(DriverException, { code: "SQLITE_READONLY" }),
      driverError(DriverException, { code: "53100" }),
      driverError(DriverException, { code: "57014" }),
      driverError(DriverException, { code: "55P03" }),
      // A server-side timeout the deployment set ended the session (idle, idle in a transaction, transaction).
      driverError(DriverException, { code: "57P05" }),
      driverError(DriverException, { code: "25P03" }),
      driverError(DriverException, { code: "25P04" }),
      // The database's own disk failed under it.
      driverError(DriverException, { code: "58030" }),
      // The network under the connection went away (an interface down, an address withdrawn).
      Object.assign(new Error("connect EADDRNOTAVAIL"), { code: "EADDRNOTAVAIL" }),
      Object.assign(new Error("read ENETDOWN"), { code: "ENETDOWN" }),
      Object.assign(new Error("read ECONNABORTED"), { code: "ECONNABORTED" }),
      new Error("Connection terminated unexpectedly"),
      Object.assign(new Error("Knex: Timeout acquiring a connection."), { name: "KnexTimeoutError" }),
    ]) {
      expect(isOutage(e), String((e as { code?: string }).code ?? e.message)).toBe(true);
      expect(driverErrorAsTesseraError(e)?.reason).toBe("UNAVAILABLE");
    }
    // knex closes a transaction whose BEGIN failed on a lost connection, and refuses the next statement.
    const closed = new DriverException(
      new Error("Transaction query already complete, run with DEBUG=knex:tx for more info"),
    );
    expect(driverErrorAsTesseraError(closed)?.reason).toBe("UNAVAILABLE");
    // Not faults: a constraint, a bad value, a syntax error.
    expect(isOutage(driverError(UniqueConstraintViolationException, { code: "23505" }))).toBe(false);
    expect(isOutage(driverError(DriverException, { code: "42601" }))).toBe(false);
  });

  it("tell a row the database refuses for its content from a database that is away", () => {
    expect(isContentError(driverError(UniqueConstraintViolationException, { code: "23505" }))).toBe(true);
    expect(isContentError(driverError(DriverException, { code: "22001" }))).toBe(true);
    expect(isContentError(Object.assign(new Error("x"), { code: "SQLITE_CONSTRAINT_NOTNULL" }))).toBe(true);
    expect(isContentError(driverError(ConnectionException))).toBe(false);
    expect(isContentError(new Error("Connection terminated unexpectedly"))).toBe(false);
    // Unknown: not a content error, so the audit log keeps retrying rather than dropping.
    expect(isContentError(new Error("something else"))).toBe(false);
  });

  it("keep knex's connection warnings, without the statement and its values", () => {
    const lines: string[] = [];
    knexLog((m) => lines.push(m)).warn(
      "Connection Error: Error: insert into api_tokens (secret_hash) values ('pbkdf2-sha256$1000$c2FsdA==$aGFzaA==') - read ECONNRESET",
    );
    expect(lines).toEqual(["knex: Connection Error: read ECONNRESET"]);
  });
});

describe("reportRefusedSession", () => {
  const refused = (code: string) => Object.assign(new Error("refused"), { code, severity: "FATAL" });

  it("says a refused session at error level with its SQLSTATE, at most once per interval, counting the rest", () => {
    const lines: Record<string, unknown>[] = [];
    const logger = { error: (obj: object) => lines.push(obj as Record<string, unknown>) };
    const t0 = 1_000_000;
    reportRefusedSession(new Error("wrapped", { cause: refused("28P01") }), logger, t0);
    reportRefusedSession(refused("3D000"), logger, t0 + 1);
    reportRefusedSession(refused("28000"), logger, t0 + 2);
    expect(lines).toEqual([expect.objectContaining({ sqlstate: "28P01", refusedSinceLastLine: 0 })]);
    reportRefusedSession(refused("3D000"), logger, t0 + REFUSED_SESSION_LOG_INTERVAL_MS);
    expect(lines[1]).toMatchObject({ sqlstate: "3D000", refusedSinceLastLine: 2 });
  });

  it("says nothing of other errors, outages included", () => {
    const lines: object[] = [];
    const logger = { error: (obj: object) => lines.push(obj) };
    for (const code of ["08006", "57P01", "25006", "23505"]) reportRefusedSession(refused(code), logger);
    reportRefusedSession(new Error("ECONNREFUSED"), logger);
    expect(lines).toEqual([]);
  });
});
