import { request } from "node:https";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import type { TestServer } from "./helpers.js";

/** VerifyCredential's answer as an independent gRPC client (@grpc/grpc-js loading the .proto) reads it. */
export interface GrpcAnswer {
  valid: boolean;
  code: string;
  principal_id: string;
  tenant_id: string;
  scopes: string[];
  credential_kind: string;
}

export interface GrpcVerifier extends grpc.Client {
  VerifyCredential(
    req: object,
    md: grpc.Metadata,
    cb: (err: grpc.ServiceError | null, res: GrpcAnswer) => void,
  ): void;
}

const PROTO_DIR = join(import.meta.dirname, "..", "proto");

/** A grpc-js VerificationService client over TLS, built from the .proto (not from gen/). */
export function grpcVerifier(port: number, ca: Buffer): GrpcVerifier {
  const def = protoLoader.loadSync("tessera/v1/verification_service.proto", {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  // biome-ignore lint/suspicious/noExplicitAny: grpc-js package definitions are untyped
  const pkg = grpc.loadPackageDefinition(def) as any;
  return new pkg.tessera.v1.VerificationService(
    `localhost:${port}`,
    grpc.credentials.createSsl(ca),
  ) as GrpcVerifier;
}

/** VerifyCredential over gRPC with a bearer token. */
export function grpcVerify(
  client: GrpcVerifier,
  credential: string,
  extra: object,
  token: string,
): Promise<GrpcAnswer> {
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${token}`);
  return new Promise((resolve, reject) =>
    client.VerifyCredential({ credential, ...extra }, md, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

/** One plain HTTPS request (HTTP/1.1), with an optional client certificate; the body as text. */
export function postText(
  ts: TestServer,
  path: string,
  body: string,
  headers: Record<string, string>,
  opts: { clientCert?: { cert: Buffer; key: Buffer } } = {},
): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request(
      `${ts.server.url}${path}`,
      {
        method: "POST",
        ca: ts.certs.ca,
        ...(opts.clientCert ?? {}),
        headers: { "content-type": "application/x-www-form-urlencoded", ...headers },
        agent: false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () =>
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            text: Buffer.concat(chunks).toString("utf8"),
          }),
        );
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}
