// The metrics of the server on the public port (connection limits, recycling, certificates),
// read when scraped from the process-wide figures its parts keep anyway.
import { Counter, Gauge, type Registry } from "prom-client";
import { connectionsRecycled } from "../server/connection-age.js";
import { connectionRefusals } from "../server/refusals.js";
import { tlsStatus } from "../server/tls-material.js";

/** Register the server's scrape-time metrics in `registry`, in exposition order. */
export function registerServerMetrics(registry: Registry): void {
  new Counter({
    name: "tessera_connections_refused_total",
    help: "Connections closed before TLS, by limit: per_ip (server.maxConnectionsPerIp), rate (server.newConnectionsPerIpPerSecond), total (server.maxConnections).",
    labelNames: ["limit"],
    registers: [registry],
    collect() {
      this.reset();
      this.inc({ limit: "per_ip" }, connectionRefusals.per_ip);
      this.inc({ limit: "rate" }, connectionRefusals.rate);
      this.inc({ limit: "total" }, connectionRefusals.total);
    },
  });
  new Counter({
    name: "tessera_connections_recycled_total",
    help: "Connections closed at server.maxConnectionAgeSeconds, by protocol (http2: GOAWAY sent; http1).",
    labelNames: ["protocol"],
    registers: [registry],
    collect() {
      this.reset();
      for (const [protocol, n] of Object.entries(connectionsRecycled)) this.inc({ protocol }, n);
    },
  });
  // Streams, not connections: a sibling, so that the connections counter still counts connections.
  new Counter({
    name: "tessera_streams_refused_total",
    help: "HTTP/2 streams refused with RST_STREAM REFUSED_STREAM before any of their call ran, by limit: open_per_ip (server.maxOpenStreamsPerIp).",
    labelNames: ["limit"],
    registers: [registry],
    collect() {
      this.reset();
      this.inc({ limit: "open_per_ip" }, connectionRefusals.open_streams_per_ip);
    },
  });
  new Counter({
    name: "tessera_tls_reload_failures_total",
    help: "Certificate reloads (a cert folder change, SIGHUP) that failed: the previous certificates are served on (logged).",
    registers: [registry],
    collect() {
      this.reset();
      this.inc(tlsStatus.reloadFailures);
    },
  });
  new Gauge({
    name: "tessera_tls_certificate_expiry_seconds",
    help: "The served server certificate's notAfter, in unix seconds (0 without TLS).",
    registers: [registry],
    collect() {
      this.set(tlsStatus.certificateNotAfter);
    },
  });
}
