import { createHash } from "node:crypto";
import type { DetailedPeerCertificate, TLSSocket } from "node:tls";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type ContextValues, createContextKey, createContextValues } from "@connectrpc/connect";
import {
  VerifiedPrincipalKind,
  type VerifyCredentialResponse,
} from "../../../gen/tessera/v1/verification_service_pb.js";
import { repeatedAuthorization } from "../../auth/repeated-authorization.js";
import type { AccessTokenClaims } from "./offline-jwt.js";

/** Who called a protected method: what the handler reads from its context. */
export interface TesseraPrincipal {
  /** The user's or machine user's id (a JWT's `sub`). */
  readonly id: string;
  readonly kind: "user" | "machine_user";
  readonly tenantId: string;
  /** The scopes the credential holds (wildcards as granted: check with `hasScope`). */
  readonly scopes: readonly string[];
  /** How the credential was presented: "jwt", "pat", "api_key", "machine_token" or "basic". */
  readonly credentialKind: string;
  /** The credential's id (token row, JWT `jti`, machine credential): not secret. */
  readonly credentialId: string;
  /** A JWT's session (`sid`), when it has one. */
  readonly sessionId?: string | undefined;
  /** Machine users verified through Tessera: the applications they are assigned to (empty for JWTs checked offline). */
  readonly applicationIds: readonly string[];
  /** RFC 8705 `x5t#S256` the credential is bound to (the call came with that client certificate). */
  readonly certificateThumbprint?: string | undefined;
  /** When the credential stops being valid by itself. */
  readonly expiresAt?: Date | undefined;
}

/** The principal of the call, set by the interceptor before the handler runs (undefined on public methods). */
export const tesseraPrincipalKey = createContextKey<TesseraPrincipal | undefined>(undefined, {
  description: "the Tessera principal of the call",
});

/**
 * The RFC 8705 thumbprint (`x5t#S256`) of the client certificate the connection presented
 * and the server's CA verified; set by {@link tesseraContextValues}.
 */
export const clientCertificateKey = createContextKey<string | undefined>(undefined, {
  description: "x5t#S256 of the verified client certificate",
});

/**
 * The address of the client that called (the connection's peer, by default), sent to
 * VerifyCredential with the credentials it presents: Tessera then counts that client's
 * failed verifications on a budget of its own, so that one client sending bad credentials
 * does not spend the whole service's. Set by {@link tesseraContextValues}; behind a proxy
 * of your own, set it in your `contextValues` from the address the proxy forwards.
 */
export const clientAddressKey = createContextKey<string | undefined>(undefined, {
  description: "the address of the calling client",
});

/**
 * The last instant (epoch ms, inclusive) the certificate behind {@link clientCertificateKey}
 * stands for it, set with it by {@link tesseraContextValues}: a stream held past it is
 * verified again without the certificate, as a new call on the connection would be.
 */
export const clientCertificateEndKey = createContextKey<number>(Number.POSITIVE_INFINITY, {
  description: "notAfter of the verified client certificate's chain",
});

/** A connection's verified client certificate: its thumbprint, and the last instant its chain is valid. */
interface Presented {
  thumbprint: string;
  notAfter: number;
}

const thumbprints = new WeakMap<object, Presented | null>();

/**
 * The earliest `valid_to` along the certificate and the issuers Node chained it to (epoch
 * ms; NaN when one cannot be read, which no instant passes).
 */
function chainEnd(cert: DetailedPeerCertificate): number {
  let end = Number.POSITIVE_INFINITY;
  const seen = new Set<object>();
  for (let c: DetailedPeerCertificate | undefined = cert; c && !seen.has(c); c = c.issuerCertificate) {
    seen.add(c);
    if (c.valid_to !== undefined) end = Math.min(end, Date.parse(c.valid_to));
  }
  return end;
}

/**
 * The `x5t#S256` of the verified client certificate on `socket` (undefined without one, or
 * when the CA did not verify it): hashed once per connection. Undefined too once the
 * certificate (or a CA of its chain) has expired (`now`, default the clock): TLS checks it
 * at the handshake only, and a connection kept open must not carry a bound credential past
 * its certificate's end.
 */
export function clientCertificateThumbprint(socket: unknown, now?: number): string | undefined {
  if (typeof socket !== "object" || socket === null) return undefined;
  let known = thumbprints.get(socket);
  if (known === undefined) {
    const tls = socket as Partial<TLSSocket>;
    known = null;
    if (tls.authorized === true && typeof tls.getPeerCertificate === "function") {
      const peer = tls.getPeerCertificate(true);
      if (peer?.raw && peer.raw.length > 0)
        known = {
          thumbprint: createHash("sha256").update(peer.raw).digest("base64url"),
          notAfter: chainEnd(peer),
        };
    }
    thumbprints.set(socket, known);
  }
  if (known === null) return undefined;
  // X.509's notAfter is inclusive.
  return (now ?? Date.now()) <= known.notAfter ? known.thumbprint : undefined;
}

/**
 * The object standing for a request's connection, the same for every request on it: an
 * HTTP/2 request's session socket (its `req.socket` is a new proxy per stream, which would
 * miss the per-connection memory of the thumbprint on every request), else `req.socket`.
 */
export function connectionOf(req: {
  socket?: unknown;
  stream?: { session?: { socket?: unknown } };
}): unknown {
  return req.stream?.session?.socket ?? req.socket;
}

/** The peer address of a request's connection (undefined once the socket is gone). */
export function peerAddressOf(req: {
  socket?: unknown;
  stream?: { session?: { socket?: unknown } };
}): string | undefined {
  const socket = connectionOf(req) as { remoteAddress?: unknown } | undefined;
  const address = socket?.remoteAddress;
  return typeof address === "string" ? address : undefined;
}

/** A request as Node hands it over, as far as a repeated Authorization header is read from it. */
interface HeadersAsSent {
  headers?: { authorization?: unknown };
  rawHeaders?: readonly string[];
}

/**
 * Whether `req` came with more than one Authorization header: Node keeps the first value only
 * (`req.headers` shows one), and a proxy in front reading another would disagree with us on who
 * is calling. Refused, whichever of them is valid.
 */
export function repeatsAuthorization(req: HeadersAsSent): boolean {
  return (
    req.headers?.authorization !== undefined &&
    req.rawHeaders !== undefined &&
    repeatedAuthorization(req.rawHeaders) !== undefined
  );
}

/**
 * Set by {@link tesseraContextValues} on a call that came with more than one Authorization
 * header (see {@link repeatsAuthorization}), which connect-node's Headers show as one: the
 * interceptor refuses it.
 */
export const authorizationRepeatedKey = createContextKey<boolean>(false, {
  description: "whether the call came with more than one Authorization header",
});

/**
 * `contextValues` for connect-node's adapter, so that certificate-bound credentials can be
 * checked, the client's address reaches VerifyCredential and a repeated Authorization header
 * is refused: `connectNodeAdapter({ routes, interceptors, contextValues: tesseraContextValues })`.
 */
export function tesseraContextValues(
  req: {
    socket?: unknown;
    stream?: { session?: { socket?: unknown } };
  } & HeadersAsSent,
): ContextValues {
  const values = createContextValues();
  if (repeatsAuthorization(req)) values.set(authorizationRepeatedKey, true);
  const connection = connectionOf(req);
  const thumbprint = clientCertificateThumbprint(connection);
  if (thumbprint) {
    values.set(clientCertificateKey, thumbprint);
    // Known once the thumbprint is: clientCertificateThumbprint remembered both.
    values.set(clientCertificateEndKey, thumbprints.get(connection as object)!.notAfter);
  }
  const address = peerAddressOf(req);
  if (address !== undefined) values.set(clientAddressKey, address);
  return values;
}

/**
 * One principal object serves every later call with the same credential (the admission memo,
 * the cache of Tessera's answers), and its scopes decide those calls: frozen, so a handler
 * that changes what it was handed cannot change what the next call is admitted as.
 */
function frozen(principal: TesseraPrincipal): TesseraPrincipal {
  Object.freeze(principal.scopes);
  Object.freeze(principal.applicationIds);
  return Object.freeze(principal);
}

/** The principal of an access token verified offline. */
export function principalOfClaims(claims: AccessTokenClaims): TesseraPrincipal {
  return frozen({
    id: claims.sub,
    kind: claims.pk === "machine" ? "machine_user" : "user",
    tenantId: claims.tid,
    scopes: claims.scope.split(" ").filter((s) => s.length > 0),
    credentialKind: "jwt",
    credentialId: claims.jti ?? "",
    sessionId: claims.sid,
    applicationIds: [],
    certificateThumbprint: claims.cnf?.["x5t#S256"] || undefined,
    expiresAt: new Date(claims.exp * 1000),
  });
}

/** The principal of a VALID VerifyCredential answer (`sessionId`: the JWT's `sid`, for its revocations). */
export function principalOfAnswer(res: VerifyCredentialResponse, sessionId?: string): TesseraPrincipal {
  return frozen({
    id: res.principalId,
    kind: res.principalKind === VerifiedPrincipalKind.MACHINE_USER ? "machine_user" : "user",
    tenantId: res.tenantId,
    // Copies: concurrent calls share one answer, whose arrays stay the message's.
    scopes: [...res.scopes],
    credentialKind: res.credentialKind,
    credentialId: res.credentialId,
    sessionId,
    applicationIds: [...res.applicationIds],
    certificateThumbprint: res.certificateThumbprint || undefined,
    expiresAt: res.expiresAt ? new Date(timestampMs(res.expiresAt)) : undefined,
  });
}
