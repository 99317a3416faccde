import { request as httpRequest } from "node:http";
import { Agent, request as httpsRequest } from "node:https";
import type { ClientTls } from "../tls.js";

const agents = new WeakMap<ClientTls, Agent>();
const MAX_BYTES = 1024 * 1024;

/** GET a small JSON document (the discovery document, the JWKS) from Tessera over TLS. */
export function fetchJson(url: string, tls: ClientTls, timeoutMs = 5000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const https = url.startsWith("https:");
    let agent = agents.get(tls);
    if (https && !agent) {
      agent = new Agent({ keepAlive: true, ...tls });
      agents.set(tls, agent);
    }
    const req = (https ? httpsRequest : httpRequest)(
      url,
      {
        method: "GET",
        headers: { accept: "application/json" },
        timeout: timeoutMs,
        ...(https ? { agent } : {}),
      },
      (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on("data", (c: Buffer) => {
          size += c.length;
          if (size > MAX_BYTES) req.destroy(new Error(`${url}: answer too large`));
          else chunks.push(c);
        });
        res.on("end", () => {
          if (res.statusCode !== 200) return reject(new Error(`${url}: HTTP ${res.statusCode}`));
          try {
            resolve(JSON.parse(Buffer.concat(chunks).toString("utf8")));
          } catch (err) {
            reject(err);
          }
        });
        res.on("error", reject);
      },
    );
    req.on("timeout", () => req.destroy(new Error(`${url}: timed out`)));
    req.on("error", reject);
    req.end();
  });
}
