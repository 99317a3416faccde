import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { CONFIG_REFERENCE, ConfigError, loadConfig } from "../src/config.js";

describe("configuration", () => {
  it("has safe defaults matching the documented environment names", () => {
    const c = loadConfig({ env: {} });
    expect(c.server.host).toBe("0.0.0.0");
    expect(c.server.port).toBe(50052);
    expect(c.server.certDir).toBe("./certs");
    expect(c.server.mtls).toBe("optional");
    expect(c.server.insecurePlaintext).toBe(false);
    expect(c.database.url).toMatch(/^sqlite:\.\/data\//);
    expect(c.admin.username).toBe("admin");
    expect(c.auth.passwordIterations).toBe(600_000);
    expect(c.auth.jwt.secret).toBeUndefined();
  });

  it("applies environment overrides", () => {
    const c = loadConfig({
      env: {
        TESSERA_HOST: "127.0.0.1",
        TESSERA_PORT: "6000",
        TESSERA_DATABASE_URL: "postgres://x@localhost/db",
        TESSERA_CERT_DIR: "/etc/tessera",
        TESSERA_MTLS: "require",
        TESSERA_ADMIN_USERNAME: "root",
        TESSERA_ADMIN_PASSWORD: "a-long-admin-password",
        TESSERA_JWT_SECRET: "x".repeat(32),
        TESSERA_LOG_LEVEL: "debug",
        TESSERA_CORS_ALLOWED_ORIGINS: "https://a.example, https://b.example",
      },
    });
    expect(c.server.host).toBe("127.0.0.1");
    expect(c.server.port).toBe(6000);
    expect(c.database.url).toBe("postgres://x@localhost/db");
    expect(c.server.certDir).toBe("/etc/tessera");
    expect(c.server.mtls).toBe("require");
    expect(c.admin.username).toBe("root");
    expect(c.auth.jwt.secret).toHaveLength(32);
    expect(c.log.level).toBe("debug");
    expect(c.cors.allowedOrigins).toEqual(["https://a.example", "https://b.example"]);
  });

  it("reads a YAML file and lets the environment win over it", () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-config-"));
    const file = join(dir, "tessera.yaml");
    writeFileSync(file, "server:\n  port: 7000\n  mtls: off\nlog:\n  level: warn\n");
    const c = loadConfig({ file, env: { TESSERA_PORT: "7001" } });
    expect(c.server.port).toBe(7001);
    expect(c.server.mtls).toBe("off");
    expect(c.log.level).toBe("warn");
  });

  it("rejects unknown keys, naming them", () => {
    const dir = mkdtempSync(join(tmpdir(), "tessera-config-"));
    const file = join(dir, "bad.yaml");
    writeFileSync(file, "server:\n  prot: 7000\n");
    expect(() => loadConfig({ file, env: {} })).toThrow(/prot/);
  });

  it("rejects bad values with the variable that sets them", () => {
    expect(() => loadConfig({ env: { TESSERA_MTLS: "sometimes" } })).toThrow(/TESSERA_MTLS/);
    expect(() => loadConfig({ env: { TESSERA_PORT: "http" } })).toThrow(ConfigError);
    expect(() => loadConfig({ env: { TESSERA_JWT_SECRET: "short" } })).toThrow(/at least 32/);
    expect(() => loadConfig({ env: { TESSERA_ADMIN_TOKEN: "short" } })).toThrow(/TESSERA_ADMIN_TOKEN/);
  });

  it("documents every key in docs/configuration.md", () => {
    const doc = readFileSync(new URL("../docs/configuration.md", import.meta.url), "utf8");
    for (const ref of CONFIG_REFERENCE) {
      expect(doc, `${ref.env} missing from docs/configuration.md`).toContain(ref.env);
      expect(doc).toContain(`\`${ref.path}\``);
    }
  });
});
