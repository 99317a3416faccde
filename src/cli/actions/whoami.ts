import { connect, type IncomingHttpHeaders } from "node:http2";
import type { Command } from "commander";
import { type Connection, connectionOf, MAX_ANSWER_BYTES } from "../../sdk/connection.js";
import { resolveClientOptions } from "../../sdk/environment.js";
import type { CurrentUser } from "../../sdk/user-api-core.js";
import { Output } from "../output.js";
import { connectionFlags, globals } from "./flags.js";

// `tessera whoami` makes one call, GetCurrentUser, and the CLI's start-up is most of its
// time: with a token from the flags or the environment it makes that call itself, Connect
// JSON over one HTTP/2 connection (node:http2), so that the Connect and protobuf runtimes
// and the generated descriptors are not loaded (their start is the largest part of whoami's
// own work). A failed call is mapped by Connect's own functions and the SDK's mapping,
// loaded then (whoami-errors.ts): the same error, exit code and message as the client's.
// A session from a profile (which the SDK renews when it expires) and an explicit
// `--protocol grpc` take the SDK client (session.ts), as does a missing credential.

const PATH = "/tessera.v1.UserService/GetCurrentUser";
/** The SDK client's default deadline, sent and kept as its transport does. */
const TIMEOUT_MS = 30_000;

/** Print the caller as whoami shows it (the SDK client's path prints it too). */
export function printUser(out: Output, user: CurrentUser, server: string, profile: string | undefined): void {
  const cert = user.clientCertificate;
  out.record(
    {
      id: user.id,
      username: user.username,
      tenantId: user.tenantId,
      permissions: user.permissions,
      createdAt: user.createdAt?.toISOString(),
      clientCertificate: cert,
      server,
      profile,
    },
    [
      ["username", user.username],
      ["id", user.id],
      ["tenant", user.tenantId],
      ["permissions", user.permissions.join(" ") || "(none)"],
      ["server", server],
      ...(cert
        ? ([["certificate", `${cert.commonName || "(no CN)"} sha256:${cert.sha256Fingerprint}`]] as [
            string,
            string,
          ][])
        : []),
    ],
  );
}

export async function whoami(flags: unknown, cmd: Command): Promise<void> {
  const g = globals(cmd);
  const resolved = resolveClientOptions(connectionFlags(g));
  const { token, refreshToken } = resolved.options;
  const grpcAsked = g.protocol === "grpc" && cmd.getOptionValueSourceWithGlobals("protocol") === "cli";
  if (!token || (resolved.tokenSource === "profile" && refreshToken) || grpcAsked) {
    const { actions } = await import("./session.js");
    return actions.whoami(flags, cmd);
  }
  const connection = connectionOf(resolved.options);
  const user = await getCurrentUser(connection, token);
  printUser(
    new Output(g.output),
    user,
    `${connection.host}:${connection.port}`,
    resolved.tokenSource === "profile" ? resolved.profile : undefined,
  );
}

/** UserService.GetCurrentUser with `token`, Connect JSON over HTTP/2; rejects with the SDK's typed errors. */
export function getCurrentUser(connection: Connection, token: string): Promise<CurrentUser> {
  const secrets = [token];
  return new Promise<CurrentUser>((resolve, reject) => {
    let settled = false;
    const session = connect(connection.baseUrl, connection.tls);
    const settle = (outcome: () => CurrentUser | Promise<CurrentUser>) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      // Possibly in the turn its stream was reset: Node 20's client spins when a session is
      // destroyed then with another stream open, and this session only ever has the one.
      session.destroy();
      Promise.resolve().then(outcome).then(resolve, reject);
    };
    const failed = (map: (m: typeof import("./whoami-errors.js")) => Error) =>
      settle(async () => {
        throw map(await import("./whoami-errors.js"));
      });
    const timer = setTimeout(() => failed((m) => m.deadlineError(secrets)), TIMEOUT_MS);
    session.on("error", (err) => failed((m) => m.transportError(err, secrets)));
    const stream = session.request({
      ":method": "POST",
      ":path": PATH,
      "content-type": "application/json",
      "connect-protocol-version": "1",
      "connect-timeout-ms": String(TIMEOUT_MS),
      authorization: `Bearer ${token}`,
    });
    let answer: IncomingHttpHeaders | undefined;
    const chunks: Buffer[] = [];
    stream.on("response", (headers) => {
      answer = headers;
    });
    let size = 0;
    stream.on("data", (chunk: Buffer) => {
      size += chunk.length;
      // Bounded as the SDK client's answers are: a server must not make whoami buffer gigabytes.
      if (size > MAX_ANSWER_BYTES) failed((m) => m.tooLargeError(secrets));
      else chunks.push(chunk);
    });
    // A connection that fails first fails the request waiting on it ("The pending stream has
    // been canceled", caused by the connection's error): connect-node, which connects before
    // it sends, reports the connection's error, and so does this.
    stream.on("error", (err: Error & { code?: string }) =>
      failed((m) =>
        m.transportError(err.code === "ERR_HTTP2_STREAM_CANCEL" && err.cause ? err.cause : err, secrets),
      ),
    );
    stream.on("end", () => {
      const body = Buffer.concat(chunks);
      const status = Number(answer?.[":status"] ?? 0);
      // The answer a success is, exactly: anything else is for Connect's own checks.
      if (status === 200 && isUnaryJson(answer?.["content-type"]) && !answer?.["content-encoding"]) {
        settle(() => userFromJson(body));
        return;
      }
      settle(async () => {
        const m = await import("./whoami-errors.js");
        const err = m.answerError(status, answer ?? {}, body, secrets);
        if (err) throw err;
        return userFromJson(body);
      });
    });
    stream.on("close", () => {
      // Closed without a whole answer: reset by the server, or the connection lost.
      if (!settled) failed((m) => m.resetError(stream.rstCode, secrets));
    });
    stream.end("{}");
  });
}

function isUnaryJson(contentType: string | undefined): boolean {
  return contentType !== undefined && /^application\/json(?:; ?charset=utf-?8)?$/i.test(contentType);
}

/** GetCurrentUserResponse in proto3 JSON (the JSON or the proto field names) as the SDK returns it. */
export function userFromJson(body: Uint8Array): CurrentUser {
  const j = JSON.parse(Buffer.from(body).toString("utf8")) as Record<string, unknown>;
  const text = (v: unknown) => (typeof v === "string" ? v : "");
  const list = (v: unknown) => (Array.isArray(v) ? v.map(text) : []);
  const created = j.createdAt ?? j.created_at;
  const cc = (j.clientCertificate ?? j.client_certificate) as Record<string, unknown> | null | undefined;
  return {
    id: text(j.id),
    username: text(j.username),
    tenantId: text(j.tenantId ?? j.tenant_id),
    permissions: list(j.permissions),
    createdAt: typeof created === "string" ? timestampDate(created) : undefined,
    clientCertificate: cc
      ? {
          sha256Fingerprint: text(cc.sha256Fingerprint ?? cc.sha256_fingerprint),
          commonName: text(cc.commonName ?? cc.common_name),
          sanUris: list(cc.sanUris ?? cc.san_uris),
        }
      : undefined,
  };
}

const RFC3339 = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$/i;

/** A JSON Timestamp as a Date, rounded to the millisecond as protobuf-es's timestampDate rounds it. */
function timestampDate(value: string): Date {
  const m = RFC3339.exec(value);
  const seconds = m ? Date.parse(`${m[1]}${m[3]!.toUpperCase()}`) : Number.NaN;
  if (Number.isNaN(seconds))
    throw new Error(`cannot decode GetCurrentUserResponse: invalid timestamp "${value}"`);
  return new Date(seconds + Math.round(Number((m![2] ?? "").padEnd(9, "0")) / 1_000_000));
}
