import type { IncomingHttpHeaders } from "node:http";
import { BlockList, isIP } from "node:net";
import { type Config, parseCidr } from "./config.js";

/**
 * `::ffff:192.0.2.1` (an IPv4 peer on a dual-stack socket), or its hex form
 * `::ffff:c000:201`, → `192.0.2.1`; anything else unchanged. (Left in the hex form, every
 * IPv4 client written so would share one IPv6 /64 budget.)
 */
export function normalizeIp(address: string): string {
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(address);
  if (mapped) return mapped[1]!;
  const hex = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/i.exec(address);
  if (!hex) return address;
  const [high, low] = [Number.parseInt(hex[1]!, 16), Number.parseInt(hex[2]!, 16)];
  return `${high >> 8}.${high & 255}.${low >> 8}.${low & 255}`;
}

/**
 * The address of a node written with or without a port: `[2001:db8::7]:443` and
 * `[2001:db8::7]` → `2001:db8::7`, `203.0.113.7:50123` → `203.0.113.7`; anything else
 * unchanged (a bare IPv6 address has colons but no port).
 */
function hostOf(node: string): string {
  if (node.startsWith("[")) {
    const end = node.indexOf("]");
    return end > 0 ? node.slice(1, end) : node;
  }
  return /^[\d.]+:\d+$/.test(node) ? node.slice(0, node.indexOf(":")) : node;
}

/** The addresses of an X-Forwarded-For value, leftmost (farthest from us) first, ports removed. */
function xForwardedFor(value: string): string[] {
  return value.split(",").map((s) => hostOf(s.trim()));
}

/**
 * The `for=` addresses of an RFC 7239 Forwarded value, leftmost first: quotes, the
 * brackets of IPv6 and ports are removed; `unknown` and obfuscated identifiers stay as
 * they are (they are not addresses, so they are never trusted nor taken as the client).
 */
function forwardedFor(value: string): string[] {
  const out: string[] = [];
  for (const element of value.split(",")) {
    let node = "";
    for (const pair of element.split(";")) {
      const eq = pair.indexOf("=");
      if (eq > 0 && pair.slice(0, eq).trim().toLowerCase() === "for") node = pair.slice(eq + 1).trim();
    }
    out.push(hostOf(node.replace(/^"|"$/g, "")));
  }
  return out;
}

/**
 * The key an IP's budgets (rate limits, failure budgets, and the per-address connection
 * and stream limits) are counted under: the address for IPv4, its /64 for IPv6. One IPv6
 * subscriber is routinely given a whole /64 (RFC 6177), so a budget per /128 would give
 * one client 2^64 budgets. An IPv4 address written as IPv6 (`::ffff:192.0.2.1`, a raw
 * dual-stack peer) counts as the IPv4 address, not as one /64 shared by every IPv4 client.
 */
export function budgetKey(raw: string): string {
  // Every call counts its address: the last one's key is kept (consecutive calls mostly
  // come from one client), so that it is not normalised and parsed again.
  if (raw === lastBudget.raw) return lastBudget.key;
  const key = budgetKeyOf(raw);
  lastBudget.raw = raw;
  lastBudget.key = key;
  return key;
}

const lastBudget = { raw: "", key: "" };

function budgetKeyOf(raw: string): string {
  const ip = normalizeIp(raw);
  if (isIP(ip) !== 6) return ip;
  const address = ip.toLowerCase().split("%")[0]!;
  const groupsOf = (part: string): string[] =>
    part === "" ? [] : part.split(":").flatMap((g) => (g.includes(".") ? ["0", "0"] : [g]));
  const double = address.indexOf("::");
  const head = groupsOf(double < 0 ? address : address.slice(0, double));
  const tail = double < 0 ? [] : groupsOf(address.slice(double + 2));
  const full = [...head, ...Array<string>(Math.max(0, 8 - head.length - tail.length)).fill("0"), ...tail];
  return `${full
    .slice(0, 4)
    .map((g) => Number.parseInt(g, 16).toString(16))
    .join(":")}::/64`;
}

function headerValue(headers: IncomingHttpHeaders, name: string): string | undefined {
  const v = headers[name];
  return v === undefined ? undefined : typeof v === "string" ? v : v.join(", ");
}

/**
 * Whether a direct peer address is a trusted proxy (`server.trustedProxies`, or any peer
 * with the `server.trustProxy` shorthand). Such a peer's connection is the proxy's: what
 * it presents (its client certificate) says nothing about the client behind it.
 */
export function createTrustedProxyCheck(
  config: Pick<Config["server"], "trustProxy" | "trustedProxies">,
): (peer: string | undefined) => boolean {
  const trusted = new BlockList();
  for (const entry of config.trustedProxies) {
    const parsed = parseCidr(entry);
    if (parsed) trusted.addSubnet(normalizeIp(parsed[0]), parsed[1], parsed[2]);
  }
  const none = config.trustedProxies.length === 0;
  // Verdicts by address as given: a peer asks once per request, and BlockList.check builds
  // a SocketAddress each time (a few percent of a refused call under a flood). Bounded by
  // clearing: the addresses of forwarded hops are the client's to choose.
  const verdicts = new Map<string, boolean>();
  return (peerAddress) => {
    if (config.trustProxy) return true;
    if (none || peerAddress === undefined) return false;
    let verdict = verdicts.get(peerAddress);
    if (verdict === undefined) {
      const address = normalizeIp(peerAddress);
      const family = isIP(address);
      verdict = family !== 0 && trusted.check(address, family === 4 ? "ipv4" : "ipv6");
      if (verdicts.size >= 4096) verdicts.clear();
      verdicts.set(peerAddress, verdict);
    }
    return verdict;
  };
}

/**
 * Decides the client IP of a request from its peer address and forwarding headers.
 *
 * Only a peer that is a trusted proxy (its address in `server.trustedProxies`, or any
 * peer with the `server.trustProxy` shorthand) has its forwarding headers read; from
 * anyone else they are ignored. The client is then the rightmost address of the chain
 * that is not itself a trusted proxy: an appending proxy forwards
 * `X-Forwarded-For: <whatever the client sent>, <client's real address>`, so only the
 * entries on the right, appended by proxies we trust, can be believed. One header is read,
 * `server.forwardedHeader` (X-Forwarded-For by default, or RFC 7239 Forwarded), never the
 * other as a fallback: a proxy that writes only Forwarded passes a client's own
 * X-Forwarded-For through untouched, and reading it would believe the client.
 */
export function createClientIpResolver(
  config: Pick<Config["server"], "trustProxy" | "trustedProxies"> &
    Partial<Pick<Config["server"], "forwardedHeader">>,
): (peer: string | undefined, headers: IncomingHttpHeaders) => string {
  const isTrusted = createTrustedProxyCheck({ trustProxy: false, trustedProxies: config.trustedProxies });
  const anyPeer = config.trustProxy;
  const header = config.forwardedHeader ?? "x-forwarded-for";

  return (peerAddress, headers) => {
    const peer = normalizeIp(peerAddress ?? "unknown");
    if (!anyPeer && !isTrusted(peer)) return peer;
    const value = headerValue(headers, header);
    const chain =
      value === undefined ? [] : header === "forwarded" ? forwardedFor(value) : xForwardedFor(value);
    // From the right: the nearest hop that is not a trusted proxy is the client.
    let client = peer;
    for (let i = chain.length - 1; i >= 0; i--) {
      const hop = normalizeIp(chain[i]!);
      // Not an address (empty, "unknown", garbage): nothing left of it can be believed.
      if (isIP(hop) === 0) break;
      client = hop;
      if (!isTrusted(hop)) break;
    }
    return client;
  };
}
