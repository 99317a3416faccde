// Renders docs/api.md from the generated descriptors in gen/: every service and RPC with
// its auth rule, read from the (tessera.v1.auth) method option exactly as the server's
// authorization interceptor reads it. Run with `npm run docs`; test/api-doc.test.ts
// fails when the committed file drifts from the protos.
import { readdirSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { type DescFile, type DescMethod, type DescService, getOption, hasOption } from "@bufbuild/protobuf";
import { auth, PrincipalKindSchema } from "../gen/tessera/v1/options_pb.js";

const GEN = fileURLToPath(new URL("../gen/", import.meta.url));

/** Every `*_pb.ts` under gen/, sorted, as paths relative to gen/. */
function generatedModules(dir = GEN): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...generatedModules(path));
    else if (entry.name.endsWith("_pb.ts")) out.push(relative(GEN, path));
  }
  return out.sort();
}

/** The file descriptors of gen/, loaded from the generated modules. */
export async function generatedFiles(): Promise<DescFile[]> {
  const files: DescFile[] = [];
  for (const module of generatedModules()) {
    const exports = (await import(pathToFileURL(join(GEN, module)).href)) as Record<string, unknown>;
    for (const value of Object.values(exports)) {
      if (value && typeof value === "object" && (value as { kind?: unknown }).kind === "file")
        files.push(value as DescFile);
    }
  }
  return files;
}

/** Whether a service is one of Tessera's own (the others are standard gRPC services, public). */
export function isTesseraService(service: DescService): boolean {
  return service.typeName.startsWith("tessera.");
}

/** Tessera methods without an auth rule, or whose rule admits nobody (the server refuses to start with them). */
export function authRuleProblems(files: readonly DescFile[]): string[] {
  const problems: string[] = [];
  for (const file of files) {
    for (const service of file.services) {
      if (!isTesseraService(service)) continue;
      for (const method of service.methods) {
        const name = `${service.typeName}.${method.name}`;
        if (!hasOption(method, auth)) problems.push(`${name}: no (tessera.v1.auth) option`);
        else {
          const rule = getOption(method, auth);
          if (!rule.public && rule.principals.length === 0)
            problems.push(`${name}: admits no principal kind`);
        }
      }
    }
  }
  return problems;
}

function principalName(kind: number): string {
  const value = PrincipalKindSchema.values.find((v) => v.number === kind);
  return value
    ? value.name
        .replace(/^PRINCIPAL_KIND_/, "")
        .toLowerCase()
        .replace(/_/g, " ")
        .replace("mtls", "mTLS")
    : `kind ${kind}`;
}

function shape(method: DescMethod): string {
  const input = `\`${method.input.name}\``;
  const output = `\`${method.output.name}\``;
  switch (method.methodKind) {
    case "server_streaming":
      return `${input} → stream ${output}`;
    case "client_streaming":
      return `stream ${input} → ${output}`;
    case "bidi_streaming":
      return `stream ${input} → stream ${output}`;
    default:
      return `${input} → ${output}`;
  }
}

function row(service: DescService, method: DescMethod): string {
  if (!isTesseraService(service)) return `| \`${method.name}\` | ${shape(method)} | — | any | yes | no |`;
  if (!hasOption(method, auth))
    return `| \`${method.name}\` | ${shape(method)} | **no auth rule** | — | — | — |`;
  const rule = getOption(method, auth);
  const audited = rule.audit ? "yes" : "no";
  if (rule.public) return `| \`${method.name}\` | ${shape(method)} | — | any | yes | ${audited} |`;
  const scopes = rule.scopes.length > 0 ? rule.scopes.map((s) => `\`${s}\``).join(", ") : "—";
  const principals = rule.principals.map(principalName).join(", ");
  return `| \`${method.name}\` | ${shape(method)} | ${scopes} | ${principals} | no | ${audited} |`;
}

function section(file: DescFile, service: DescService): string[] {
  return [
    `### ${service.typeName}`,
    "",
    `Defined in [\`proto/${file.name}.proto\`](../proto/${file.name}.proto).`,
    "",
    "| RPC | request → response | required scopes | admitted principals | public | audited |",
    "| --- | --- | --- | --- | --- | --- |",
    ...service.methods.map((m) => row(service, m)),
    "",
  ];
}

/** The RPCs whose rule says `password`, named `Service/RPC`. */
function passwordChecks(services: ReadonlyArray<{ service: DescService }>): string {
  const names = services.flatMap(({ service }) =>
    service.methods
      .filter((m) => hasOption(m, auth) && getOption(m, auth).password)
      .map((m) => `\`${service.name}/${m.name}\``),
  );
  return names.length > 0 ? names.join(", ") : "none";
}

/** The whole of docs/api.md. */
export async function renderApiDoc(files?: readonly DescFile[]): Promise<string> {
  const all = files ?? (await generatedFiles());
  const services = all.flatMap((file) => file.services.map((service) => ({ file, service })));
  const own = services.filter((s) => isTesseraService(s.service));
  const standard = services.filter((s) => !isTesseraService(s.service));
  return [
    "# API reference",
    "",
    "Every RPC Tessera serves, with the credentials it accepts. Each Tessera RPC declares its rule next to it in",
    "the proto (`option (tessera.v1.auth)`, see [`options.proto`](../proto/tessera/v1/options.proto)); the server's",
    "admission (src/admission/) reads the same option, and refuses to start with a method that has none.",
    "",
    "- **required scopes**: every listed scope must be granted to the caller (`ns:*` and `*` cover them).",
    "- **admitted principals**: the kinds of caller the RPC accepts at all: *user* (session JWT, personal access",
    "  token, API key or Basic), *machine user* (machine token, Basic or machine access token), *admin token*",
    "  (`TESSERA_ADMIN_TOKEN`), *mTLS client* (a machine user's bound client certificate alone, no header).",
    "- **public**: no credential needed; scopes and principals do not apply.",
    "- **audited**: every call is written to the audit log, admitted or refused (a refusal by the per-IP rate",
    "  limit excepted), with its actor, target id and outcome (`audit: true` in the rule).",
    "- **password check** (`password: true` in the rule): the request carries a password the RPC verifies with",
    "  PBKDF2; while the hash pool is full such a call is refused with `Unavailable` and `Retry-After: 1` before its",
    "  body is read, and is neither audited nor access-logged one by one (counted in",
    `  \`tessera_password_checks_shed_total\`, logged in aggregate). Here: ${passwordChecks(own)}.`,
    "- **who may manage whom**: on top of the required scopes, an RPC that creates, changes, deletes or",
    "  re-credentials a principal (a user, a machine user, their bindings, backends, another user's tokens) needs",
    "  the caller's scopes to cover every scope the target holds now and would hold afterwards; only `*` covers",
    "  `*`. Else `PermissionDenied` (`ACCESS_DENIED`). The list of those RPCs is in the README.",
    "",
    "Every RPC is served over gRPC, gRPC-Web and Connect on one port at `/<service>/<RPC>`; with Connect JSON it is",
    "`POST https://<host>:50052/<service>/<RPC>` with `content-type: application/json` and the request message as",
    "JSON. Refusals are `Unauthenticated` (no or bad credential), `PermissionDenied` (wrong principal kind or a",
    "missing scope), each with a stable reason in a `google.rpc.ErrorInfo` detail (domain `tessera.dev`, the request",
    "id in its metadata as `request_id`; see the README's Errors section).",
    "",
    "## Tessera services",
    "",
    ...own.flatMap((s) => section(s.file, s.service)),
    "## Standard gRPC services",
    "",
    "Public, as the protocols expect: health checking for load balancers and server reflection for tools such",
    "as `buf curl` and `grpcurl`.",
    "",
    ...standard.flatMap((s) => section(s.file, s.service)),
    "Generated from the protos by `npm run docs` (`scripts/gen-api-doc.ts`).",
    "",
  ].join("\n");
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  const files = await generatedFiles();
  const problems = authRuleProblems(files);
  if (problems.length > 0) {
    process.stderr.write(`warning: methods without a usable auth rule:\n  ${problems.join("\n  ")}\n`);
  }
  writeFileSync(new URL("../docs/api.md", import.meta.url), await renderApiDoc(files));
}
