import { createServer, type Server, type Socket, connect as tcpConnect } from "node:net";

/** knex's COMMIT as a PostgreSQL Query message: 'Q', int32 length 12, "COMMIT;\0". */
const COMMIT_QUERY = Buffer.concat([Buffer.from([0x51, 0, 0, 0, 12]), Buffer.from("COMMIT;\0")]);

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
  /** An armed {@link loseCommitAfter}. */
  private commitTrap:
    | {
        marker: Buffer;
        deliver: boolean;
        thenCut: boolean;
        hold: boolean;
        atMarker: boolean;
        seen: WeakSet<Socket>;
        sprung: () => void;
      }
    | undefined;

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
    this.forward(client, upstream, client);
    this.forward(upstream, client);
  }

  private forward(from: Socket, to: Socket, client?: Socket): void {
    from.on("data", (chunk: Buffer) => {
      if (client && this.commitTrap && this.trapCommit(client, to, chunk)) return;
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

  /**
   * Lose the answer to the next COMMIT sent on a connection that earlier sent `marker` (a
   * piece of SQL, e.g. `into "api_tokens"`): with `deliver`, the COMMIT reaches PostgreSQL,
   * which commits, and the connection is then reset before its answer arrives; without,
   * the COMMIT never arrives and the connection is reset (PostgreSQL rolls back). Resolves
   * when it happened. Matches knex's `COMMIT;` (a simple-protocol Query message). With
   * `thenCut`, the database is taken away ({@link cut}) at that moment too. With `hold`
   * (and `deliver`), the connection is not reset: its answer is held back for good, as by a
   * network that stopped passing packets one way. With `atMarker`, the statement holding
   * `marker` is the one whose answer is lost (a write outside a transaction commits itself).
   */
  loseCommitAfter(
    marker: string,
    deliver: boolean,
    options: { thenCut?: boolean; hold?: boolean; atMarker?: boolean } = {},
  ): Promise<void> {
    return new Promise((resolve) => {
      this.commitTrap = {
        marker: Buffer.from(marker),
        deliver,
        thenCut: options.thenCut ?? false,
        hold: options.hold ?? false,
        atMarker: options.atMarker ?? false,
        seen: new WeakSet(),
        sprung: resolve,
      };
    });
  }

  /** Whether `chunk` (client to server) sprang the trap; if so it was dealt with. */
  private trapCommit(client: Socket, upstream: Socket, chunk: Buffer): boolean {
    const trap = this.commitTrap!;
    if (chunk.includes(trap.marker)) trap.seen.add(client);
    if (!trap.seen.has(client) || !(trap.atMarker || chunk.includes(COMMIT_QUERY))) return false;
    this.commitTrap = undefined;
    // The server's answer is never forwarded from here on.
    this.held.set(client, []);
    if (trap.deliver) upstream.write(chunk);
    if (trap.hold) {
      trap.sprung();
      return true;
    }
    // Time for PostgreSQL to commit (a reset could discard bytes it has not read yet).
    setTimeout(
      () => {
        if (trap.thenCut) this.cut();
        client.resetAndDestroy();
        upstream.destroy();
        trap.sprung();
      },
      trap.deliver ? 300 : 0,
    );
    return true;
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
