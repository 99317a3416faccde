import type { IncomingHttpHeaders } from "node:http";
import { BlockList, isIP } from "node:net";
import { type Config, parseCidr } from "./config.js";

/** `::ffff:192.0.2.1` (an IPv4 peer on a dual-stack socket) → `192.0.2.1`; anything else unchanged. */
export function normalizeIp(address: string): string {
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(address);
  return mapped ? mapped[1]! : address;
}

/** The addresses of an X-Forwarded-For value, leftmost (farthest from us) first. */
function xForwardedFor(value: string): string[] {
  return value.split(",").map((s) => s.trim());
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
    node = node.replace(/^"|"$/g, "");
    if (node.startsWith("[")) node = node.slice(1, node.indexOf("]") > 0 ? node.indexOf("]") : undefined);
    else if (/^[\d.]+:\d+$/.test(node)) node = node.slice(0, node.indexOf(":"));
    out.push(node);
  }
  return out;
}

function headerValue(headers: IncomingHttpHeaders, name: string): string | undefined {
  const v = headers[name];
  return v === undefined ? undefined : typeof v === "string" ? v : v.join(", ");
}

/**
 * Decides the client IP of a request from its peer address and forwarding headers.
 *
 * Only a peer that is a trusted proxy (its address in `server.trustedProxies`, or any
 * peer with the `server.trustProxy` shorthand) has its forwarding headers read; from
 * anyone else they are ignored. The client is then the rightmost address of the chain
 * that is not itself a trusted proxy: an appending proxy forwards
 * `X-Forwarded-For: <whatever the client sent>, <client's real address>`, so only the
 * entries on the right, appended by proxies we trust, can be believed. X-Forwarded-For
 * is read when present, else Forwarded (RFC 7239): a proxy that appends only to
 * Forwarded must drop a client's X-Forwarded-For.
 */
export function createClientIpResolver(
  config: Pick<Config["server"], "trustProxy" | "trustedProxies">,
): (peer: string | undefined, headers: IncomingHttpHeaders) => string {
  const trusted = new BlockList();
  for (const entry of config.trustedProxies) {
    const parsed = parseCidr(entry);
    if (parsed) trusted.addSubnet(normalizeIp(parsed[0]), parsed[1], parsed[2]);
  }
  const anyPeer = config.trustProxy;
  const none = config.trustedProxies.length === 0;
  const isTrusted = (address: string): boolean => {
    if (none) return false;
    const family = isIP(address);
    return family !== 0 && trusted.check(address, family === 4 ? "ipv4" : "ipv6");
  };

  return (peerAddress, headers) => {
    const peer = normalizeIp(peerAddress ?? "unknown");
    if (!anyPeer && !isTrusted(peer)) return peer;
    const xff = headerValue(headers, "x-forwarded-for");
    const fwd = xff === undefined ? headerValue(headers, "forwarded") : undefined;
    const chain = xff !== undefined ? xForwardedFor(xff) : fwd !== undefined ? forwardedFor(fwd) : [];
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
