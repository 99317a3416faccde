// The address syntaxes the configuration accepts (proxy CIDR blocks, listen addresses), kept
// apart because the server's client-IP and metrics code parses the same values again.
import { isIP } from "node:net";

/**
 * An IP address or CIDR block as [address, prefix, family], or null when it is neither.
 * (net.BlockList does the matching; it needs the parts apart.)
 */
export function parseCidr(value: string): [string, number, "ipv4" | "ipv6"] | null {
  const [address = "", prefixText, extra] = value.trim().split("/");
  if (extra !== undefined) return null;
  const family = isIP(address);
  if (family === 0) return null;
  const max = family === 4 ? 32 : 128;
  const prefix = prefixText === undefined ? max : Number(prefixText);
  if (!/^\d+$/.test(prefixText ?? String(max)) || prefix > max) return null;
  return [address, prefix, family === 4 ? "ipv4" : "ipv6"];
}

/**
 * The host and port of a `host:port` listen address (`[v6]:port` for IPv6; port 0 picks a
 * free one), or null when it is not one. "" and "off" mean no listener (checked by callers).
 */
export function parseListen(value: string): { host: string; port: number } | null {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:\s]+)):(\d{1,5})$/.exec(value.trim());
  if (!m) return null;
  const host = m[1] ?? m[2]!;
  const port = Number(m[3]);
  if (port > 65535 || (m[1] !== undefined && isIP(host) !== 6)) return null;
  return { host, port };
}
