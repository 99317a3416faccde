import { createServer, type Server, type Socket, connect as tcpConnect } from "node:net";

/**
 * A TCP proxy between Tessera and PostgreSQL that a test can cut and restore: the way to
 * take the database away from one server without stopping the machine's PostgreSQL
 * (others use it). `cut()` resets every open connection and every new one (what a server
 * that went down, or a network partition with resets, looks like to the driver);
 * `freeze()` accepts and holds every byte but answers nothing (a host that stopped, a
 * partition that drops packets silently); `restore()` forwards again, held bytes first.
 */
export class DbProxy {
  private readonly sockets = new Set<Socket>();
  private down = false;
  private frozen = false;
  /** Bytes held while frozen, per destination, in arrival order. */
  private readonly held = new Map<Socket, Buffer[]>();

  private constructor(
    private readonly server: Server,
    readonly port: number,
  ) {}

  /** Listen on a free port of 127.0.0.1, forwarding to `host:port`. */
  static async start(target = { host: "127.0.0.1", port: 5432 }): Promise<DbProxy> {
    let proxy: DbProxy | undefined;
    const server = createServer((client) => proxy!.accept(client, target));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    proxy = new DbProxy(server, (server.address() as { port: number }).port);
    return proxy;
  }

  private accept(client: Socket, target: { host: string; port: number }): void {
    if (this.down) {
      client.resetAndDestroy();
      return;
    }
    const upstream = tcpConnect(target.port, target.host);
    for (const s of [client, upstream]) {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
      s.on("error", () => {
        client.destroy();
        upstream.destroy();
      });
    }
    this.forward(client, upstream);
    this.forward(upstream, client);
  }

  private forward(from: Socket, to: Socket): void {
    from.on("data", (chunk: Buffer) => {
      const queue = this.held.get(to);
      if (this.frozen || queue) {
        if (queue) queue.push(chunk);
        else this.held.set(to, [chunk]);
        return;
      }
      to.write(chunk);
    });
    from.on("end", () => to.end());
  }

  /** A PostgreSQL URL through this proxy (database `test`, the given schema). */
  url(schema: string): string {
    return `postgres://postgres@127.0.0.1:${this.port}/test?schema=${schema}`;
  }

  /** Take the database away: reset every connection, and every new one until restore(). */
  cut(): void {
    this.down = true;
    this.held.clear();
    for (const s of this.sockets) s.resetAndDestroy();
  }

  /** Stop answering: every byte from either side is held (connections stay open, new ones are accepted). */
  freeze(): void {
    this.frozen = true;
  }

  /** Forward again (after a freeze, what was held is delivered first). */
  restore(): void {
    this.down = false;
    this.frozen = false;
    for (const [to, chunks] of this.held) if (!to.destroyed) for (const c of chunks) to.write(c);
    this.held.clear();
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
