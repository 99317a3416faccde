import { copyFileSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { createCertificateAuthority } from "../../src/certs/dev-ca.js";
import { EXIT } from "../../src/cli/exit-codes.js";
import { runCli } from "../cli-helpers.js";

/**
 * `tessera certs client <name> --out <folder>` writes client.key, client.crt and the
 * development CA's ca.crt. A folder's ca.crt is what its clients (the SDK, the CLI's
 * --cert-folder) verify the server by: written over one of another CA (a production cert
 * folder given as --out by mistake), it silently has them trust whoever holds the
 * development CA's key, which lies unencrypted in a development folder. Like the key, a
 * certificate of another CA is replaced only with --force.
 */
describe("certs client and a ca.crt of another CA in the output folder", { timeout: 120_000 }, () => {
  const env = () => ({ HOME: mkdtempSync(join(tmpdir(), "tessera-certs-home-")) });

  async function folders() {
    const dev = mkdtempSync(join(tmpdir(), "tessera-dev-ca-"));
    await createCertificateAuthority(dev, { commonName: "Dev CA" });
    const prod = mkdtempSync(join(tmpdir(), "tessera-prod-folder-"));
    await createCertificateAuthority(prod, { commonName: "Production CA" });
    return { dev, prod, prodCa: readFileSync(join(prod, "ca.crt"), "utf8") };
  }

  it("refuses to replace it without --force, writing nothing", async () => {
    const { dev, prod, prodCa } = await folders();
    const r = await runCli(["certs", "client", "app", "--cert-dir", dev, "--out", prod], env());
    expect(r.code, r.stderr).toBe(EXIT.usage);
    expect(r.stderr).toContain(join(prod, "ca.crt"));
    expect(r.stderr).toContain("--force");
    expect(readFileSync(join(prod, "ca.crt"), "utf8")).toBe(prodCa);
    expect(() => readFileSync(join(prod, "client.key"))).toThrow();
  });

  it("replaces it with --force", async () => {
    const { dev, prod } = await folders();
    const r = await runCli(["certs", "client", "app", "--cert-dir", dev, "--out", prod, "--force"], env());
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(join(prod, "ca.crt"), "utf8")).toBe(readFileSync(join(dev, "ca.crt"), "utf8"));
  });

  it("writes beside the same CA's ca.crt without --force", async () => {
    const { dev } = await folders();
    const out = mkdtempSync(join(tmpdir(), "tessera-same-ca-"));
    const first = await runCli(["certs", "client", "one", "--cert-dir", dev, "--out", out], env());
    expect(first.code, first.stderr).toBe(0);
    const other = mkdtempSync(join(tmpdir(), "tessera-same-ca-"));
    // Only ca.crt in the folder, the development CA's: nothing of another CA to protect.
    copyFileSync(join(dev, "ca.crt"), join(other, "ca.crt"));
    const r = await runCli(["certs", "client", "two", "--cert-dir", dev, "--out", other], env());
    expect(r.code, r.stderr).toBe(0);
  });
});
