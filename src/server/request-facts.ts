import type { IncomingMessage } from "node:http";
import type { TLSSocket } from "node:tls";
import type { HeaderSource } from "../auth/credentials.js";
import type { PeerCertificateInfo } from "../auth/principal.js";
import { normaliseSerial } from "../certs/serial.js";
import { createClientIpResolver, createTrustedProxyCheck } from "../client-ip.js";
import type { Config } from "../config.js";
import type { RequestState } from "../context.js";
import { uuidV7 } from "../storage/uuid-v7.js";
import type { NodeRequest as Request } from "../transport/stream-server.js";

/**
 * The facts of a request, gathered once when it arrives and attached to it for the
 * transport's callbacks, admission and the interceptors: its id, the client's address, the
 * client certificate (see `RequestState`).
 */

const REQUEST_ID_RE = /^[A-Za-z0-9._-]{1,64}$/;
const NONE_REVOKED: ReadonlySet<string> = new Set();
const kState = Symbol("tessera.requestState");

/** The request state the handler attached to an RPC request before handing it to the adapter. */
export function stateOf(req: Request): RequestState {
  return (req as unknown as Record<symbol, RequestState>)[kState]!;
}

/** Node's incoming headers read as fetch Headers would read them (repeats joined with ", "). */
export function nodeHeaderSource(headers: IncomingMessage["headers"]): HeaderSource {
  return {
    get(name) {
      const v = headers[name];
      return v === undefined ? null : typeof v === "string" ? v : v.join(", ");
    },
  };
}

function parseCertificate(socket: TLSSocket): { info: PeerCertificateInfo; serial: string } | null {
  if (!socket.authorized) return null;
  const cert = socket.getPeerCertificate(false);
  if (!cert?.raw) return null;
  const hex = cert.fingerprint256.replace(/:/g, "").toLowerCase();
  const sanUris = (cert.subjectaltname ?? "")
    .split(/,\s*/)
    .filter((s) => s.startsWith("URI:"))
    .map((s) => s.slice(4));
  const cn = cert.subject?.CN;
  return {
    info: {
      sha256Fingerprint: hex,
      thumbprint: Buffer.from(hex, "hex").toString("base64url"),
      commonName: Array.isArray(cn) ? (cn[0] ?? null) : (cn ?? null),
      sanUris,
    },
    serial: normaliseSerial(cert.serialNumber),
  };
}

/**
 * The caller's request id when it is a sane one, else a new one: time-ordered, because the
 * audit table indexes `request_id` and a random id put every audited row on its own index page.
 */
export function requestIdOf(req: Request): string {
  const incoming = req.headers["x-request-id"];
  return typeof incoming === "string" && REQUEST_ID_RE.test(incoming) ? incoming : uuidV7();
}

/**
 * The function that attaches a request's state (read back by {@link stateOf}): the client's
 * address (through trusted proxies), whether it came through one, and its certificate.
 */
export function createStateAttacher(
  config: Config,
  tls: boolean,
  revokedSerials: () => ReadonlySet<string> = () => NONE_REVOKED,
): (req: Request, requestId?: string) => void {
  const certCache = new WeakMap<object, ReturnType<typeof parseCertificate>>();

  function peerCertificate(req: Request): PeerCertificateInfo | null {
    if (!tls || config.server.mtls === "off") return null;
    // One parse per connection: the certificate cannot change within it.
    const owner: object = "stream" in req ? (req.stream.session ?? req.socket) : req.socket;
    let parsed = certCache.get(owner);
    if (parsed === undefined) {
      parsed = parseCertificate(req.socket as TLSSocket);
      certCache.set(owner, parsed);
    }
    if (parsed === null) return null;
    // Its revocation can: the handshake checked the CRL of its time, and a CRL reloaded since
    // takes effect on this request, on this connection too.
    const revoked = revokedSerials();
    return revoked.size > 0 && revoked.has(parsed.serial) ? null : parsed.info;
  }

  const resolveIp = createClientIpResolver(config.server);
  const isProxy = createTrustedProxyCheck(config.server);
  /** The connection's direct peer address. */
  function peerOf(req: Request): string | undefined {
    // HTTP/2: the session's socket (one per connection), not req.socket (a Proxy made per stream).
    const socket = "stream" in req ? (req.stream.session?.socket ?? req.socket) : req.socket;
    return socket.remoteAddress;
  }

  /** Attach the request's state (read back by `stateOf`) for the adapter's callbacks and the interceptors. */
  return function attachState(req: Request, requestId: string = requestIdOf(req)): void {
    const peer = peerOf(req);
    const state: RequestState = {
      requestId,
      ip: resolveIp(peer, req.headers),
      certificate: peerCertificate(req),
      principal: null,
      startedAt: performance.now(),
    };
    if (isProxy(peer)) state.viaProxy = true;
    (req as unknown as Record<symbol, RequestState>)[kState] = state;
  };
}
