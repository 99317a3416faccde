import { ConnectError, createClient, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { MachineUserService } from "../../gen/tessera/v1/machine_user_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { Code, rejection } from "../errors-util.js";
import { createTestCerts, DATABASES, startTestServer, type TestServer } from "../helpers.js";
import { adminLogin, bearerMachine, clients, short, tenantWithAdmin } from "../machine-fixtures.js";
import { type Backend, mintBackend as mint } from "./fixtures.js";

/**
 * Issue #18, item 2 (and the certificate part of item 10): a certificate identity bound in
 * one tenant can be neither taken over nor probed from another. The attacker is a tenant
 * administrator (admin:machine-users) of tenant B; the victim is tenant A's backend, which
 * presents only its client certificate (whose fingerprint is public: it is sent in every
 * handshake).
 */

function backendTransports(ts: TestServer, backend: Backend): Transport[] {
  const nodeOptions = { ca: ts.certs.ca, cert: backend.cert, key: backend.key };
  return [
    createConnectTransport({ baseUrl: ts.server.url, httpVersion: "2", nodeOptions }),
    createGrpcTransport({ baseUrl: ts.server.url, nodeOptions }),
  ];
}

/** What the backend's certificate alone authenticates as, over Connect and over gRPC. */
async function whoAmI(
  ts: TestServer,
  backend: Backend,
): Promise<{ machineUserId: string; tenantId: string }[]> {
  const out = [];
  for (const t of backendTransports(ts, backend)) {
    const res = await createClient(MachineUserService, t).checkAuthentication({});
    out.push({ machineUserId: res.machineUserId, tenantId: res.tenantId });
  }
  return out;
}

/** The backend's certificate authenticates no one, over Connect and over gRPC, and the refusal names no tenant. */
async function expectRefused(ts: TestServer, backend: Backend, hidden: string[]): Promise<void> {
  for (const t of backendTransports(ts, backend)) {
    const r = await rejection(createClient(MachineUserService, t).checkAuthentication({}));
    expect(r.code).toBe(Code.Unauthenticated);
    expect(r.reason).toBe("AUTH_REQUIRED");
    expect(r.message).toContain("bound to more than one machine user");
    for (const id of hidden) expect(r.message).not.toContain(id);
  }
}

/**
 * Headers and trailers that differ per request whatever the answer: gRPC's details carry the
 * request id, and the rate-limit counters count down and the clock runs.
 */
const PER_REQUEST = new Set([
  "x-request-id",
  "date",
  "grpc-status-details-bin",
  "x-ratelimit-remaining",
  "x-ratelimit-reset",
]);

/**
 * Everything a refusal tells its caller, minus what differs per request: code, reason,
 * message, the details (ErrorInfo without its request id) and every other header and trailer.
 */
function observable(err: ConnectError) {
  const info = err.findDetails(ErrorInfoSchema)[0];
  const metadata: [string, string][] = [];
  err.metadata.forEach((value, key) => {
    if (!PER_REQUEST.has(key)) metadata.push([key, value]);
  });
  const infoMetadata = Object.fromEntries(
    Object.entries(info?.metadata ?? {}).filter(([k]) => k !== "requestId" && k !== "request_id"),
  );
  return {
    code: err.code,
    reason: info?.reason,
    domain: info?.domain,
    infoMetadata,
    message: err.rawMessage,
    details: err.details.map((d) => ("type" in d ? d.type : d.desc.typeName)),
    metadata: metadata.sort(),
  };
}

async function refusal(promise: Promise<unknown>) {
  return observable((await rejection(promise)).error);
}

const FAILURE_BUDGET = 5;

describe.each(DATABASES)("certificate identities across tenants on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  /** Tenant A (the victim) and tenant B (the attacker), each with its own administrator. */
  let victim: Awaited<ReturnType<typeof tenantWithAdmin>>;
  let attacker: Awaited<ReturnType<typeof tenantWithAdmin>>;

  beforeAll(async () => {
    // A small failure budget per IP: a contested certificate must not spend it (see below).
    ts = await startTestServer(db, {
      server: { mtls: "optional" },
      rateLimit: { enabled: true, authFailuresPerIpPerMinute: FAILURE_BUDGET },
    });
    transport = ts.connect();
    const root = await adminLogin(transport);
    victim = await tenantWithAdmin(transport, root);
    attacker = await tenantWithAdmin(transport, root);
  });
  afterAll(async () => {
    await ts.close();
  });

  const victimMachine = async () =>
    (await bearerMachine(transport, victim.token, [victim.application.id])).machine;
  const attackerMachine = async () =>
    (await bearerMachine(transport, attacker.token, [attacker.application.id])).machine;
  const bind = (token: string, machineUserId: string, identity: Identity) =>
    clients(transport, token).machines.bindCertificate({ machineUserId, identity });
  type Identity = { case: "sha256Fingerprint"; value: string } | { case: "sanUri"; value: string };
  type UnbindIdentity = Identity | { case: "bindingId"; value: string };

  it("never lets another tenant's fingerprint binding take over a certificate whose SAN URI its owner bound: it is refused until that binding is gone", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const mine = await victimMachine();
    await bind(victim.token, mine.id, { case: "sanUri", value: san });
    const backend = await mint(ts, san);
    const expected = { machineUserId: mine.id, tenantId: victim.tenant.id };
    expect(await whoAmI(ts, backend)).toEqual([expected, expected]);

    // The fingerprint is public (sent in every handshake) and a different identity from the
    // SAN URI, so the bind cannot be refused; the certificate it names then authenticates no one.
    const theirs = await attackerMachine();
    const { binding } = await bind(attacker.token, theirs.id, {
      case: "sha256Fingerprint",
      value: backend.fingerprint,
    });
    await expectRefused(ts, backend, [theirs.id, attacker.tenant.id, victim.tenant.id]);

    // Once the foreign binding is gone the certificate is its owner's again.
    await clients(transport, attacker.token).machines.unbindCertificate({
      machineUserId: theirs.id,
      identity: { case: "bindingId", value: binding!.id },
    });
    expect(await whoAmI(ts, backend)).toEqual([expected, expected]);
  });

  it("refuses a certificate whose fingerprint another tenant bound before its owner bound its SAN URI", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const backend = await mint(ts, san);
    const theirs = await attackerMachine();
    await bind(attacker.token, theirs.id, { case: "sha256Fingerprint", value: backend.fingerprint });
    const mine = await victimMachine();
    await bind(victim.token, mine.id, { case: "sanUri", value: san });
    await expectRefused(ts, backend, [theirs.id, attacker.tenant.id]);
  });

  it("refuses a certificate whose fingerprint its owner bound once another tenant binds a SAN URI it carries", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const mine = await victimMachine();
    const backend = await mint(ts, san);
    await bind(victim.token, mine.id, { case: "sha256Fingerprint", value: backend.fingerprint });
    const expected = { machineUserId: mine.id, tenantId: victim.tenant.id };
    expect(await whoAmI(ts, backend)).toEqual([expected, expected]);

    // Whoever bound first, a winner picked between two tenants' claims could be the wrong one
    // (here: the owner's next certificate with this SAN URI, before its fingerprint is bound).
    const theirs = await attackerMachine();
    await bind(attacker.token, theirs.id, { case: "sanUri", value: san });
    await expectRefused(ts, backend, [theirs.id, attacker.tenant.id]);
    const reissued = await mint(ts, san);
    await bind(victim.token, mine.id, { case: "sha256Fingerprint", value: reissued.fingerprint });
    await expectRefused(ts, reissued, [theirs.id, attacker.tenant.id]);
  });

  it("does not let another tenant spend the owner's failure budget through a contested certificate", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const mine = await victimMachine();
    await bind(victim.token, mine.id, { case: "sanUri", value: san });
    const backend = await mint(ts, san);
    await bind(attacker.token, (await attackerMachine()).id, {
      case: "sha256Fingerprint",
      value: backend.fingerprint,
    });
    // The owner's backend keeps retrying from its address, past the budget.
    const conn = createClient(MachineUserService, backendTransports(ts, backend)[0]!);
    for (let i = 0; i < FAILURE_BUDGET * 2; i++) {
      expect((await rejection(conn.checkAuthentication({}))).reason).not.toBe("RATE_LIMITED");
    }
    // Everything else from that address (here: a password login) is still served.
    const login = await createClient(UserService, transport).login({
      username: victim.username,
      password: "tenant admin password",
      tenant: victim.tenant.id,
    });
    expect(login.accessToken).not.toBe("");
  });

  it("keeps a fingerprint binding ahead of a SAN URI binding within one tenant", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const fleet = await victimMachine();
    const special = await victimMachine();
    await bind(victim.token, fleet.id, { case: "sanUri", value: san });
    const backend = await mint(ts, san);
    await bind(victim.token, special.id, { case: "sha256Fingerprint", value: backend.fingerprint });
    const expected = { machineUserId: special.id, tenantId: victim.tenant.id };
    expect(await whoAmI(ts, backend)).toEqual([expected, expected]);
  });

  for (const kind of ["sha256Fingerprint", "sanUri"] as const) {
    it(`refuses a ${kind} already bound in another tenant exactly as one already bound in the caller's own`, async () => {
      const san = `spiffe://victim.example/${short()}`;
      const backend = await mint(ts, san);
      const identity: Identity =
        kind === "sanUri"
          ? { case: "sanUri", value: san }
          : { case: "sha256Fingerprint", value: backend.fingerprint };
      const mine = await victimMachine();
      await bind(victim.token, mine.id, identity);

      // The same identity again: by the attacker (other tenant) and by the victim itself (own tenant).
      const elsewhere = await refusal(bind(attacker.token, (await attackerMachine()).id, identity));
      const ownTenant = await refusal(bind(victim.token, (await victimMachine()).id, identity));
      const sameUser = await refusal(bind(victim.token, mine.id, identity));
      expect(elsewhere.code).toBe(Code.AlreadyExists);
      expect(elsewhere.reason).toBe("ALREADY_EXISTS");
      expect(elsewhere).toEqual(ownTenant);
      expect(elsewhere).toEqual(sameUser);
      for (const leak of [victim.tenant.id, mine.id]) expect(JSON.stringify(elsewhere)).not.toContain(leak);

      // Over gRPC as well.
      const grpcBind = (token: string, machineUserId: string) =>
        clients(ts.grpc(), token).machines.bindCertificate({ machineUserId, identity });
      const grpcElsewhere = await refusal(grpcBind(attacker.token, (await attackerMachine()).id));
      const grpcOwn = await refusal(grpcBind(victim.token, (await victimMachine()).id));
      expect(grpcElsewhere.code).toBe(Code.AlreadyExists);
      expect(grpcElsewhere).toEqual(grpcOwn);

      // Nothing was bound: the owner's certificate is still its own.
      const expected = { machineUserId: mine.id, tenantId: victim.tenant.id };
      expect(await whoAmI(ts, backend)).toEqual([expected, expected]);
    });
  }

  it("answers the loser of concurrent binds of one identity from two tenants exactly like a bind made after", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const later = await refusal(
      (async () => {
        await bind(victim.token, (await victimMachine()).id, { case: "sanUri", value: san });
        return bind(attacker.token, (await attackerMachine()).id, { case: "sanUri", value: san });
      })(),
    );
    expect(later.code).toBe(Code.AlreadyExists);
    // Several races, so some losers pass the existence check and meet the unique constraint.
    for (let i = 0; i < 4; i++) {
      const identity: Identity = { case: "sanUri", value: `spiffe://race.example/${short()}` };
      const [a, b] = [await victimMachine(), await attackerMachine()];
      const results = await Promise.allSettled([
        bind(victim.token, a.id, identity),
        bind(attacker.token, b.id, identity),
      ]);
      const lost = results.filter((r) => r.status === "rejected");
      expect(lost).toHaveLength(1);
      expect(observable(ConnectError.from((lost[0] as PromiseRejectedResult).reason))).toEqual(later);
    }
  });

  it("answers the attacker's unbind of the victim's binding NotFound, exactly like a binding that does not exist", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const mine = await victimMachine();
    const backend = await mint(ts, san);
    const bySan = await bind(victim.token, mine.id, { case: "sanUri", value: san });
    const other = await mint(ts);
    const byFp = await bind(victim.token, mine.id, { case: "sha256Fingerprint", value: other.fingerprint });
    const theirs = await attackerMachine();
    const attackerClient = clients(transport, attacker.token).machines;
    const unbind = (machineUserId: string, identity: UnbindIdentity) =>
      attackerClient.unbindCertificate({ machineUserId, identity });

    const absent = await refusal(
      unbind(theirs.id, { case: "bindingId", value: "00000000-0000-4000-8000-000000000000" }),
    );
    expect(absent.code).toBe(Code.NotFound);
    const attempts: UnbindIdentity[] = [
      { case: "bindingId", value: bySan.binding!.id },
      { case: "bindingId", value: byFp.binding!.id },
      { case: "sanUri", value: san },
      { case: "sha256Fingerprint", value: other.fingerprint },
    ];
    for (const identity of attempts) expect(await refusal(unbind(theirs.id, identity))).toEqual(absent);
    // Naming the victim's machine user: it is invisible, NotFound like any unknown id.
    const invisible = await rejection(unbind(mine.id, { case: "bindingId", value: bySan.binding!.id }));
    expect(invisible.code).toBe(Code.NotFound);

    // Both bindings are intact: the victim's certificates still authenticate as its machine user.
    const expected = { machineUserId: mine.id, tenantId: victim.tenant.id };
    expect(await whoAmI(ts, backend)).toEqual([expected, expected]);
    expect(await whoAmI(ts, other)).toEqual([expected, expected]);
  });
});

/**
 * Issue #18's remaining certificate item: squatting. Another tenant binding the public
 * fingerprint (or a SAN URI) of A's certificate first must not deny A its own certificate.
 * A bind made over a connection presenting the very certificate is proven; a proven binding
 * displaces the squatter's unproven one and is never displaced itself.
 */
describe.each(DATABASES)("proof of possession of a bound certificate on $name", (db) => {
  let ts: TestServer;
  let transport: Transport;
  let victim: Awaited<ReturnType<typeof tenantWithAdmin>>;
  let attacker: Awaited<ReturnType<typeof tenantWithAdmin>>;

  beforeAll(async () => {
    ts = await startTestServer(db, { server: { mtls: "optional" } });
    transport = ts.connect();
    const root = await adminLogin(transport);
    victim = await tenantWithAdmin(transport, root);
    attacker = await tenantWithAdmin(transport, root);
  });
  afterAll(async () => {
    await ts.close();
  });

  type Identity = { case: "sha256Fingerprint"; value: string } | { case: "sanUri"; value: string };
  const victimMachine = async () =>
    (await bearerMachine(transport, victim.token, [victim.application.id])).machine;
  const attackerMachine = async () =>
    (await bearerMachine(transport, attacker.token, [attacker.application.id])).machine;
  /** A bind with the admin's token, over a connection without a client certificate. */
  const bind = (token: string, machineUserId: string, identity: Identity) =>
    clients(transport, token).machines.bindCertificate({ machineUserId, identity });
  /** A bind with the admin's token, over a connection presenting `backend`'s certificate (gRPC: index 1). */
  const bindPresenting = (
    backend: Backend,
    token: string,
    machineUserId: string,
    identity: Identity,
    headers: Record<string, string> = {},
    protocol = 0,
  ) =>
    clients(backendTransports(ts, backend)[protocol]!, {
      authorization: `Bearer ${token}`,
      ...headers,
    }).machines.bindCertificate({ machineUserId, identity });
  const certificatesOf = async (token: string, id: string) =>
    (await clients(transport, token).machines.getMachineUser({ id })).machineUser!.certificates;
  const displacedRecords = async (bindingId: string) => {
    await ts.app.audit.flush();
    return (await ts.app.storage.em
      .getConnection()
      .execute(
        "select tenant_id, action, target_id, outcome, actor_kind, actor_id, ip from audit_events where target_id = ?",
        [bindingId],
      )) as Record<string, unknown>[];
  };

  for (const kind of ["sha256Fingerprint", "sanUri"] as const) {
    it(`lets the certificate's holder take back a ${kind} another tenant squatted, by binding it over a connection presenting the certificate`, async () => {
      const san = `spiffe://victim.example/${short()}`;
      const backend = await mint(ts, san);
      const identity: Identity =
        kind === "sanUri"
          ? { case: "sanUri", value: san }
          : { case: "sha256Fingerprint", value: backend.fingerprint };

      // The squatter binds first (no proof: it does not hold the certificate's key).
      const theirs = await attackerMachine();
      const squat = await bind(attacker.token, theirs.id, identity);
      expect(squat.binding!.proven).toBe(false);
      const mine = await victimMachine();
      // Without proof the owner is refused exactly as before.
      expect((await refusal(bind(victim.token, mine.id, identity))).code).toBe(Code.AlreadyExists);

      // With proof (the owner's admin token, over the backend's own mTLS connection): bound, proven.
      const { binding } = await bindPresenting(backend, victim.token, mine.id, identity);
      expect(binding!.proven).toBe(true);
      const expected = { machineUserId: mine.id, tenantId: victim.tenant.id };
      expect(await whoAmI(ts, backend)).toEqual([expected, expected]);

      // The squatter's binding is gone, and audited in the squatter's tenant.
      expect(await certificatesOf(attacker.token, theirs.id)).toEqual([]);
      expect(await displacedRecords(squat.binding!.id)).toEqual([
        {
          tenant_id: attacker.tenant.id,
          action: "tessera.v1.MachineUserService/BindCertificate:displaced",
          target_id: squat.binding!.id,
          outcome: "success",
          // The prover is of another tenant: neither its id nor its address is recorded there.
          actor_kind: "system",
          actor_id: null,
          ip: null,
        },
      ]);

      // The squatter learns nothing more: binding again is the AlreadyExists everyone gets,
      // and its view of its own machine user names nobody else.
      const again = await refusal(bind(attacker.token, theirs.id, identity));
      const ownTenant = await refusal(bind(victim.token, (await victimMachine()).id, identity));
      expect(again.code).toBe(Code.AlreadyExists);
      expect(again).toEqual(ownTenant);
      const view = JSON.stringify(
        await clients(transport, attacker.token).machines.getMachineUser({ id: theirs.id }),
        (_k, v) => (typeof v === "bigint" ? String(v) : v),
      );
      for (const leak of [victim.tenant.id, mine.id, binding!.id]) expect(view).not.toContain(leak);
    });
  }

  it("never lets a proven binding be displaced, not even by another certificate from the same CA carrying the SAN URI", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const backend = await mint(ts, san);
    const mine = await victimMachine();
    await bindPresenting(backend, victim.token, mine.id, { case: "sanUri", value: san }, {}, 1);
    await bindPresenting(backend, victim.token, mine.id, {
      case: "sha256Fingerprint",
      value: backend.fingerprint,
    });
    const theirs = await attackerMachine();
    const lookalike = await mint(ts, san);
    const attempts = [
      () => bind(attacker.token, theirs.id, { case: "sanUri", value: san }),
      () => bindPresenting(lookalike, attacker.token, theirs.id, { case: "sanUri", value: san }),
      () => bind(attacker.token, theirs.id, { case: "sha256Fingerprint", value: backend.fingerprint }),
    ];
    for (const attempt of attempts) expect((await refusal(attempt())).code).toBe(Code.AlreadyExists);
    const expected = { machineUserId: mine.id, tenantId: victim.tenant.id };
    expect(await whoAmI(ts, backend)).toEqual([expected, expected]);
    expect((await certificatesOf(victim.token, mine.id)).map((b) => b.proven)).toEqual([true, true]);
  });

  it("refuses a certificate whose proven SAN URI binding and another tenant's fingerprint binding disagree, until the owner proves the fingerprint", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const backend = await mint(ts, san);
    const mine = await victimMachine();
    await bindPresenting(backend, victim.token, mine.id, { case: "sanUri", value: san });
    // The fingerprint is another identity, not yet bound: the other tenant's bind succeeds.
    // A proven SAN URI proves its maker holds *a* certificate with that URI, not this one
    // (a CA may give one URI to two tenants' certificates), so neither claim wins: no one.
    const theirs = await attackerMachine();
    await bind(attacker.token, theirs.id, {
      case: "sha256Fingerprint",
      value: backend.fingerprint,
    });
    await expectRefused(ts, backend, [victim.tenant.id, attacker.tenant.id, mine.id]);
    // The certificate's holder proves its fingerprint: the other tenant's binding is displaced.
    await bindPresenting(backend, victim.token, mine.id, {
      case: "sha256Fingerprint",
      value: backend.fingerprint,
    });
    expect(await certificatesOf(attacker.token, theirs.id)).toEqual([]);
    const expected = { machineUserId: mine.id, tenantId: victim.tenant.id };
    expect(await whoAmI(ts, backend)).toEqual([expected, expected]);
  });

  it("makes the owner's own unproven binding proven when it binds it again with proof", async () => {
    const backend = await mint(ts);
    const mine = await victimMachine();
    const identity: Identity = { case: "sha256Fingerprint", value: backend.fingerprint };
    const first = await bind(victim.token, mine.id, identity);
    const proven = await bindPresenting(backend, victim.token, mine.id, identity);
    expect(proven.binding!.id).toBe(first.binding!.id);
    expect(proven.binding!.proven).toBe(true);
    // Proven now: another tenant can no longer displace nor share it.
    expect((await refusal(bind(attacker.token, (await attackerMachine()).id, identity))).code).toBe(
      Code.AlreadyExists,
    );
  });

  it("takes no proof from a certificate the server's client CA does not trust, even one carrying the SAN URI", async () => {
    const san = `spiffe://victim.example/${short()}`;
    const theirs = await attackerMachine();
    const squat = await bind(attacker.token, theirs.id, { case: "sanUri", value: san });
    // A certificate from another CA (anyone can make one with any SAN URI): ignored under
    // `optional`, so the call is served but proves nothing.
    const foreign = await createTestCerts(`foreign-${short()}`, san);
    const untrusted: Backend = {
      cert: foreign.clientCert,
      key: foreign.clientKey,
      fingerprint: foreign.clientFingerprint,
    };
    const mine = await victimMachine();
    for (const protocol of [0, 1]) {
      const r = await refusal(
        bindPresenting(untrusted, victim.token, mine.id, { case: "sanUri", value: san }, {}, protocol),
      );
      expect(r.code).toBe(Code.AlreadyExists);
    }
    // Its own fingerprint is bound unproven (nothing proven about it), and the squat stands.
    const byFp = await bindPresenting(untrusted, victim.token, mine.id, {
      case: "sha256Fingerprint",
      value: untrusted.fingerprint,
    });
    expect(byFp.binding!.proven).toBe(false);
    expect((await certificatesOf(attacker.token, theirs.id)).map((b) => b.id)).toEqual([squat.binding!.id]);
  });

  it("takes no proof from a browser-originated request (Origin header): the browser's ambient certificate is not the caller's", async () => {
    const backend = await mint(ts);
    const identity: Identity = { case: "sha256Fingerprint", value: backend.fingerprint };
    const theirs = await attackerMachine();
    const squat = await bind(attacker.token, theirs.id, identity);
    const r = await refusal(
      bindPresenting(backend, victim.token, (await victimMachine()).id, identity, {
        origin: "https://evil.example",
      }),
    );
    expect(r.code).toBe(Code.AlreadyExists);
    expect((await certificatesOf(attacker.token, theirs.id)).map((b) => b.id)).toEqual([squat.binding!.id]);
  });

  it("still lets the binder's scope and authority decide: a proof by a caller without authority over the machine user binds nothing", async () => {
    const backend = await mint(ts);
    const identity: Identity = { case: "sha256Fingerprint", value: backend.fingerprint };
    const theirs = await attackerMachine();
    const squat = await bind(attacker.token, theirs.id, identity);
    // The victim's machine user holds a scope the victim's tenant admin lacks.
    const root = await adminLogin(transport);
    const strong = (
      await bearerMachine(transport, root, [victim.application.id], {
        tenantId: victim.tenant.id,
        scopes: ["admin:users"],
      })
    ).machine;
    const r = await refusal(bindPresenting(backend, victim.token, strong.id, identity));
    expect([r.code, r.reason]).toEqual([Code.PermissionDenied, "ACCESS_DENIED"]);
    expect((await certificatesOf(attacker.token, theirs.id)).map((b) => b.id)).toEqual([squat.binding!.id]);
  });
});

describe.each(DATABASES)("proof of possession behind a trusted proxy on $name", (db) => {
  let ts: TestServer;
  afterAll(async () => {
    await ts?.close();
  });

  it("takes no proof from a connection whose peer is a trusted proxy: its certificate is the proxy's, shared by all behind it", async () => {
    ts = await startTestServer(db, { server: { mtls: "optional", trustedProxies: ["127.0.0.1/32"] } });
    const transport = ts.connect();
    const root = await adminLogin(transport);
    const victim = await tenantWithAdmin(transport, root);
    const attacker = await tenantWithAdmin(transport, root);
    const gateway = await mint(ts);
    const identity = { case: "sha256Fingerprint" as const, value: gateway.fingerprint };
    const theirs = (await bearerMachine(transport, attacker.token, [attacker.application.id])).machine;
    await clients(transport, attacker.token).machines.bindCertificate({ machineUserId: theirs.id, identity });
    const mine = (await bearerMachine(transport, victim.token, [victim.application.id])).machine;
    const viaGateway = clients(backendTransports(ts, gateway)[0]!, {
      authorization: `Bearer ${victim.token}`,
      "x-forwarded-for": "198.51.100.7",
    });
    const r = await refusal(viaGateway.machines.bindCertificate({ machineUserId: mine.id, identity }));
    expect(r.code).toBe(Code.AlreadyExists);
  });
});
