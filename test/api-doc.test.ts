import { readFileSync } from "node:fs";
import { create, createFileRegistry, setExtension } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, MethodOptionsSchema } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { AuthRuleSchema, auth, file_tessera_v1_options } from "../gen/tessera/v1/options_pb.js";
import { authRuleProblems, generatedFiles, renderApiDoc } from "../scripts/gen-api-doc.js";

describe("docs/api.md", () => {
  it("matches what the generator renders from the protos (run `npm run docs` after changing a proto)", async () => {
    const committed = readFileSync(new URL("../docs/api.md", import.meta.url), "utf8");
    expect(committed).toBe(await renderApiDoc());
  });

  it("lists every RPC of every Tessera service with its scopes and principals", async () => {
    const files = await generatedFiles();
    const doc = await renderApiDoc(files);
    const services = files.flatMap((f) => f.services).filter((s) => s.typeName.startsWith("tessera."));
    expect(services.map((s) => s.typeName)).toContain("tessera.v1.UserService");
    for (const service of services) {
      expect(doc).toContain(`### ${service.typeName}`);
      for (const method of service.methods)
        expect(doc).toMatch(new RegExp(`^\\| \`${method.name}\` \\|`, "m"));
    }
    expect(doc).toMatch(
      /^\| `ListUsers` \| `ListUsersRequest` → `ListUsersResponse` \| `admin:users` \| user, admin token \| no \| no \|$/m,
    );
    expect(doc).toMatch(/^\| `Login` \| `LoginRequest` → `LoginResponse` \| — \| any \| yes \| yes \|$/m);
    expect(doc).toMatch(
      /^\| `Watch` \| `HealthCheckRequest` → stream `HealthCheckResponse` \| — \| any \| yes \| no \|$/m,
    );
  });

  it("finds an auth rule on every Tessera RPC", async () => {
    expect(authRuleProblems(await generatedFiles())).toEqual([]);
  });

  it("reports an RPC that lacks an auth rule or admits nobody", () => {
    // A throwaway proto file: one method without the option, one whose rule admits no principal kind.
    const nobody = create(MethodOptionsSchema);
    setExtension(nobody, auth, create(AuthRuleSchema, { scopes: ["x:y"] }));
    const proto = create(FileDescriptorProtoSchema, {
      name: "tessera/v1/broken.proto",
      package: "tessera.v1",
      syntax: "proto3",
      dependency: ["tessera/v1/options.proto"],
      messageType: [{ name: "Empty" }],
      service: [
        {
          name: "BrokenService",
          method: [
            { name: "NoRule", inputType: ".tessera.v1.Empty", outputType: ".tessera.v1.Empty" },
            {
              name: "Nobody",
              inputType: ".tessera.v1.Empty",
              outputType: ".tessera.v1.Empty",
              options: nobody,
            },
          ],
        },
      ],
    });
    const registry = createFileRegistry(proto, (name) =>
      name === "tessera/v1/options.proto" ? file_tessera_v1_options : undefined,
    );
    expect(authRuleProblems([registry.getFile("tessera/v1/broken.proto")!])).toEqual([
      "tessera.v1.BrokenService.NoRule: no (tessera.v1.auth) option",
      "tessera.v1.BrokenService.Nobody: admits no principal kind",
    ]);
  });
});
