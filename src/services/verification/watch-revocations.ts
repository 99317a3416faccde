import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { HandlerContext } from "@connectrpc/connect";
import {
  type RevocationEvent,
  RevocationEventSchema,
  RevocationKind,
  type WatchRevocationsRequest,
  type WatchRevocationsResponse,
  WatchRevocationsResponseSchema,
} from "../../../gen/tessera/v1/verification_service_pb.js";
import type { CertificateIdentity } from "../../auth/certificate-token.js";
import { machineOfCertificate } from "../../auth/machine-principal.js";
import type { Principal } from "../../auth/principal.js";
import type { Clock } from "../../clock.js";
import { requestState } from "../../context.js";
import { TesseraError } from "../../errors.js";
import type {
  RevocationEventRepository,
  RevocationRecord,
} from "../../storage/repositories/revocation-events.js";
import type { MachineStateRepository } from "../../storage/repositories/subject-state.js";
import { markOf, type OpenedCursor } from "../../verification/revocation-cursor.js";
import {
  FEED_PAGE,
  type FeedBatch,
  FRESH_MIN_MS,
  type RevocationFeed,
} from "../../verification/revocation-feed.js";
import { principalOf, tenantScope } from "../common.js";

/** Events a stream may have waiting to be sent; past it the stream ends (Unavailable) and its client resumes. */
const MAX_QUEUED = 10_000;

/** What WatchRevocations is built from. */
export interface WatchRevocationsDeps {
  feed: RevocationFeed;
  events: RevocationEventRepository;
  heartbeatSeconds: number;
  /** Open streams per caller (machine user), and in all on this instance (0: no bound). */
  maxStreamsPerCaller: number;
  maxStreams: number;
  /** A stream ends cleanly (OK) after this long, before the server's stream lifetime cuts it (0: never). */
  maxStreamMs: number;
  /** The clock a caller's token or certificate expiry is read on (the app's). */
  clock: Clock;
  /** Whom a client certificate authenticates as now (a certificate-authenticated caller's, re-read). */
  machines: Pick<MachineStateRepository, "bindingsOf">;
}

/** Kinds sent as events (a `reset` event is answered `reset: true` instead). */
const KINDS: Record<Exclude<RevocationRecord["kind"], "reset">, RevocationKind> = {
  credential: RevocationKind.CREDENTIAL,
  session: RevocationKind.SESSION,
  subject: RevocationKind.SUBJECT,
  tenant: RevocationKind.TENANT,
};

function wireEvent(r: RevocationRecord): RevocationEvent {
  return create(RevocationEventSchema, {
    kind: r.kind === "reset" ? RevocationKind.UNSPECIFIED : KINDS[r.kind],
    id: r.subjectId,
    tenantId: r.tenantId,
    occurredAt: timestampFromMs(r.occurredAt),
  });
}

/** Whether a revocation event names the stream's own caller: its machine user, credential or tenant. */
function namesCaller(e: RevocationRecord, caller: Principal): boolean {
  switch (e.kind) {
    case "subject":
      return e.subjectId === caller.id;
    case "credential":
      return caller.credentialId !== undefined && e.subjectId === caller.credentialId;
    case "tenant":
      return e.subjectId === caller.tenantId;
    default:
      return false;
  }
}

/**
 * Whether the caller authenticated by its connection's client certificate (mTLS) or by a
 * token bound to it (RFC 8705): each request on the connection is refused once the
 * certificate no longer authenticates, and a stream must not outlive it either.
 */
function certificateBound(caller: Principal): boolean {
  return caller.method === "mtls" || caller.certificateBinding !== undefined;
}

/**
 * Whether the certificate an mTLS caller authenticated by (or its token was issued to, alone:
 * `grantingCertificate`) still authenticates as it. Another binding can take the certificate
 * (a fingerprint bound to another machine user, another tenant's binding of it) with an event
 * naming that other machine user, perhaps in another tenant, so a stream cannot tell from the
 * events alone: it asks the one rule again.
 */
async function certificateStillNames(
  deps: WatchRevocationsDeps,
  caller: Principal,
  certificate: CertificateIdentity,
): Promise<boolean> {
  try {
    return (await machineOfCertificate(deps.machines, certificate))?.machine.id === caller.id;
  } catch (err) {
    // The rule's refusals (bound in two tenants, or contested): it authenticates no one.
    if (
      err instanceof TesseraError &&
      (err.reason === "AUTH_REQUIRED" || err.reason === "CREDENTIALS_INVALID")
    )
      return false;
    throw err;
  }
}

/**
 * VerificationService.WatchRevocations (the contract is the proto's comment): the caller's
 * stream, fed by the instance's one {@link RevocationFeed}. It subscribes to the feed
 * before reading anything, so that what it reads from the database (the events after the
 * caller's cursor, up to the newest id at that moment) and what the feed then delivers
 * (every event after the feed's position, which is never past that newest id) leave no
 * gap; events at or below the stream's position are dropped, so none is sent twice.
 */
export function createWatchRevocations(
  deps: WatchRevocationsDeps,
): (req: WatchRevocationsRequest, ctx: HandlerContext) => AsyncGenerator<WatchRevocationsResponse> {
  const heartbeatMs = deps.heartbeatSeconds * 1000;
  return (req, ctx) => watch(deps, heartbeatMs, req, ctx);
}

async function* watch(
  deps: WatchRevocationsDeps,
  heartbeatMs: number,
  req: WatchRevocationsRequest,
  ctx: HandlerContext,
): AsyncGenerator<WatchRevocationsResponse> {
  const { feed, events } = deps;
  const caller = principalOf(ctx);
  const state = requestState(ctx.values);
  const tenant = tenantScope(caller);
  const callerKey = `${caller.kind}:${caller.id}`;
  if (feed.isDraining)
    throw new TesseraError("UNAVAILABLE", "shutting down", { headers: { "retry-after": "1" } });
  if (!feed.admit(callerKey, deps.maxStreamsPerCaller, deps.maxStreams))
    throw new TesseraError("RATE_LIMITED", "too many WatchRevocations streams open", {
      headers: { "retry-after": "1" },
    });
  const queue: FeedBatch[] = [];
  let queued = 0;
  let overflow = false;
  let wakeUp: (() => void) | null = null;
  const notify = () => {
    const fn = wakeUp;
    wakeUp = null;
    fn?.();
  };
  const unsubscribe = feed.subscribe((batch) => {
    queued += batch.events.length;
    if (queued > MAX_QUEUED) overflow = true;
    else queue.push(batch);
    notify();
  });
  const offDrain = feed.onDrain(notify);
  let lost = false;
  const offLost = feed.onLost(() => {
    lost = true;
    notify();
  });
  ctx.signal.addEventListener("abort", notify);
  const message = (
    cursorAt: RevocationRecord | undefined,
    list: readonly RevocationRecord[],
    reset = false,
  ) => {
    feed.countSent(list.length);
    return create(WatchRevocationsResponseSchema, {
      cursor: feed.cursors.seal(cursorAt),
      events: list.map(wireEvent),
      reset,
      heartbeatSeconds: heartbeatMs / 1000,
    });
  };
  try {
    // The first message, at once. The stream's position: the last event it accounts for (none: an empty feed).
    let at: RevocationRecord | undefined;
    const from = req.cursor === "" ? undefined : feed.cursors.open(req.cursor);
    if (req.cursor === "") {
      at = feed.anchor;
      yield message(at, []);
    } else {
      const top = await events.newest();
      if (from === undefined || !(await resumable(events, from, top?.id ?? 0))) {
        at = top;
        yield message(at, [], true);
      } else {
        let after = from.position;
        let sent = false;
        for (;;) {
          const page = await events.range(tenant, after, top?.id ?? 0, FEED_PAGE);
          // Read after the page: a pruning that raced it shows here (and the cursor cannot resume).
          // A truncation raised the mark to its `reset` event in the same commit.
          if ((await events.info()).prunedThrough > after || page.some((e) => e.kind === "reset")) {
            if (sent) throw new TesseraError("UNAVAILABLE", "events pruned while catching up; resume");
            at = top;
            yield message(at, [], true);
            sent = true;
            break;
          }
          const full = page.length === FEED_PAGE;
          at = full ? page[page.length - 1]! : top;
          after = at?.id ?? 0;
          yield message(at, page);
          sent = true;
          if (!full) break;
        }
      }
    }
    let position = at?.id ?? 0;
    let lastSent = Date.now();
    const endAt = deps.maxStreamMs > 0 ? Date.now() + deps.maxStreamMs : Number.POSITIVE_INFINITY;
    // The last instant the caller's credential authenticates: its token's end (exclusive),
    // its certificate's notAfter (inclusive). Woken then; a CRL or CA reloaded since is
    // seen at the next wake.
    const bound = certificateBound(caller);
    const authEnd = Math.min(
      caller.expiresAt != null ? caller.expiresAt - 1 : Number.POSITIVE_INFINITY,
      (bound && caller.certificate?.notAfter) || Number.POSITIVE_INFINITY,
    );
    const certificateHolds = bound ? state.certificateHolds : undefined;
    const byCertificate = caller.method === "mtls" ? caller.certificate : caller.grantingCertificate;
    while (!ctx.signal.aborted && !feed.isDraining && Date.now() < endAt) {
      // The token or certificate the caller authenticated by expired, or a CRL or CA reloaded
      // since refuses it: like a revoked caller's, the stream ends and the reconnection is refused.
      if (deps.clock() > authEnd || certificateHolds?.() === false)
        throw new TesseraError(
          "UNAVAILABLE",
          "the caller's credential no longer authenticates; reconnect and resume from the last cursor",
          { headers: { "retry-after": "1" } },
        );
      if (lost) throw feedUnavailable();
      if (overflow)
        throw new TesseraError("UNAVAILABLE", "the stream fell behind; resume from its last cursor");
      if (queue.length > 0) {
        const batches = queue.splice(0);
        queued = 0;
        let mine: RevocationRecord[] = [];
        let callerChanged = false;
        // The last truncation read, if any: the client empties its cache, so events before it need not be sent.
        let resetAt: RevocationRecord | undefined;
        // Bindings and machine users change only with SUBJECT events, of any tenant: at the
        // first of these batches' the certificate is resolved again, once.
        let resolved = byCertificate == null;
        for (const batch of batches) {
          for (const e of batch.events) {
            if (e.id <= position) continue;
            if (!resolved && e.kind === "subject") {
              resolved = true;
              if (!(await certificateStillNames(deps, caller, byCertificate!))) {
                callerChanged = true;
                break;
              }
            }
            if (e.kind === "reset") {
              resetAt = e;
              mine = [];
              continue;
            }
            if (tenant !== null && e.tenantId !== tenant) continue;
            if (namesCaller(e, caller)) {
              callerChanged = true;
              break;
            }
            mine.push(e);
          }
          if (callerChanged) break;
          if (batch.position > position) {
            at = batch.events[batch.events.length - 1];
            position = batch.position;
          }
        }
        if (resetAt) {
          yield message(mine.length === 0 && !callerChanged ? at : resetAt, [], true);
          lastSent = Date.now();
        }
        for (let i = 0; i < mine.length; i += FEED_PAGE) {
          const chunk = mine.slice(i, i + FEED_PAGE);
          const last = i + FEED_PAGE >= mine.length && !callerChanged;
          yield message(last ? at : chunk[chunk.length - 1], chunk);
          lastSent = Date.now();
        }
        // The caller itself was revoked or changed (disabled, its credential rotated, its
        // tenant disabled, its scopes, its certificate taken by another binding): the stream was admitted before that, so it ends
        // here, its cursor just before that event, and the client's reconnection is
        // authenticated and authorized again (resuming from there if it still may).
        if (callerChanged)
          throw new TesseraError(
            "UNAVAILABLE",
            "the caller changed; reconnect and resume from the last cursor",
            {
              headers: { "retry-after": "1" },
            },
          );
        continue;
      }
      const wait = lastSent + heartbeatMs - Date.now();
      if (wait <= 0) {
        // A heartbeat vouches that every event up to its cursor was sent: not while the feed cannot read.
        if (!feed.fresh(Math.max(heartbeatMs, FRESH_MIN_MS))) throw feedUnavailable();
        yield message(at, []);
        lastSent = Date.now();
        continue;
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(
          () => {
            wakeUp = null;
            resolve();
          },
          Math.min(wait, endAt - Date.now(), authEnd - deps.clock() + 1),
        );
        wakeUp = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  } finally {
    unsubscribe();
    offDrain();
    offLost();
    ctx.signal.removeEventListener("abort", notify);
    feed.release(callerKey);
  }
}

/**
 * Whether a cursor's event is still there as it was, or gone only because retention deleted
 * it and nothing after it (the mark is its id; a mark past it resets in the catch-up). Another
 * event at its id, or none below the mark, means the feed's ids went back (a restore): what
 * follows it here was never sent.
 */
async function resumable(
  events: RevocationEventRepository,
  from: OpenedCursor,
  top: number,
): Promise<boolean> {
  if (from.position === 0) return true;
  if (from.position > top) return false;
  // An earlier version's cursor: its rule (not past the end; a pruning past it resets in the catch-up).
  if (!from.mark) return true;
  const at = await events.at(from.position);
  if (at) return markOf(at).equals(from.mark);
  return (await events.info()).prunedThrough === from.position;
}

/** The end of a stream whose instance cannot vouch for the feed (its client resumes elsewhere, or later). */
function feedUnavailable(): TesseraError {
  return new TesseraError("UNAVAILABLE", "revocation feed unavailable", { headers: { "retry-after": "1" } });
}
