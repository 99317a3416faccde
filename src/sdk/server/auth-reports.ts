// What the core (tessera-auth.ts) reports to its logger: state changes once each, and the
// events a caller can cause per request in aggregate (see AggregatedLog).
import { AggregatedLog, errorFields, type TesseraLogger } from "../logger.js";

/** The core's reports; `flush` writes the open intervals' lines (at close). */
export interface AuthReports {
  /** A call refused because `maxConcurrentVerifications` credentials were being verified. */
  verifyRefused(): void;
  /** A VerifyCredential call that failed (Tessera unreachable, overloaded, this service refused). */
  verifyFault(err: unknown): void;
  /** A fault of the check itself (not a refusal): the call is refused with 503. */
  unexpected(err: unknown): void;
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
  const faults = new AggregatedLog(
    (fields) => logger.error(fields, "Tessera could not verify credentials: calls refused with 503"),
    now,
  );
  const unexpected = new AggregatedLog(
    (fields) => logger.error(fields, "the credential check failed unexpectedly: calls refused with 503"),
    now,
  );
  // Failed fetches in a row: the first is reported, the rest when one succeeds again. They
  // are bounded already (at most one attempt a second, or per jwksRefetchGapMs for a kid).
  let jwksFailures = 0;
  return {
    verifyRefused: () => refused.add(),
    verifyFault: (err) => faults.add(errorFields(err, true)),
    // Without its message: a fault while parsing may quote what it parsed.
    unexpected: (err) => unexpected.add(errorFields(err, false)),
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
      faults.flush();
      unexpected.flush();
    },
  };
}
