// Certificate bindings: which client certificate identifies a machine user, and when a bind
// proves possession of it (a proven bind may displace another tenant's unproven squatter).
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

/** The audit action of an unproven binding removed by a proven bind of its identity. */
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
      const existing = await e.findOne(
        MachineUserCertificate,
        sha256Fingerprint ? { sha256Fingerprint } : { sanUri },
      );
      // Identities are unique across tenants (a certificate names one principal); the refusal
      // is the same whichever tenant holds the binding, so it reveals no tenant, user or id.
      const conflict = "this certificate identity is already bound to a machine user";
      let displaced: { binding: MachineUserCertificate; tenantId: string } | null = null;
      if (existing) {
        if (!proven || existing.proven) throw errors.alreadyExists(conflict);
        if (existing.machineUserId === mu.id) {
          // The owner proves its own binding: it becomes proven (and can no longer be displaced).
          // A proven fingerprint outranks every SAN URI binding of the certificate, so it needs
          // the authority a new proven fingerprint binding needs: the SAN URI bindings made
          // since the unproven one was are the ones it would now take the certificate from.
          if (sha256Fingerprint !== null)
            await assertMayOutrankSanBindings(ctx, e, mu, requestState(ctx.values).certificate!.sanUris);
          // The proof is this caller's act, so the binding now ranks by this caller's scopes (as
          // a proven binding of its own making would), not by the first binder's: else a weaker
          // admin proving a stronger admin's binding decides with the stronger one's authority.
          const binderScopes = principalOf(ctx).scopes.join(" ");
          // Only while still this machine user's and unproven: of two racing provers the second
          // finds it proven (AlreadyExists, as above), and a binding removed meanwhile is not there.
          await writeIfScopesHold(e, MachineUser, mu.id, mu.scopes, async (tx) => {
            const updated = await tx.nativeUpdate(
              MachineUserCertificate,
              { id: existing.id, machineUserId: mu.id, proven: false },
              { proven: true, binderScopes },
            );
            if (updated === 0) throw errors.alreadyExists(conflict);
          });
          existing.proven = true;
          existing.binderScopes = binderScopes;
          return { binding: bindingToProto(existing) };
        }
        const holder = await e.findOne(MachineUser, { id: existing.machineUserId });
        // The caller's own tenant: it sees that binding and can remove it itself.
        if (!holder || holder.tenantId === mu.tenantId) throw errors.alreadyExists(conflict);
        displaced = { binding: existing, tenantId: holder.tenantId };
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
        sha256Fingerprint,
        sanUri,
        proven,
        // What an unproven binding may outrank or contest is decided at authentication, against
        // the other machine users' scopes then (machineOfCertificate): a SAN URI binding made
        // after this one is not seen by the check above, and none is made for a SAN URI.
        binderScopes: principalOf(ctx).scopes.join(" "),
        createdAt: new Date(),
      });
      let removed = 0;
      let cutoff = 0;
      try {
        await writeIfScopesHold(e, MachineUser, mu.id, mu.scopes, async (tx) => {
          // Only while it is still unproven: two provers racing for one identity, the loser
          // meets the unique constraint below (AlreadyExists), never displaces the winner.
          // The displaced binding's machine user before its binding (storage/lock-order.ts): a
          // DeleteMachineUser of it holds its row, then deletes its bindings. Gone meanwhile,
          // its binding went with it.
          if (displaced && (await lockMachineUser(tx, displaced.binding.machineUserId, "key share")))
            removed = await tx.nativeDelete(MachineUserCertificate, {
              id: displaced.binding.id,
              proven: false,
            });
          // A displaced binding ends like an unbound one: the access tokens certificates
          // obtained through it are bound to them, not to it, and would outlive it.
          if (removed > 0) {
            cutoff = clock();
            await revokeMachineAccessTokens(
              tx,
              displaced!.binding.machineUserId,
              cutoff,
              deps.clockSkewSeconds,
            );
          }
          await tx.flush();
        });
      } catch (err) {
        if (err instanceof UniqueConstraintViolationException) throw errors.alreadyExists(conflict);
        throw err;
      }
      if (displaced && removed > 0) {
        const squatter = displaced.binding.machineUserId;
        await raiseRevocationCutoff(e, squatter, cutoff, clock(), deps.clockSkewSeconds);
        // In the squatter's tenant, so its auditors see why its binding went; the answer to
        // this caller is the same whether a binding was displaced or not. The prover is of
        // another tenant: its id and address are not the squatter's to read (tenants are
        // walls), so the event names no actor. The prover's own BindCertificate event, in
        // its tenant, carries the same request id for an operator who needs both.
        const state = requestState(ctx.values);
        deps.audit?.record({
          requestId: state.requestId,
          ...auditFiling(null, displaced.tenantId),
          actorKind: "system",
          actorId: null,
          action: DISPLACED_ACTION,
          targetId: displaced.binding.id,
          outcome: "success",
          reason: "PROVEN_BINDING",
          ip: null,
        });
      }
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
