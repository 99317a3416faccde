import type { DescMethodUnary, DescService } from "@bufbuild/protobuf";
import { ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Agent, fetch } from "undici";

/** TLS material of a client: the CA to trust, and optionally a client certificate. */
export interface ClientTls {
  ca: Buffer;
  cert?: Buffer;
  key?: Buffer;
}

/** A Connect JSON answer: HTTP status and parsed body. */
export interface JsonAnswer {
  status: number;
  body: Record<string, unknown>;
}

/**
 * Calls Tessera's public API the way any HTTP client would: Connect JSON over HTTPS
 * (undici, trusting the development CA), e.g. `call("tessera.v1.UserService/Login", {...})`.
 */
export class JsonClient {
  private readonly agent: Agent;

  constructor(
    private readonly baseUrl: string,
    tls: ClientTls,
  ) {
    this.agent = new Agent({
      connect: { ca: tls.ca, ...(tls.cert ? { cert: tls.cert, key: tls.key } : {}) },
      allowH2: true,
    });
  }

  /** POST one unary call; returns the status and the JSON body, whatever the status. */
  async post(path: string, body: unknown, headers: Record<string, string> = {}): Promise<JsonAnswer> {
    const res = await fetch(`${this.baseUrl}/${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify(body),
      dispatcher: this.agent,
    });
    const text = await res.text();
    let parsed: Record<string, unknown> = {};
    try {
      parsed = text ? (JSON.parse(text) as Record<string, unknown>) : {};
    } catch {
      parsed = { raw: text };
    }
    return { status: res.status, body: parsed };
  }

  /**
   * POST a call that must succeed (HTTP 200); throws with the error body otherwise. A 503
   * (the server busy hashing: low-priority hashing on a contended machine misses its
   * deadline) is tried again after its Retry-After, as a client should, up to 20 times.
   */
  async call<T = Record<string, unknown>>(
    path: string,
    body: unknown,
    headers: Record<string, string> = {},
  ): Promise<T> {
    let answer = await this.post(path, body, headers);
    for (let tries = 1; answer.status === 503 && tries < 20; tries++) {
      await new Promise((r) => setTimeout(r, 1000));
      answer = await this.post(path, body, headers);
    }
    if (answer.status !== 200) {
      throw new Error(`${path} answered HTTP ${answer.status}: ${JSON.stringify(answer.body).slice(0, 400)}`);
    }
    return answer.body as T;
  }

  async close(): Promise<void> {
    await this.agent.close();
  }
}

/** Outcome of one gRPC call: "ok" or the Connect code name (e.g. "unauthenticated"). */
export type GrpcOutcome =
  | { ok: true; message: Record<string, unknown> }
  | { ok: false; code: string; message: string };

/**
 * One unary call over gRPC with connect-node's gRPC transport, which checks what h2load
 * cannot: the `grpc-status` trailer.
 */
export async function grpcCall(
  baseUrl: string,
  tls: ClientTls,
  service: DescService,
  methodName: string,
  input: Record<string, unknown>,
  headers: Record<string, string>,
): Promise<GrpcOutcome> {
  const transport = createGrpcTransport({
    baseUrl,
    nodeOptions: { ca: tls.ca, ...(tls.cert ? { cert: tls.cert, key: tls.key } : {}) },
  });
  const method = service.methods.find((m) => m.name === methodName);
  if (method?.methodKind !== "unary") throw new Error(`${service.typeName} has no unary ${methodName}`);
  const client = createClient(service, transport) as unknown as Record<
    string,
    (input: unknown, options: { headers: Record<string, string> }) => Promise<unknown>
  >;
  try {
    const message = (await client[(method as DescMethodUnary).localName]!(input, { headers })) as Record<
      string,
      unknown
    >;
    return { ok: true, message };
  } catch (err) {
    const ce = ConnectError.from(err);
    return { ok: false, code: codeName(ce.code), message: ce.rawMessage };
  }
}

/** Connect code numbers to their names as they appear on the wire (Connect JSON `code`). */
export function codeName(code: number): string {
  const names = [
    "ok",
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
  ];
  return names[code] ?? String(code);
}
