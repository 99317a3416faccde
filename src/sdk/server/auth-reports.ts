// What the core (tessera-auth.ts) reports to its logger: state changes once each, and the
// events a caller can cause per request in aggregate (see AggregatedLog).
import { AggregatedLog, errorFields, type TesseraLogger } from "../logger.js";
import { RECHECK_MS } from "./stream-holds.js";

/** The core's reports; `flush` writes the open intervals' lines (at close). */
export interface AuthReports {
  /** A call refused because `maxConcurrentVerifications` credentials were being verified. */
  verifyRefused(): void;
  /** A held stream's re-check refused because it waited for a verification slot past its deadline. */
  recheckRefused(): void;
  /** A VerifyCredential call that failed (Tessera unreachable, overloaded, this service refused). */
  verifyFault(err: unknown): void;
  /** A fault of the check itself (not a refusal): the call is refused with 503. */
  unexpected(err: unknown): void;
  /** A failure outside the check (a bug, of the SDK or of what it was given): the call is answered INTERNAL. */
  bug(err: unknown): void;
  /** A JWKS fetch's outcome: its error, or nothing when it succeeded. */
  jwksFetched(err?: unknown): void;
  flush(): void;
}

/** The reports of one core, to `logger`, intervals read from `now`. */
export function createAuthReports(logger: TesseraLogger, now: () => number): AuthReports {
  const refused = new AggregatedLog(
    (fields) =>
      logger.warn(
        fields,
        "calls refused with 503: maxConcurrentVerifications credentials were being verified by Tessera",
      ),
    now,
  );
  const rechecks = new AggregatedLog(
    (fields) =>
      logger.warn(
        fields,
        `held streams ended with 503: their re-check waited ${RECHECK_MS / 1000} s for one of maxConcurrentVerifications (Tessera answering slowly, or more distinct credentials held than it verifies in that time)`,
      ),
    now,
  );
  const faults = new AggregatedLog(
    (fields) => logger.error(fields, "Tessera could not verify credentials: calls refused with 503"),
    now,
  );
  const unexpected = new AggregatedLog(
    (fields) => logger.error(fields, "the credential check failed unexpectedly: calls refused with 503"),
    now,
  );
  const bugs = new AggregatedLog(
    (fields) =>
      logger.error(
        fields,
        "the Tessera SDK failed outside the credential check (a bug, of the SDK or of the rule, context or handler it was given): calls answered INTERNAL (500)",
      ),
    now,
  );
  // Failed fetches in a row: the first is reported, the rest when one succeeds again. They
  // are bounded already (at most one attempt a second, or per jwksRefetchGapMs for a kid).
  let jwksFailures = 0;
  return {
    verifyRefused: () => refused.add(),
    recheckRefused: () => rechecks.add(),
    verifyFault: (err) => faults.add(errorFields(err, true)),
    // Without its message: a fault while parsing may quote what it parsed.
    unexpected: (err) => unexpected.add(errorFields(err, false)),
    // Where it failed (the stack's first frame), not what it said: a bug's message may quote its input.
    bug: (err) => bugs.add({ ...errorFields(err, false), at: frameOf(err) }),
    jwksFetched(err) {
      if (err === undefined) {
        if (jwksFailures > 0) logger.info?.({ failures: jwksFailures }, "Tessera's JWKS fetched again");
        jwksFailures = 0;
        return;
      }
      jwksFailures++;
      if (jwksFailures === 1)
        logger.warn(
          { error: errorFields(err, true) },
          "Tessera's JWKS cannot be fetched: the last keys stay in use (without any, access tokens are refused with 503)",
        );
    },
    flush() {
      refused.flush();
      rechecks.flush();
      faults.flush();
      unexpected.flush();
      bugs.flush();
    },
  };
}

/**
 * The first frame of `err`'s stack ("at fn (file:line:col)"): code locations, never data. Read
 * past the stack's head, which repeats the message (whose lines might look like frames).
 */
function frameOf(err: unknown): string | undefined {
  if (!(err instanceof Error) || typeof err.stack !== "string") return undefined;
  const head = err.message === "" ? err.name : `${err.name}: ${err.message}`;
  if (!err.stack.startsWith(head)) return undefined;
  return err.stack
    .slice(head.length)
    .split("\n")
    .find((line) => line.trimStart().startsWith("at "))
    ?.trim();
}
