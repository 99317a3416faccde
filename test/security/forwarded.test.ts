import { randomUUID } from "node:crypto";
import { createClient } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { UserService } from "../../gen/tessera/v1/user_service_pb.js";
import { budgetKey, createClientIpResolver } from "../../src/client-ip.js";
import { type ConfigInput, loadConfig } from "../../src/config.js";
import { Code, rejection } from "../errors-util.js";
import { DATABASES, startTestServer, type TestServer, withHeaders } from "../helpers.js";

/**
 * Spoofed forwarding headers. The test client plays an appending proxy on 127.0.0.1
 * (nginx's `$proxy_add_x_forwarded_for`): whatever X-Forwarded-For the attacker sent,
 * followed by the attacker's real address.
 */
const BUDGET = 3;
const LIMITS = {
  enabled: true,
  perIpPerMinute: 10_000,
  authFailuresPerIpPerMinute: BUDGET,
};

let n = 0;
const spoofed = () => `192.0.2.${(n++ % 250) + 1}`;

describe.each(DATABASES)("forwarding headers and the client IP on $name", (db) => {
  const servers: TestServer[] = [];
  async function serve(server: NonNullable<ConfigInput["server"]>): Promise<TestServer> {
    const ts = await startTestServer(db, { rateLimit: LIMITS, server });
    servers.push(ts);
    return ts;
  }
  afterAll(async () => {
    for (const ts of servers) await ts.close();
  });

  /** One wrong login (unknown username, so only the IP's budget counts) with the given headers. */
  const guess = (ts: TestServer, headers: Record<string, string>) =>
    rejection(
      createClient(UserService, withHeaders(ts.connect(), headers)).login({
        username: `nobody-${randomUUID()}`,
        password: "wrong",
      }),
    );

  /** Guess until refused; how many guesses got a verdict. */
  async function verdictsBeforeRefusal(
    ts: TestServer,
    headers: () => Record<string, string>,
  ): Promise<number> {
    for (let i = 0; i < BUDGET + 5; i++) {
      const r = await guess(ts, headers());
      if (r.reason === "RATE_LIMITED") {
        expect(r.code).toBe(Code.ResourceExhausted);
        return i;
      }
      expect(r.reason).toBe("CREDENTIALS_INVALID");
    }
    return Number.POSITIVE_INFINITY;
  }

  let proxied: TestServer;
  let forwardedOnly: TestServer;
  beforeAll(async () => {
    proxied = await serve({ trustedProxies: ["127.0.0.1/32"] });
    forwardedOnly = await serve({ trustedProxies: ["127.0.0.1/32"], forwardedHeader: "forwarded" });
  });

  it("keeps an attacker behind an appending proxy within its budget however it varies its own X-Forwarded-For", async () => {
    const real = "203.0.113.7";
    expect(await verdictsBeforeRefusal(proxied, () => ({ "x-forwarded-for": `${spoofed()}, ${real}` }))).toBe(
      BUDGET,
    );
    // Its real address is refused; another client of the same proxy is not.
    expect((await guess(proxied, { "x-forwarded-for": real })).reason).toBe("RATE_LIMITED");
    expect((await guess(proxied, { "x-forwarded-for": "203.0.113.8" })).reason).toBe("CREDENTIALS_INVALID");
  });

  it("reads RFC 7239 Forwarded from the right in the same way when server.forwardedHeader says so", async () => {
    const headers = () => ({ forwarded: `for=${spoofed()};proto=https, for="203.0.113.9:4711";proto=https` });
    expect(await verdictsBeforeRefusal(forwardedOnly, headers)).toBe(BUDGET);
    // Another client of the proxy is told apart: the header was read.
    expect((await guess(forwardedOnly, { forwarded: "for=203.0.113.14" })).reason).toBe(
      "CREDENTIALS_INVALID",
    );
  });

  it("ignores a client's own X-Forwarded-For behind a proxy that writes only Forwarded", async () => {
    const real = "203.0.113.30";
    // The proxy passes the client's X-Forwarded-For through untouched and appends to Forwarded.
    const headers = () => ({ "x-forwarded-for": spoofed(), forwarded: `for=${real}` });
    expect(await verdictsBeforeRefusal(forwardedOnly, headers)).toBe(BUDGET);
    expect((await guess(forwardedOnly, { forwarded: "for=203.0.113.31" })).reason).toBe(
      "CREDENTIALS_INVALID",
    );
  });

  it("does not fall back to Forwarded when X-Forwarded-For is the configured header and absent", async () => {
    // Every guess names another client in Forwarded: all are the proxy's, one budget.
    expect(await verdictsBeforeRefusal(proxied, () => ({ forwarded: `for=${spoofed()}` }))).toBe(BUDGET);
  });

  it("reads an X-Forwarded-For entry with a port as the client's address", async () => {
    const ports = [50123, 50124, 50125, 50126, 50127, 50128, 50129, 50130];
    let i = 0;
    // One client, a new source port each time: one budget.
    expect(
      await verdictsBeforeRefusal(proxied, () => ({ "x-forwarded-for": `203.0.113.40:${ports[i++]}` })),
    ).toBe(BUDGET);
    // Another client of the proxy, with a port too, is told apart (not counted as the proxy).
    expect((await guess(proxied, { "x-forwarded-for": "203.0.113.41:443" })).reason).toBe(
      "CREDENTIALS_INVALID",
    );
    expect((await guess(proxied, { "x-forwarded-for": "[2001:db8:40::7]:443" })).reason).toBe(
      "CREDENTIALS_INVALID",
    );
  });

  it("gives an IPv6 client one budget for its whole /64, and another /64 its own", async () => {
    let host = 1;
    const inOne64 = () => ({ "x-forwarded-for": `2001:db8:50:1:${(host++).toString(16)}::${host}` });
    expect(await verdictsBeforeRefusal(proxied, inOne64)).toBe(BUDGET);
    expect((await guess(proxied, { "x-forwarded-for": "2001:db8:50:1:ffff:ffff:ffff:ffff" })).reason).toBe(
      "RATE_LIMITED",
    );
    expect((await guess(proxied, { "x-forwarded-for": "2001:db8:50:2::1" })).reason).toBe(
      "CREDENTIALS_INVALID",
    );
  });

  it("cannot spend a victim's budget by naming the victim's address in its own header", async () => {
    const victim = "203.0.113.10";
    for (let i = 0; i < BUDGET + 2; i++)
      await guess(proxied, { "x-forwarded-for": `${victim}, 203.0.113.11` });
    expect((await guess(proxied, { "x-forwarded-for": victim })).reason).toBe("CREDENTIALS_INVALID");
  });

  it("ignores X-Forwarded-For and Forwarded from a peer that is not a trusted proxy", async () => {
    const direct = await serve({ trustedProxies: ["10.0.0.0/8"] });
    expect(
      await verdictsBeforeRefusal(direct, () => ({
        "x-forwarded-for": spoofed(),
        forwarded: `for=${spoofed()}`,
      })),
    ).toBe(BUDGET);
  });

  it("recognises a trusted proxy whose IPv4 address reaches a dual-stack socket as ::ffff:127.0.0.1", async () => {
    const dual = await serve({ host: "::", trustedProxies: ["127.0.0.1"] });
    expect(
      await verdictsBeforeRefusal(dual, () => ({ "x-forwarded-for": `${spoofed()}, 203.0.113.12` })),
    ).toBe(BUDGET);
    // The proxy's other client is told apart: the header was read.
    expect((await guess(dual, { "x-forwarded-for": "203.0.113.13" })).reason).toBe("CREDENTIALS_INVALID");
  });
});

describe("client IP resolution", () => {
  it("refuses a trusted proxy that is not an address or CIDR block, naming the key", () => {
    for (const bad of ["10.0.0.0/33", "proxy.example", "10.0.0.1/8/2", "fd00::/129"])
      expect(() => loadConfig({ env: { TESSERA_TRUSTED_PROXIES: `127.0.0.1, ${bad}` } }), bad).toThrow(
        /server\.trustedProxies.*expected an IP address or CIDR block/s,
      );
    expect(
      loadConfig({ env: { TESSERA_TRUSTED_PROXIES: "10.0.0.0/8, fd00::/8, 127.0.0.1" } }).server
        .trustedProxies,
    ).toEqual(["10.0.0.0/8", "fd00::/8", "127.0.0.1"]);
  });

  const resolve = (config: {
    trustProxy?: boolean;
    trustedProxies?: string[];
    forwardedHeader?: "x-forwarded-for" | "forwarded";
  }) =>
    createClientIpResolver({
      trustProxy: config.trustProxy ?? false,
      trustedProxies: config.trustedProxies ?? [],
      forwardedHeader: config.forwardedHeader ?? "x-forwarded-for",
    });

  it("removes the port of an X-Forwarded-For entry, IPv4 or bracketed IPv6", () => {
    const ip = resolve({ trustedProxies: ["10.0.0.0/8"] });
    expect(ip("10.0.0.1", { "x-forwarded-for": "203.0.113.7:50123" })).toBe("203.0.113.7");
    expect(ip("10.0.0.1", { "x-forwarded-for": "[2001:db8::7]:443" })).toBe("2001:db8::7");
    expect(ip("10.0.0.1", { "x-forwarded-for": "[2001:db8::8]" })).toBe("2001:db8::8");
    expect(ip("10.0.0.1", { "x-forwarded-for": "1.1.1.1, 10.0.0.9:8080" })).toBe("1.1.1.1");
  });

  it("reads only the configured forwarding header, never the other", () => {
    const xff = resolve({ trustedProxies: ["10.0.0.0/8"] });
    const fwd = resolve({ trustedProxies: ["10.0.0.0/8"], forwardedHeader: "forwarded" });
    const both = { "x-forwarded-for": "5.5.5.5", forwarded: "for=6.6.6.6" };
    expect(xff("10.0.0.1", both)).toBe("5.5.5.5");
    expect(fwd("10.0.0.1", both)).toBe("6.6.6.6");
    expect(xff("10.0.0.1", { forwarded: "for=6.6.6.6" })).toBe("10.0.0.1");
    expect(fwd("10.0.0.1", { "x-forwarded-for": "5.5.5.5" })).toBe("10.0.0.1");
    expect(loadConfig({ env: { TESSERA_FORWARDED_HEADER: "forwarded" } }).server.forwardedHeader).toBe(
      "forwarded",
    );
    expect(() => loadConfig({ env: { TESSERA_FORWARDED_HEADER: "x-real-ip" } })).toThrow(/forwardedHeader/);
  });

  it("keys an IPv6 address's budgets on its /64 and an IPv4 address's on itself", () => {
    expect(budgetKey("203.0.113.7")).toBe("203.0.113.7");
    expect(budgetKey("2001:db8:1:2:3:4:5:6")).toBe("2001:db8:1:2::/64");
    expect(budgetKey("2001:DB8:1:2::ffff")).toBe("2001:db8:1:2::/64");
    expect(budgetKey("2001:0db8:0001:0002::1")).toBe("2001:db8:1:2::/64");
    expect(budgetKey("2001:db8::1")).toBe("2001:db8:0:0::/64");
    expect(budgetKey("::1")).toBe("0:0:0:0::/64");
    expect(budgetKey("fe80::1%eth0")).toBe("fe80:0:0:0::/64");
    expect(budgetKey("64:ff9b::192.0.2.1")).toBe("64:ff9b:0:0::/64");
    expect(budgetKey("unknown")).toBe("unknown");
  });

  it("takes the rightmost address that is not a trusted proxy, across IPv4 and IPv6 blocks", () => {
    const ip = resolve({ trustedProxies: ["10.0.0.0/8", "fd00::/8"] });
    expect(ip("10.1.2.3", { "x-forwarded-for": "1.1.1.1, 2.2.2.2, fd00::5, 10.9.9.9" })).toBe("2.2.2.2");
    expect(ip("fd00::1", { "x-forwarded-for": "2001:db8::1" })).toBe("2001:db8::1");
    expect(ip("::ffff:10.0.0.1", { "x-forwarded-for": "::ffff:3.3.3.3" })).toBe("3.3.3.3");
    expect(ip("10.0.0.1", { "x-forwarded-for": "::ffff:c633:6407" })).toBe("198.51.100.7");
    expect(ip("::ffff:a00:1", { "x-forwarded-for": "9.9.9.9" })).toBe("9.9.9.9");
  });

  it("reads nothing from an untrusted peer and normalises its IPv4-mapped address", () => {
    const ip = resolve({ trustedProxies: ["10.0.0.0/8"] });
    expect(ip("::ffff:4.4.4.4", { "x-forwarded-for": "5.5.5.5", forwarded: "for=6.6.6.6" })).toBe("4.4.4.4");
  });

  it("treats TESSERA_TRUST_PROXY as 'the direct peer is a trusted proxy', and no further", () => {
    const ip = resolve({ trustProxy: true });
    expect(ip("127.0.0.1", { "x-forwarded-for": "6.6.6.6, 7.7.7.7" })).toBe("7.7.7.7");
    expect(ip("127.0.0.1", {})).toBe("127.0.0.1");
  });

  it("stops at an entry that is not an address rather than believe what is left of it", () => {
    const ip = resolve({ trustedProxies: ["10.0.0.0/8"] });
    expect(ip("10.0.0.1", { "x-forwarded-for": "8.8.8.8, garbage, 10.0.0.2" })).toBe("10.0.0.2");
    const fwd = resolve({ trustedProxies: ["10.0.0.0/8"], forwardedHeader: "forwarded" });
    expect(fwd("10.0.0.1", { forwarded: 'for="[2001:db8::7]:443", for=unknown' })).toBe("10.0.0.1");
    expect(fwd("10.0.0.1", { forwarded: 'for="[2001:db8::7]:443";by=10.0.0.1' })).toBe("2001:db8::7");
  });
});
