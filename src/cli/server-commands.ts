import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import type { Command } from "commander";
import type { ConfigInput } from "../config.js";
import { UsageError } from "./exit-codes.js";

/**
 * The server's modules, loaded when a server command runs rather than with the CLI (the
 * client commands never need them, and loading them took most of a client call's time).
 * MikroORM is loaded first, by storage/orm-async-context.ts, which must happen before any
 * module graph importing it is linked: hence dynamic imports, in this order.
 */
async function serverModules() {
  await import("../storage/orm-async-context.js");
  const [app, bootstrap, logger, accessLog, server, orm, metrics] = await Promise.all([
    import("../app.js"),
    import("../bootstrap.js"),
    import("../logger.js"),
    import("../access-log.js"),
    import("../server.js"),
    import("../storage/orm.js"),
    import("../metrics.js"),
  ]);
  return {
    createApp: app.createApp,
    ensureAdmin: bootstrap.ensureAdmin,
    createLogger: logger.createLogger,
    createAccessLog: accessLog.createAccessLog,
    startServer: server.startServer,
    preflight: server.preflight,
    initORM: orm.initORM,
    startMetricsServer: metrics.startMetricsServer,
  };
}

/** Seconds a shutdown may take past its grace period (flushing audit and last-used, closing the database). */
const SHUTDOWN_FLUSH_SECONDS = 15;
/** Exit code of a shutdown that could not flush or close in time (EXIT.error). */
const EXIT_FAILED_SHUTDOWN = 1;

/** Options shared by the server-side commands. */
interface ServerFlags {
  config?: string;
  host?: string;
  port?: string;
  database?: string;
  certDir?: string;
  mtls?: "off" | "optional" | "require";
  insecurePlaintext?: boolean;
}

/** The configuration the flags give, loaded with config.ts (zod, yaml) only when a server command runs. */
async function configFrom(flags: ServerFlags) {
  const { loadConfig } = await import("../config.js");
  const overrides: ConfigInput = { server: {}, database: {} };
  if (flags.host) overrides.server!.host = flags.host;
  if (flags.port) overrides.server!.port = Number.parseInt(flags.port, 10);
  if (flags.certDir) overrides.server!.certDir = flags.certDir;
  if (flags.mtls) overrides.server!.mtls = flags.mtls;
  if (flags.insecurePlaintext) overrides.server!.insecurePlaintext = true;
  if (flags.database) {
    warnOfPasswordInArguments(flags.database);
    overrides.database!.url = flags.database;
  }
  return loadConfig({ ...(flags.config ? { file: flags.config } : {}), overrides });
}

/**
 * A password in `--database` is readable by every user of the machine for as long as the
 * process runs (`ps`, /proc/<pid>/cmdline). The flag stays (a public contract); the warning
 * names the places that keep it private, and never the password.
 */
function warnOfPasswordInArguments(url: string): void {
  let password = "";
  try {
    password = new URL(url).password;
  } catch {
    return;
  }
  if (password)
    process.stderr.write(
      "warning: --database holds a password, which every user of this machine can read in the process list; " +
        "set TESSERA_DATABASE_URL or database.url in the configuration file instead\n",
    );
}

function withServerFlags(cmd: Command): Command {
  return cmd
    .option("-c, --config <file>", "YAML configuration file (env: TESSERA_CONFIG)")
    .option("--database <url>", "database URL (env: TESSERA_DATABASE_URL)");
}

/** Whether `path` holds a CA certificate other than `ours` (or one that cannot be read as one). */
async function otherCa(path: string, ours: string): Promise<boolean> {
  if (!existsSync(path) || !existsSync(ours)) return false;
  const { X509Certificate } = await import("node:crypto");
  const { readFileSync } = await import("node:fs");
  const fingerprint = (p: string) => {
    try {
      return new X509Certificate(readFileSync(p)).fingerprint256;
    } catch {
      return undefined;
    }
  };
  const theirs = fingerprint(path);
  return theirs === undefined || theirs !== fingerprint(ours);
}

/** Print a secret once, to stdout only. */
function showOnce(text: string): void {
  process.stdout.write(`${text}\n`);
}

/** Register serve, migrate, init and certs on the program. */
export function registerServerCommands(program: Command): void {
  withServerFlags(
    program
      .command("serve")
      .description("run the server: gRPC, gRPC-Web and Connect on one TLS port")
      .option("--host <host>", "address to listen on (env: TESSERA_HOST)")
      .option("-p, --port <port>", "port (env: TESSERA_PORT)")
      .option("--cert-dir <dir>", "certificate folder (env: TESSERA_CERT_DIR)")
      .option("--mtls <mode>", "off | optional | require (env: TESSERA_MTLS)")
      .option("--insecure-plaintext", "serve without TLS (development only)"),
  ).action(async (flags: ServerFlags) => {
    const config = await configFrom(flags);
    // Cheapest and least harmful failure first: the port, then the TLS files present, then
    // the database (reached and migrated), and only then anything created: development
    // certificates, then the admin. A start that cannot serve fails before it creates
    // anything (an admin whose generated password nobody would see served).
    const { checkCanListen } = await import("../listen-check.js");
    await checkCanListen(config.server);
    // The metrics address too ("off" or "" is none): it is part of what this start serves.
    const { parseListen } = await import("../config.js");
    const metricsAt = parseListen(config.metrics.listen);
    if (metricsAt) await checkCanListen(metricsAt);
    const { createApp, createLogger, createAccessLog, startServer, preflight, startMetricsServer } =
      await serverModules();
    const logger = createLogger(config.log.level);
    const accessLog =
      config.log.access === "off"
        ? undefined
        : createAccessLog(config.log.level, () =>
            logger.warn(
              "access log: stderr is not read fast enough; lines are being dropped (counted in tessera_access_log_dropped_total)",
            ),
          );
    await preflight(config.server, { generate: false });
    const app = await createApp(config, {
      logger,
      beforeBootstrap: () => preflight(config.server),
      // Shown as soon as the admin is made: a step after it that fails the start would
      // otherwise leave an admin whose password nobody saw (a later start finds it made).
      onAdminCreated: (bootstrap) =>
        showOnce(
          `Created admin user "${bootstrap.username}" with password: ${bootstrap.generatedPassword}\n(shown once; set TESSERA_ADMIN_PASSWORD to choose it)`,
        ),
      ...(accessLog ? { accessLog } : {}),
    });
    const server = await startServer(app).catch(async (err: unknown) => {
      await app.close().catch(() => undefined);
      throw err;
    });
    const metrics = app.metrics
      ? await startMetricsServer(app.metrics, config.metrics.listen, logger).catch(async (err: unknown) => {
          await server.close(0).catch(() => undefined);
          await app.close().catch(() => undefined);
          throw err;
        })
      : undefined;
    if (metrics) logger.info({ url: metrics.url }, "metrics listening");
    logger.info(
      {
        url: server.url,
        // What is bound: `url` names loopback for a wildcard host (an address to dial), which
        // read as if the port were reachable from this machine only.
        listen: server.listen,
        mtls: config.server.mtls,
        database: app.storage.target.kind,
      },
      "tessera listening",
    );
    const { isLoopbackHost } = await import("../services/machine-user/callback-url.js");
    if (config.server.insecurePlaintext && !isLoopbackHost(config.server.host))
      // Allowed (a TLS proxy in front on a private network), but never silently.
      logger.warn(
        { host: config.server.host },
        "serving without TLS on an address other hosts can reach: passwords and tokens cross the network in clear (server.insecurePlaintext is for development; set TESSERA_HOST=127.0.0.1)",
      );
    process.on("SIGHUP", () => {
      // The log level from the configuration as it reads now (file and environment, under
      // the same flags); a configuration that no longer loads keeps the running one.
      configFrom(flags)
        .then(
          ({ log: { level } }) => {
            const from = logger.level;
            if (level === from) return;
            // Said at info under whichever of the two levels is the more verbose, so that the
            // change shows unless both hide info.
            const louder = logger.levels.values[level]! < logger.levels.values[from]!;
            if (louder) logger.level = level;
            logger.info({ from, to: level }, "log level changed");
            logger.level = level;
            // The access lines are written at info or debug (log.access) through their own
            // buffered logger: under the same level, or a quieter level would not quiet them.
            if (accessLog) accessLog.level = level;
          },
          (err: unknown) =>
            logger.error(
              { err: (err as Error).message },
              "configuration reload failed; keeping the log level",
            ),
        )
        // The TLS files after the level: their reload is logged under the new one.
        .then(() => server.reloadTls())
        .then(
          () => logger.info("TLS material reloaded"),
          (err: Error) =>
            logger.error({ err: err.message }, "TLS reload failed; keeping the previous certificates"),
        );
    });
    let stopping = false;
    const stop = async (signal: string) => {
      if (stopping) return;
      stopping = true;
      const graceSeconds = config.server.shutdownGraceSeconds;
      const drainDelaySeconds = config.server.drainDelaySeconds;
      logger.info(
        { signal, graceSeconds, drainDelaySeconds },
        drainDelaySeconds > 0
          ? "shutting down: /ready answers 503; the port closes after the drain delay"
          : "shutting down: no new connections, finishing calls in flight",
      );
      // A flush or close that hangs (a database gone mid-shutdown) must not keep the
      // process alive for ever: a process manager would see a live, useless server. Not
      // unref'd: a shutdown left with nothing to wait on must not end as a silent exit 0.
      setTimeout(
        () => {
          logger.error("shutdown did not finish in time; exiting");
          process.exit(EXIT_FAILED_SHUTDOWN);
        },
        (drainDelaySeconds + graceSeconds + SHUTDOWN_FLUSH_SECONDS) * 1000,
      );
      try {
        const { cut } = await server.close(graceSeconds * 1000, drainDelaySeconds * 1000);
        if (cut > 0) logger.warn({ cut }, "calls still in flight after the grace period were cut");
        // app.close() flushes the audit log's buffer (app.audit.close()) and the last-used
        // times (app.lastUsed.close()), then closes Redis and the database, in that order.
        await metrics?.close();
        await app.close();
        // The access lines of the last calls, in order (the exit hook would write them too,
        // but cannot wait for a write under way).
        await accessLog?.close();
      } catch (err) {
        logger.error({ err: (err as Error).message }, "shutdown failed");
        process.exit(EXIT_FAILED_SHUTDOWN);
      }
      logger.info("stopped");
      process.exit(0);
    };
    process.on("SIGINT", () => void stop("SIGINT"));
    process.on("SIGTERM", () => void stop("SIGTERM"));
  });

  withServerFlags(
    program.command("migrate").description("apply pending database migrations and exit"),
  ).action(async (flags: ServerFlags) => {
    const config = await configFrom(flags);
    const { initORM } = await serverModules();
    const storage = await initORM({
      url: config.database.url,
      migrate: false,
      bounds: {
        statementTimeoutMs: config.database.statementTimeoutMs,
        connectTimeoutMs: config.database.connectTimeoutMs,
      },
    });
    try {
      const applied = await storage.migrate();
      showOnce(applied.length ? `applied: ${applied.join(", ")}` : "database is up to date");
    } finally {
      await storage.close();
    }
  });

  withServerFlags(
    program
      .command("init")
      .description(
        "migrate and create the bootstrap admin (password from TESSERA_ADMIN_PASSWORD or generated)",
      ),
  ).action(async (flags: ServerFlags) => {
    const config = await configFrom(flags);
    const { ensureAdmin, initORM } = await serverModules();
    const storage = await initORM({
      url: config.database.url,
      migrate: true,
      bounds: {
        statementTimeoutMs: config.database.statementTimeoutMs,
        connectTimeoutMs: config.database.connectTimeoutMs,
      },
    });
    try {
      // Under the start-up lock, like a server's bootstrap: an `init` beside starting servers creates one admin.
      const result = await storage.withStartupLock(() =>
        ensureAdmin(storage.em.fork(), {
          username: config.admin.username,
          password: config.admin.password,
          iterations: config.auth.passwordIterations,
        }),
      );
      if (!result.created) showOnce(`admin user "${result.username}" already exists`);
      else if (result.generatedPassword)
        showOnce(`Created admin user "${result.username}" with password: ${result.generatedPassword}`);
      else showOnce(`Created admin user "${result.username}" with the configured password`);
    } finally {
      await storage.close();
    }
  });

  const certs = program.command("certs").description("development certificates");
  certs
    .command("init", { isDefault: true })
    .description("create a development CA and server certificate in the cert folder if absent")
    .option("--cert-dir <dir>", "certificate folder (env: TESSERA_CERT_DIR)")
    .action(async (flags: { certDir?: string }) => {
      const dir = resolve(flags.certDir ?? process.env.TESSERA_CERT_DIR ?? "./certs");
      const { ensureDevCertificates } = await import("../certs/dev-ca.js");
      const result = await ensureDevCertificates(dir);
      showOnce(
        result.created
          ? `created development CA and server certificate in ${dir}`
          : `certificates already present in ${dir}`,
      );
    });
  certs
    .command("client <name>")
    .description("mint a client certificate signed by the development CA (client.crt, client.key, ca.crt)")
    .option("--cert-dir <dir>", "folder holding ca.crt and ca.key (env: TESSERA_CERT_DIR)")
    .option("-o, --out <dir>", "output folder (default: ./<name>)")
    .option("--san-uri <uri>", "URI subject alternative name, e.g. spiffe://tenant/app")
    .option(
      "--force",
      "replace an existing client.key / client.crt, or a ca.crt of another CA, in the output folder",
    )
    .action(
      async (name: string, flags: { certDir?: string; out?: string; sanUri?: string; force?: boolean }) => {
        const dir = resolve(flags.certDir ?? process.env.TESSERA_CERT_DIR ?? "./certs");
        const out = resolve(flags.out ?? name);
        // A bad argument or a cert folder with no development CA is the caller's to fix (exit
        // 2), not a failure of Tessera's (1); `--san-uri ""` is refused, not taken as absent.
        const { CA_CERT, CA_KEY, checkCommonName, checkSanUri } = await import("../certs/issuing.js");
        try {
          checkCommonName(name, "client name");
          if (flags.sanUri !== undefined) checkSanUri(flags.sanUri);
        } catch (err) {
          throw new UsageError((err as Error).message);
        }
        const noCa = [CA_CERT, CA_KEY].filter((f) => !existsSync(join(dir, f)));
        if (noCa.length > 0)
          throw new UsageError(
            `${noCa.map((f) => join(dir, f)).join(" and ")} not found: certs client signs with the development CA there (run \`tessera certs\` to create one, or give --cert-dir)`,
          );
        // A key that exists may be the one a running client uses: replacing it is a choice,
        // never a side effect. (Checked before minting; a concurrent writer in the same
        // folder is outside what a development tool guards against.)
        const existing = ["client.key", "client.crt"].filter((f) => existsSync(join(out, f)));
        // The folder's ca.crt is what its clients verify the server by: one of another CA
        // (a production folder) replaced by the development CA's would have them trust
        // whoever holds that CA's key. The same CA's is replaced by itself.
        if (!flags.force && (await otherCa(join(out, "ca.crt"), join(dir, "ca.crt"))))
          existing.push("ca.crt");
        if (existing.length > 0 && !flags.force)
          throw new UsageError(
            `${existing.map((f) => join(out, f)).join(" and ")} already exist${existing.length === 1 ? "s" : ""}: give --force to replace, or --out another folder`,
          );
        const { createClientCertificate } = await import("../certs/dev-ca.js");
        const result = await createClientCertificate(
          dir,
          name,
          out,
          flags.sanUri !== undefined ? { sanUri: flags.sanUri } : {},
        );
        showOnce(
          `wrote ${result.certPath}, ${result.keyPath}, ${result.caPath}\nsha256 fingerprint: ${result.sha256Fingerprint}`,
        );
      },
    );
}
