// A downstream service of the platform protected by Tessera: seed 001's workflow API as a
// Connect service (gRPC, gRPC-Web and Connect on one TLS port), and the same list as a plain
// JSON route behind the Node middleware. Each RPC's scopes are in its own proto
// (proto/workflows/v1/workflow_service.proto); the interceptor reads them.
//
// In a project of your own, import from "@tessera/sdk/server" (this example imports the
// repository's sources, so its test runs on them).
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { createSecureServer, type Http2SecureServer } from "node:http2";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { type ConnectRouter, createContextValues, type HandlerContext, type Interceptor } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { pino } from "pino";
import {
  createTesseraAuth,
  createTesseraAuthInterceptor,
  createTesseraAuthMiddleware,
  principalOf,
  type TesseraAuth,
  type TesseraAuthOptions,
  tesseraContextValues,
  tesseraPrincipalKey,
} from "../../src/sdk/server/index.js";
import { WorkflowService } from "./gen/workflows/v1/workflow_service_pb.js";

const WORKFLOWS = [
  { id: "wf-build", name: "build" },
  { id: "wf-deploy", name: "deploy" },
];

/** The principal the interceptor put in the context (absent only without the interceptor: the bench's baseline). */
function callerOf(ctx: HandlerContext) {
  return ctx.values.get(tesseraPrincipalKey);
}

/** The service's handlers: they only read who is calling; the interceptor decided whether they may. */
export function routes(router: ConnectRouter): void {
  router.service(WorkflowService, {
    listWorkflows(_req, ctx) {
      const caller = callerOf(ctx);
      return { workflows: WORKFLOWS, principalId: caller?.id ?? "", tenantId: caller?.tenantId ?? "" };
    },
    runWorkflow(req, ctx) {
      const caller = callerOf(ctx);
      return {
        runId: `${req.workflowId}-${randomUUID()}`,
        startedBy: caller?.id ?? "",
        credentialKind: caller?.credentialKind ?? "",
      };
    },
  });
}

/** Options of {@link startWorkflowServer}. */
export interface WorkflowServerOptions {
  /** The service's own TLS certificate and key. */
  cert: Buffer;
  key: Buffer;
  /** CA of client certificates to ask for (certificate-bound credentials); unset: none asked. */
  clientCa?: Buffer;
  /** How to reach Tessera; false: no interceptor at all (the bench's baseline, never in production). */
  tessera: TesseraAuthOptions | TesseraAuth | false;
  port?: number;
  host?: string;
}

/** A running example service. */
export interface WorkflowServer {
  url: string;
  port: number;
  server: Http2SecureServer;
  /** The interceptor's and middleware's core (undefined without Tessera). */
  auth: TesseraAuth | undefined;
  close(): Promise<void>;
}

/**
 * Build and start the service: Connect routes behind the Tessera interceptor, and
 * `GET /v1/workflows` (JSON) behind the Node middleware, both on one core (one cache, one
 * revocation stream).
 */
export async function startWorkflowServer(options: WorkflowServerOptions): Promise<WorkflowServer> {
  const auth =
    options.tessera === false
      ? undefined
      : "authenticate" in options.tessera
        ? options.tessera
        : createTesseraAuth(options.tessera);
  const interceptors: Interceptor[] = auth ? [createTesseraAuthInterceptor(auth)] : [];
  const adapter = connectNodeAdapter({
    routes,
    interceptors,
    readMaxBytes: 64 * 1024,
    // Hands the verified client certificate to the interceptor, for bound credentials.
    contextValues: auth ? tesseraContextValues : () => createContextValues(),
  });
  const middleware = auth ? createTesseraAuthMiddleware(auth, { rule: { scopes: ["workflows:read"] } }) : undefined;

  const server = createSecureServer(
    {
      allowHTTP1: true,
      cert: options.cert,
      key: options.key,
      ...(options.clientCa ? { ca: options.clientCa, requestCert: true, rejectUnauthorized: false } : {}),
      settings: { maxConcurrentStreams: 100 },
    },
    (req, res) => {
      if (req.url === "/v1/workflows" && req.method === "GET") {
        const answer = () => {
          const caller = middleware ? principalOf(req) : undefined;
          const body = JSON.stringify({ workflows: WORKFLOWS, principal_id: caller?.id ?? "" });
          res.writeHead(200, { "content-type": "application/json" }).end(body);
        };
        if (!middleware) return answer();
        // The middleware takes node:http's (req, res); HTTP/2's compatibility objects are alike.
        return middleware(req as never, res as never, (err) => {
          if (err) res.writeHead(500).end();
          else answer();
        });
      }
      adapter(req, res);
    },
  );
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, options.host ?? "127.0.0.1", () => resolve());
  });
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : 0;
  return {
    url: `https://localhost:${port}`,
    port,
    server,
    auth,
    async close() {
      auth?.close();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        // Open HTTP/2 sessions would keep close() waiting.
        setTimeout(resolve, 1000).unref();
      });
    },
  };
}

// Run directly: `node --import tsx examples/workflows/service.ts`, configured by environment.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const env = (name: string, fallback?: string): string => {
    const value = process.env[name] ?? fallback;
    if (value === undefined) throw new Error(`${name} is required`);
    return value;
  };
  const tlsDir = env("WORKFLOWS_TLS_DIR");
  const logger = pino({ name: "workflows" });
  const started = await startWorkflowServer({
    cert: readFileSync(join(tlsDir, "server.crt")),
    key: readFileSync(join(tlsDir, "server.key")),
    tessera: {
      server: env("TESSERA_SERVER", "https://localhost:50052"),
      certFolder: env("TESSERA_CERT_FOLDER"),
      ...(process.env.WORKFLOWS_TESSERA_CREDENTIAL ? { credential: process.env.WORKFLOWS_TESSERA_CREDENTIAL } : {}),
      // Where the SDK reports the revocation stream's ups and downs and, in aggregate, verifications
      // refused or failing: without one it is silent.
      logger,
    },
    port: Number(env("WORKFLOWS_PORT", "50060")),
  });
  logger.info({ url: started.url }, "workflows service started");
}
