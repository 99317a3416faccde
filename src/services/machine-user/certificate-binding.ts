// Certificate bindings: which client certificate identifies a machine user, and when a bind
// proves possession of it. Identities are unique per tenant: a proven bind outranks (and
// ends the tokens of) another tenant's unproven binding of it without revealing or removing it.
import { randomUUID } from "node:crypto";
import type { HandlerContext, ServiceImpl } from "@connectrpc/connect";
import { UniqueConstraintViolationException } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/knex";
import type { MachineUserService } from "../../../gen/tessera/v1/machine_user_service_pb.js";
import { auditFiling } from "../../admission/audit.js";
import { assertMayManage } from "../../auth/authority.js";
import { parseScopeString } from "../../auth/scopes.js";
import type { Clock } from "../../clock.js";
import { type RequestState, requestState } from "../../context.js";
import { errors } from "../../errors.js";
import { lockMachineUser } from "../../storage/lock-order.js";
import { MachineUser, MachineUserCertificate } from "../../storage/machine-entities.js";
import { assertId, assertScopesHold, principalOf, writeIfScopesHold } from "../common.js";
import { raiseRevocationCutoff, revokeMachineAccessTokens } from "./access-token.js";
import type { MachineUserLookups } from "./lookups.js";
import type { MachineUserServiceDeps } from "./machine-user-service.js";
import { bindingToProto } from "./messages.js";

/**
 * The audit action of an unproven binding outranked by another tenant's proven bind of its
 * identity (the name is from when the binding was deleted: audit readers filter on it).
 */
export const DISPLACED_ACTION = "tessera.v1.MachineUserService/BindCertificate:displaced";

/**
 * Whether the bind request proves possession of the certificate it binds: its connection
 * presents a CA-verified client certificate (the TLS layer checked chain and CRL; an
 * untrusted one is never on the request) whose fingerprint is the one bound, or which
 * carries the SAN URI bound. Not from a request with an Origin header: a browser presents
 * its user's client certificate on any site's cross-origin call, so a page holding the
 * caller's token could prove a certificate its user never meant to bind. Not through a
 * trusted proxy: its connection and certificate are shared by every client behind it.
 */
export function possessionProven(
  state: RequestState,
  headers: Headers,
  identity: { sha256Fingerprint: string | null; sanUri: string | null },
): boolean {
  const cert = state.certificate;
  if (cert === null || state.viaProxy || headers.has("origin")) return false;
  if (identity.sha256Fingerprint !== null) return cert.sha256Fingerprint === identity.sha256Fingerprint;
  return identity.sanUri !== null && cert.sanUris.includes(identity.sanUri);
}

/** Lowercase hex without colons, or InvalidArgument. */
function normaliseFingerprint(raw: string): string {
  const hex = raw.replace(/:/g, "").toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(hex)) {
    throw errors.invalidArgument(
      "sha256_fingerprint must be 64 hex digits (colons allowed)",
      "sha256_fingerprint",
    );
  }
  return hex;
}

function assertSanUri(raw: string): string {
  if (raw.length > 2048 || !/^[a-z][a-z0-9+.-]*:\/\/\S+$/i.test(raw)) {
    throw errors.invalidArgument(
      "san_uri must be an absolute URI such as spiffe://example.org/backend",
      "san_uri",
    );
  }
  return raw;
}

/**
 * Within its tenant a fingerprint binding outranks every SAN URI binding of the same
 * certificate (machineOfCertificate): binding a fingerprint takes that certificate from the
 * machine users its SAN URIs are bound to, a change to each of them, so the caller needs
 * authority over them too (assertMayManage), not only over the machine user it binds to.
 * Else a holder of admin:machine-users turns a stronger machine user's certificate into one
 * of its own weak machine users (the certificate's fingerprint is public). With proof the
 * certificate is on the connection and its SAN URIs are known; without, it is not, so every
 * other machine user of the tenant bound by a SAN URI counts (bind with proof to do less).
 * This is the early, explicit refusal; the rule itself holds at authentication, where the
 * binder's recorded scopes must cover the SAN URI-bound machine user's current ones
 * (machineOfCertificate), so a SAN URI binding made after the fingerprint's is not outranked.
 */
async function assertMayOutrankSanBindings(
  ctx: HandlerContext,
  e: EntityManager,
  mu: MachineUser,
  sanUris: readonly string[] | null,
): Promise<void> {
  if (sanUris !== null && sanUris.length === 0) return;
  const query = e
    .getKnex()("machine_user_certificates as b")
    .join("machine_users as m", "m.id", "b.machine_user_id")
    .where("m.tenant_id", mu.tenantId)
    .whereNot("m.id", mu.id)
    .whereNotNull("b.san_uri")
    .distinct("m.scopes");
  if (sanUris !== null) query.whereIn("b.san_uri", [...sanUris]);
  const holders = (await query) as { scopes: string }[];
  if (holders.length > 0)
    assertMayManage(principalOf(ctx), { scopes: holders.flatMap((h) => parseScopeString(h.scopes)) });
}

/** Another tenant's unproven binding of an identity just proven (see {@link outrankElsewhere}). */
interface OutrankedBinding {
  id: string;
  machineUserId: string;
  tenantId: string;
}

/**
 * In the proof's transaction: the other tenants' unproven bindings of the identity just
 * proven, which the proof now outranks (machineOfCertificate: a proof outranks another
 * tenant's unproven binding). They stay (their tenants' to remove; nothing here tells the
 * prover of them), but end as an unbound binding would: the access tokens certificates
 * obtained through them are bound to those certificates, not to the binding, and would
 * outlive it. Each machine user is locked before its row is written (storage/lock-order.ts),
 * in id order; one deleted meanwhile took its binding with it.
 */
async function outrankElsewhere(
  tx: EntityManager,
  tenantId: string,
  identity: { sha256Fingerprint: string } | { sanUri: string | null },
  cutoff: number,
  clockSkewSeconds: number,
): Promise<OutrankedBinding[]> {
  const rows = await tx.find(
    MachineUserCertificate,
    { ...identity, tenantId: { $ne: tenantId }, proven: false },
    { fields: ["id", "machineUserId", "tenantId"], orderBy: { machineUserId: "asc", id: "asc" } },
  );
  const outranked: OutrankedBinding[] = [];
  const revoked = new Set<string>();
  for (const r of rows) {
    if (!revoked.has(r.machineUserId)) {
      if (!(await lockMachineUser(tx, r.machineUserId, "key share"))) continue;
      await revokeMachineAccessTokens(tx, r.machineUserId, cutoff, clockSkewSeconds);
      revoked.add(r.machineUserId);
    }
    outranked.push({ id: r.id, machineUserId: r.machineUserId, tenantId: r.tenantId });
  }
  return outranked;
}

/**
 * After the proof committed: the outranked bindings' machine users' cut-offs raised (as an
 * unbinding's), and an event in each one's tenant, so its auditors see why its binding no
 * longer authenticates; the answer to this caller is the same either way. The prover is of
 * another tenant: its id and address are not that tenant's to read (tenants are walls), so
 * the event names no actor. The prover's own BindCertificate event, in its tenant, carries
 * the same request id for an operator who needs both.
 */
async function afterOutranking(
  deps: MachineUserServiceDeps,
  e: EntityManager,
  ctx: HandlerContext,
  outranked: readonly OutrankedBinding[],
  cutoff: number,
  clock: Clock,
): Promise<void> {
  const raised = new Set<string>();
  for (const b of outranked) {
    if (!raised.has(b.machineUserId)) {
      raised.add(b.machineUserId);
      await raiseRevocationCutoff(e, b.machineUserId, cutoff, clock(), deps.clockSkewSeconds);
    }
    deps.audit?.record({
      requestId: requestState(ctx.values).requestId,
      ...auditFiling(null, b.tenantId),
      actorKind: "system",
      actorId: null,
      action: DISPLACED_ACTION,
      targetId: b.id,
      outcome: "success",
      reason: "PROVEN_BINDING",
      ip: null,
    });
  }
}

/** The certificate-binding handlers of MachineUserService. */
export function certificateBindingHandlers(
  deps: MachineUserServiceDeps,
  clock: Clock,
  { em, managedMachineUser }: MachineUserLookups,
): Pick<ServiceImpl<typeof MachineUserService>, "bindCertificate" | "unbindCertificate"> {
  return {
    async bindCertificate(req, ctx) {
      const mu = await managedMachineUser(ctx, req.machineUserId, "machine_user_id");
      let sha256Fingerprint: string | null = null;
      let sanUri: string | null = null;
      if (req.identity.case === "sha256Fingerprint")
        sha256Fingerprint = normaliseFingerprint(req.identity.value);
      else if (req.identity.case === "sanUri") sanUri = assertSanUri(req.identity.value);
      else throw errors.invalidArgument("one of sha256_fingerprint or san_uri is required", "identity");
      const proven = possessionProven(requestState(ctx.values), ctx.requestHeader, {
        sha256Fingerprint,
        sanUri,
      });
      const e = em(ctx);
      // Only this tenant's bindings: another tenant's are neither seen nor contested here (each
      // tenant binds independently; machineOfCertificate decides between them), so the answer
      // is the same whether or not another tenant bound the identity.
      const existing = await e.findOne(MachineUserCertificate, {
        tenantId: mu.tenantId,
        ...(sha256Fingerprint ? { sha256Fingerprint } : { sanUri }),
      });
      const conflict = "this certificate identity is already bound to a machine user";
      const identity = sha256Fingerprint ? { sha256Fingerprint } : { sanUri };
      const cutoff = clock();
      let outranked: OutrankedBinding[] = [];
      if (existing) {
        // The caller's own tenant: it sees that binding and can remove it itself.
        if (!proven || existing.proven || existing.machineUserId !== mu.id)
          throw errors.alreadyExists(conflict);
        // The owner proves its own binding: it becomes proven. A proven fingerprint outranks
        // every SAN URI binding of the certificate, so it needs the authority a new proven
        // fingerprint binding needs: the SAN URI bindings made since the unproven one was are
        // the ones it would now take the certificate from.
        if (sha256Fingerprint !== null)
          await assertMayOutrankSanBindings(ctx, e, mu, requestState(ctx.values).certificate!.sanUris);
        // The proof is this caller's act, so the binding now ranks by this caller's scopes (as
        // a proven binding of its own making would), not by the first binder's: else a weaker
        // admin proving a stronger admin's binding decides with the stronger one's authority.
        const binderScopes = principalOf(ctx).scopes.join(" ");
        // Only while still this machine user's and unproven: of two racing provers the second
        // finds it proven (AlreadyExists, as above), and a binding removed meanwhile is not there.
        await writeIfScopesHold(e, MachineUser, mu.id, mu.scopes, async (tx) => {
          // The outranked bindings' machine users before this binding's row (storage/lock-order.ts).
          outranked = await outrankElsewhere(tx, mu.tenantId, identity, cutoff, deps.clockSkewSeconds);
          const updated = await tx.nativeUpdate(
            MachineUserCertificate,
            { id: existing.id, machineUserId: mu.id, proven: false },
            { proven: true, binderScopes },
          );
          if (updated === 0) throw errors.alreadyExists(conflict);
        });
        existing.proven = true;
        existing.binderScopes = binderScopes;
        await afterOutranking(deps, e, ctx, outranked, cutoff, clock);
        return { binding: bindingToProto(existing) };
      }
      if (sha256Fingerprint !== null)
        await assertMayOutrankSanBindings(
          ctx,
          e,
          mu,
          proven ? requestState(ctx.values).certificate!.sanUris : null,
        );
      const binding = e.create(MachineUserCertificate, {
        id: randomUUID(),
        machineUserId: mu.id,
        tenantId: mu.tenantId,
        sha256Fingerprint,
        sanUri,
        proven,
        // What an unproven binding may outrank or contest is decided at authentication, against
        // the other machine users' scopes then (machineOfCertificate): a SAN URI binding made
        // after this one is not seen by the check above, and none is made for a SAN URI.
        binderScopes: principalOf(ctx).scopes.join(" "),
        createdAt: new Date(),
      });
      try {
        await writeIfScopesHold(e, MachineUser, mu.id, mu.scopes, async (tx) => {
          if (proven)
            outranked = await outrankElsewhere(tx, mu.tenantId, identity, cutoff, deps.clockSkewSeconds);
          // Two binds of one identity racing in one tenant: the loser meets the unique
          // constraint (AlreadyExists).
          await tx.flush();
        });
      } catch (err) {
        if (err instanceof UniqueConstraintViolationException) throw errors.alreadyExists(conflict);
        throw err;
      }
      await afterOutranking(deps, e, ctx, outranked, cutoff, clock);
      return { binding: bindingToProto(binding) };
    },

    async unbindCertificate(req, ctx) {
      const mu = await managedMachineUser(ctx, req.machineUserId, "machine_user_id");
      const id = req.identity;
      let where: Record<string, string>;
      if (id.case === "bindingId") {
        assertId(id.value, "certificate binding", "binding_id");
        where = { id: id.value };
      } else if (id.case === "sha256Fingerprint")
        where = { sha256Fingerprint: normaliseFingerprint(id.value) };
      else if (id.case === "sanUri") where = { sanUri: id.value };
      else
        throw errors.invalidArgument(
          "one of binding_id, sha256_fingerprint or san_uri is required",
          "identity",
        );
      // The access tokens the certificate obtained are bound to it (cnf), not to the binding,
      // and it stays CA-valid: they end with the binding, in the same commit. Tessera keeps
      // no list of which credential issued which token, so all of the machine user's end,
      // as a revocation through /oauth2/revoke ends them (its credentials stay).
      // Committed only if the machine user still holds the scopes checked: a promotion between
      // the check and this write would otherwise let the caller cut a stronger one off.
      let cutoff = 0;
      const removed = await em(ctx).transactional(async (tx) => {
        // The machine user's row before its binding's (storage/lock-order.ts).
        if (!(await lockMachineUser(tx, mu.id, "key share"))) throw errors.notFound("machine user");
        const n = await tx.nativeDelete(MachineUserCertificate, { ...where, machineUserId: mu.id });
        if (n === 0) return n;
        cutoff = clock();
        await revokeMachineAccessTokens(tx, mu.id, cutoff, deps.clockSkewSeconds);
        await assertScopesHold(tx, MachineUser, mu.id, mu.scopes);
        return n;
      });
      if (removed === 0) throw errors.notFound("certificate binding");
      // A token signed while the commit was on its way may bear a later second than the cut-off.
      await raiseRevocationCutoff(em(ctx), mu.id, cutoff, clock(), deps.clockSkewSeconds);
      return {};
    },
  };
}
