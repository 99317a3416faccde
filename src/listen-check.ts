import { createServer } from "node:net";
import { errnoWords } from "./sdk/errno.js";

/** Where the server listens. */
export interface ListenAddress {
  host: string;
  port: number;
}

/** A listen failure as one line naming the address. */
export function listenError(err: Error, at: ListenAddress): Error {
  return new Error(`cannot listen on ${at.host}:${at.port}: ${errnoWords(err) ?? err.message}`, {
    cause: err,
  });
}

/**
 * Fail now if the port cannot be bound: checked first thing by `tessera serve` (before the
 * server's modules load, the database is touched or an admin is created), so a start
 * that cannot serve ends at once. It is a check, not a reservation: a port taken between
 * it and the real listen still fails the start, as clearly, after the bootstrap (which
 * is idempotent). Listening for real before the bootstrap would instead put a port in
 * front of a load balancer that accepts calls the process cannot answer yet.
 */
export async function checkCanListen(at: ListenAddress): Promise<void> {
  if (at.port === 0) return;
  const probe = createServer();
  await new Promise<void>((resolve, reject) => {
    probe.once("error", (err) => reject(listenError(err, at)));
    probe.listen({ port: at.port, host: at.host, exclusive: true }, () => probe.close(() => resolve()));
  });
}
