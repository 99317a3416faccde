import { isIP } from "node:net";
import { errors } from "../../errors.js";

/** Longest callback URL accepted (it is stored and indexed). */
export const MAX_CALLBACK_URL_LENGTH = 2048;

/** Whether a URL host (as `URL.hostname` gives it) is a loopback address or name. */
export function isLoopbackHost(hostname: string): boolean {
  const host = hostname.startsWith("[") && hostname.endsWith("]") ? hostname.slice(1, -1) : hostname;
  if (host === "localhost" || host.endsWith(".localhost")) return true;
  if (isIP(host) === 4) return host.startsWith("127.");
  if (isIP(host) === 6)
    return host === "::1" || /^::ffff:127\./i.test(host) || /^::ffff:7f[0-9a-f]{2}:/i.test(host);
  return false;
}

/**
 * Validate a backend callback URL and return its normalised form (so that two spellings
 * of one URL register one backend): absolute, `https`, no user info; `http` only to a
 * loopback host and only when `allowLoopbackHttp` (server.allowLoopbackHttpCallbacks).
 * @throws TesseraError INVALID_ARGUMENT (field callback_url)
 */
export function normaliseCallbackUrl(raw: string, allowLoopbackHttp: boolean): string {
  const field = "callback_url";
  if (!raw) throw errors.invalidArgument("callback_url is required", field);
  if (raw.length > MAX_CALLBACK_URL_LENGTH) {
    throw errors.invalidArgument(`callback_url must be at most ${MAX_CALLBACK_URL_LENGTH} characters`, field);
  }
  // WHATWG URL would read "https:host" as "https://host/"; an absolute URL spells out "//".
  if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(raw))
    throw errors.invalidArgument("callback_url must be an absolute URL", field);
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw errors.invalidArgument("callback_url must be an absolute URL", field);
  }
  if (url.username || url.password)
    throw errors.invalidArgument("callback_url must not contain user info", field);
  if (!url.hostname) throw errors.invalidArgument("callback_url must name a host", field);
  if (url.protocol === "https:") return url.href;
  if (url.protocol === "http:") {
    if (allowLoopbackHttp && isLoopbackHost(url.hostname)) return url.href;
    throw errors.invalidArgument(
      allowLoopbackHttp
        ? "callback_url may use http only for a loopback host"
        : "callback_url must use https",
      field,
    );
  }
  throw errors.invalidArgument("callback_url must use https", field);
}
