import type { DescMethod } from "@bufbuild/protobuf";
import { codeToString } from "@connectrpc/connect/protocol-connect";
import { UserService } from "../gen/tessera/v1/user_service_pb.js";
import type { AccessLog } from "./access-log.js";
import { longestPrefix } from "./auth/token-format.js";
import type { Config } from "./config.js";
import type { RequestState } from "./context.js";
import { reasonForCode } from "./errors.js";
import type { CredentialKind, Metrics } from "./metrics.js";
import type { UnaryProtocol } from "./transport/unary-protocols.js";

/**
 * What happens when a call ends (see `onCallEnd` in transport/options.ts): its metrics
 * (metrics.ts) and its access-log line. One function for both, so the request's state is
 * read once; undefined when metrics and the access log are both off, so that the adapter
 * then calls nothing at all.
 */
export type CallObserver = (
  state: RequestState,
  headers: Readonly<Record<string, string | string[] | undefined>>,
  method: DescMethod,
  protocol: UnaryProtocol,
  code: number,
) => void;

/** Options of {@link createCallObserver}. */
export interface CallObserverOptions {
  metrics: Metrics | undefined;
  /** Where access lines go. */
  log: AccessLog;
  /** `log.access`: the level of access lines, or off. */
  access: Config["log"]["access"];
  /** Token prefixes, to name the kind of a refused bearer token without parsing it. */
  prefixes: { pat: string; apiKey: string; machine: string };
}

const LOGIN = UserService.method.login;
const REFRESH = UserService.method.refreshToken;
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;

/** Strings that need no JSON escaping: ids, addresses, reasons (the common case, tested first). */
const PLAIN = /^[\w.:-]*$/;
/** A JSON string literal of `s` (JSON.stringify costs even when there is nothing to escape: bench/results/2026-12-05-access-log.md). */
function quote(s: string): string {
  return PLAIN.test(s) ? `"${s}"` : JSON.stringify(s);
}
/**
 * A character other than printable ASCII: JSON.stringify escapes control characters but
 * leaves those whose UTF-8 takes more than one byte as they are.
 */
const NOT_ASCII = /[^ -~]/;

/** The access line's `method` ("tessera.v1.UserService/GetCurrentUser"), made once per RPC. */
const methodNames = new Map<DescMethod, string>();
function methodName(method: DescMethod): string {
  let name = methodNames.get(method);
  if (name === undefined) {
    name = `${method.parent.typeName}/${method.name}`;
    methodNames.set(method, name);
  }
  return name;
}

/** The access line's `"method":…,"protocol":…,` part, made once per RPC and protocol. */
const methodParts = new Map<DescMethod, Partial<Record<UnaryProtocol, string>>>();
function methodPart(method: DescMethod, protocol: UnaryProtocol): string {
  let byProtocol = methodParts.get(method);
  if (byProtocol === undefined) {
    byProtocol = {};
    methodParts.set(method, byProtocol);
  }
  let part = byProtocol[protocol];
  if (part === undefined) {
    part = `"method":"${methodName(method)}","protocol":"${protocol}",`;
    byProtocol[protocol] = part;
  }
  return part;
}

/** Create the observer of finished calls, or undefined when there is nothing to observe. */
export function createCallObserver(options: CallObserverOptions): CallObserver | undefined {
  const { metrics, log, prefixes } = options;
  // Longest prefix first, as the verifiers decide: with nested prefixes (`acme_`, `acme_key_`)
  // an API key is not counted as a PAT. Of equal prefixes the first here names the kind.
  const tokenPrefixes = [prefixes.pat, prefixes.apiKey, prefixes.machine];
  const tokenKinds = new Map<string, CredentialKind>();
  for (const [prefix, kind] of [
    [prefixes.pat, "pat"],
    [prefixes.apiKey, "api_key"],
    [prefixes.machine, "machine_token"],
  ] as const)
    if (!tokenKinds.has(prefix)) tokenKinds.set(prefix, kind);
  const level = options.access === "off" ? undefined : options.access;
  // pino's numbers for the two levels `log.access` can name.
  const levelNumber = level === "debug" ? 20 : 30;
  if (metrics === undefined && level === undefined) return undefined;

  // The parts of an access line that repeat from one call to the next (the time within a
  // millisecond, the principal, the address), kept while they do: a line is made of fewer
  // new strings (bench/results/2026-12-06-heap-obs.md).
  let headAt = -1;
  let headText = "";
  let whoOf: RequestState["principal"] = null;
  let whoText = "";
  let ipOf = "";
  let ipText = '""';
  let ipAscii = true;
  let whoAscii = true;
  /**
   * Whether the line {@link accessLine} built last is all ASCII, so that the access log may
   * copy it as Latin-1 (the same bytes as UTF-8 for it, without the encoder): every part is a
   * name from this code or the descriptors (protobuf identifiers are ASCII) but the values
   * quoted, which are checked.
   */
  let lineAscii = true;
  /** `quote` for the line being built, noting a value that is not ASCII. */
  function quoteInLine(s: string): string {
    if (PLAIN.test(s)) return `"${s}"`;
    const json = JSON.stringify(s);
    if (NOT_ASCII.test(json)) lineAscii = false;
    return json;
  }

  /** The kind of credential a refused request presented, from its headers (never their value). */
  function presented(
    headers: Readonly<Record<string, string | string[] | undefined>>,
    state: RequestState,
  ): CredentialKind {
    const authorization = headers.authorization;
    const apiKey = headers["x-api-key"];
    if (authorization !== undefined && apiKey !== undefined) return "malformed";
    if (apiKey !== undefined) return "api_key";
    if (typeof authorization !== "string") return state.certificate ? "mtls" : "none";
    // A repeated header, joined by the transport (transport/node-bridge.ts); else a scheme
    // whose values hold ", " (Digest), malformed too.
    if (authorization.includes(", ")) return "malformed";
    const value = authorization.trim();
    const space = value.indexOf(" ");
    const scheme = space < 0 ? "" : value.slice(0, space).toLowerCase();
    if (scheme === "basic") return "basic";
    if (scheme !== "bearer") return "malformed";
    const token = value.slice(space + 1).trim();
    if (JWT_SHAPE.test(token)) return "jwt";
    const prefix = longestPrefix(token, tokenPrefixes);
    return prefix === undefined ? "bearer_unknown" : (tokenKinds.get(prefix) ?? "bearer_unknown");
  }

  /** The stable reason of a call that failed with `code`. */
  function reasonOf(state: RequestState, code: number): string {
    if (state.errorInfo !== undefined) return state.errorInfo.reason;
    return reasonForCode(code);
  }

  /**
   * The authentication this call made, if any, into `tessera_auth_attempts_total`: the
   * credential of a method that is not public (admission's verdict), a Login's password,
   * a RefreshToken's refresh token. A call refused by the per-IP limit before any check
   * made none.
   */
  function observeAuth(
    m: Metrics,
    state: RequestState,
    headers: Readonly<Record<string, string | string[] | undefined>>,
    method: DescMethod,
    code: number,
  ): void {
    // Refused by the per-IP limit (or never admitted): no authentication was made.
    const admission = state.admission;
    if (admission === undefined) return;
    if (method === LOGIN || method === REFRESH) {
      const kind = method === LOGIN ? "password" : "refresh_token";
      m.observeAuth(kind, code === 0, code === 0 ? "" : reasonOf(state, code));
      return;
    }
    const principal = state.principal;
    // Authenticated (an authorization refusal after it is not an authentication failure).
    if (principal !== null) {
      m.observeAuth(principal.method, true, "");
      return;
    }
    // A public method (nothing was authenticated), or an audited one whose authentication
    // was left for after its body and never ran (a malformed body).
    if (admission !== "refused") return;
    const reason = reasonOf(state, code);
    m.observeAuth(presented(headers, state), false, reason);
  }

  return (state, headers, method, protocol, code) => {
    const started = state.startedAt;
    const seconds = started === undefined ? 0 : (performance.now() - started) / 1000;
    if (metrics !== undefined) {
      metrics.observeCall(method, protocol, code, seconds);
      observeAuth(metrics, state, headers, method, code);
    }
    // A shed call is logged in aggregate, one line per interval (admission/shedding.ts).
    if (level === undefined || state.aggregated || !log.isLevelEnabled(level)) return;
    if (log.writeFields !== undefined)
      log.writeFields(level, accessFields(state, method, protocol, code, seconds));
    else {
      const line = accessLine(state, method, protocol, code, seconds);
      log.writeLine(line, lineAscii);
    }
  };

  /** The access line's fields, for a logger (an app given its own): the same as {@link accessLine}'s. */
  function accessFields(
    state: RequestState,
    method: DescMethod,
    protocol: UnaryProtocol,
    code: number,
    seconds: number,
  ): Record<string, unknown> {
    const principal = state.principal;
    return {
      requestId: state.requestId,
      method: methodName(method),
      protocol,
      code: code === 0 ? "ok" : codeToString(code),
      ...(code === 0 ? {} : { reason: reasonOf(state, code) }),
      durationMs: Math.round(seconds * 1e6) / 1000,
      ...(principal === null
        ? {}
        : { principalKind: principal.kind, principalId: principal.id, authMethod: principal.method }),
      ip: state.ip,
    };
  }

  /**
   * The access line, in the format of a pino line (`level`, `time`, `service`, the fields,
   * `msg`): built as one string, since building it through a logger costs a visible share
   * of a call (see access-log.ts). Never a header, a body or a credential: ids, kinds, codes and the
   * caller's address. Strings that are not names from this code or the descriptors go
   * through `quote`.
   */
  function accessLine(
    state: RequestState,
    method: DescMethod,
    protocol: UnaryProtocol,
    code: number,
    seconds: number,
  ): string {
    lineAscii = true;
    const outcome =
      code === 0
        ? `"code":"ok",`
        : `"code":"${codeToString(code)}","reason":${quoteInLine(reasonOf(state, code))},`;
    return `${head()}${quoteInLine(state.requestId)},${methodPart(method, protocol)}${outcome}"durationMs":${Math.round(seconds * 1e6) / 1000},${whoPart(state.principal)}"ip":${ipPart(state.ip)},"msg":"access"}\n`;
  }

  /** `{"level":…,"time":…,"service":"tessera","requestId":`, made once per millisecond. */
  function head(): string {
    const now = Date.now();
    if (now !== headAt) {
      headAt = now;
      headText = `{"level":${levelNumber},"time":${now},"service":"tessera","requestId":`;
    }
    return headText;
  }
  /** The principal's fields (kind, id, method), made again only for another principal object. */
  function whoPart(principal: RequestState["principal"]): string {
    if (principal === null) return "";
    if (principal !== whoOf) {
      whoOf = principal;
      whoText = `"principalKind":"${principal.kind}","principalId":${quote(principal.id)},"authMethod":"${principal.method}",`;
      whoAscii = !NOT_ASCII.test(whoText);
    }
    if (!whoAscii) lineAscii = false;
    return whoText;
  }
  /** The caller's address as a JSON string, made again only for another address. */
  function ipPart(ip: string): string {
    if (ip !== ipOf) {
      ipOf = ip;
      ipText = quote(ip);
      ipAscii = !NOT_ASCII.test(ipText);
    }
    if (!ipAscii) lineAscii = false;
    return ipText;
  }
}

/** How a request to one of the plain HTTP endpoints that are not RPCs (the OAuth 2.0 ones) ended. */
export interface HttpCall {
  /** The endpoint's path: one the server serves (a fixed set), never a path a client made up. */
  path: string;
  /** The request's method, as sent (reduced to a fixed set here). */
  httpMethod: string | undefined;
  /** The HTTP status answered (499 for a client gone before its answer, as nginx counts it). */
  status: number;
  /** The answer's error code (RFC 6749 §5.2: `invalid_client`…), undefined when it succeeded. */
  error?: string | undefined;
  /** Tessera's stable reason behind the error, when one was raised (`TOKEN_INVALID`…). */
  reason?: string | undefined;
}

/** What happens when a request to an HTTP endpoint ends: its metrics and its access line. */
export type HttpObserver = (state: RequestState, call: HttpCall) => void;

/** The methods named as sent; any other is "OTHER" (label values are never a caller's text). */
const HTTP_METHODS = new Set(["GET", "HEAD", "POST"]);

/**
 * Create the observer of finished HTTP endpoint requests, or undefined when metrics and the
 * access log are both off. The line is an RPC's line (see {@link createCallObserver}) with
 * `method` the request line's method and path (`POST /oauth2/token`), `protocol` "http",
 * the HTTP `status`, and `code` "ok" or the answer's error code (with Tessera's `reason`
 * when there is one). Never a header, a form field, a client secret or a token.
 */
export function createHttpObserver(options: Omit<CallObserverOptions, "prefixes">): HttpObserver | undefined {
  const { metrics, log } = options;
  const level = options.access === "off" ? undefined : options.access;
  const levelNumber = level === "debug" ? 20 : 30;
  if (metrics === undefined && level === undefined) return undefined;
  return (state, call) => {
    const started = state.startedAt;
    const seconds = started === undefined ? 0 : (performance.now() - started) / 1000;
    const method =
      call.httpMethod !== undefined && HTTP_METHODS.has(call.httpMethod) ? call.httpMethod : "OTHER";
    const endpoint = `${method} ${call.path}`;
    const error = call.status < 400 ? undefined : (call.error ?? "server_error");
    metrics?.observeHttp(endpoint, call.status, error ?? "", seconds);
    if (level === undefined || !log.isLevelEnabled(level)) return;
    const principal = state.principal;
    const outcome =
      error === undefined
        ? `"code":"ok",`
        : `"code":${quote(error)},${call.reason !== undefined ? `"reason":${quote(call.reason)},` : ""}`;
    const who =
      principal === null
        ? ""
        : `"principalKind":"${principal.kind}","principalId":${quote(principal.id)},"authMethod":"${principal.method}",`;
    log.writeLine(
      `{"level":${levelNumber},"time":${Date.now()},"service":"tessera","requestId":${quote(state.requestId)},"method":${quote(endpoint)},"protocol":"http","status":${call.status},${outcome}"durationMs":${Math.round(seconds * 1e6) / 1000},${who}"ip":${quote(state.ip)},"msg":"access"}\n`,
    );
  };
}

/**
 * What happens when a request for a path nothing serves ends, answered 404 (gRPC and Connect
 * clients read it as `unimplemented`): `protocol` the RPC protocol its method and content type
 * name, undefined for any other request.
 */
export type UnknownPathObserver = (
  state: RequestState,
  httpMethod: string | undefined,
  protocol: UnaryProtocol | undefined,
) => void;

/**
 * Create the observer of requests for paths nothing serves, or undefined when metrics and the
 * access log are both off: a request shaped as an RPC is counted in the RPC metrics as service
 * and method "unknown", code "unimplemented"; any other in the HTTP ones as endpoint
 * "<method> unknown", status 404. Never the path itself, in a label or a line: a client
 * makes one up per request, and each would be a label set kept for ever.
 */
export function createUnknownPathObserver(
  options: Omit<CallObserverOptions, "prefixes">,
): UnknownPathObserver | undefined {
  const http = createHttpObserver(options);
  if (http === undefined) return undefined;
  const { metrics, log } = options;
  const level = options.access === "off" ? undefined : options.access;
  const levelNumber = level === "debug" ? 20 : 30;
  return (state, httpMethod, protocol) => {
    if (protocol === undefined) {
      http(state, { path: "unknown", httpMethod, status: 404, error: "not_found" });
      return;
    }
    const started = state.startedAt;
    const seconds = started === undefined ? 0 : (performance.now() - started) / 1000;
    metrics?.observeUnknownCall(protocol, seconds);
    if (level === undefined || !log.isLevelEnabled(level)) return;
    log.writeLine(
      `{"level":${levelNumber},"time":${Date.now()},"service":"tessera","requestId":${quote(state.requestId)},"method":"unknown","protocol":"${protocol}","code":"unimplemented","reason":"UNIMPLEMENTED","durationMs":${Math.round(seconds * 1e6) / 1000},"ip":${quote(state.ip)},"msg":"access"}\n`,
    );
  };
}
