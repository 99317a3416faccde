/**
 * Where this instance is in a shutdown, for grpc.health.v1.Health: from `drain()` (the
 * moment /ready starts answering 503) health says NOT_SERVING, so that a load balancer or
 * Kubernetes probing it over gRPC stops routing as one probing /ready does; from `close()`
 * (the port closes) its watches end with OK instead of holding the shutdown for its grace
 * period and then being cut.
 */
export class ServingState {
  #phase: 0 | 1 | 2 = 0;
  readonly #waiters = new Set<() => void>();

  /** True from `drain()` on. */
  get draining(): boolean {
    return this.#phase >= 1;
  }

  /** True from `close()` on. */
  get closed(): boolean {
    return this.#phase === 2;
  }

  /** A shutdown began: health answers NOT_SERVING. */
  drain(): void {
    this.#advance(1);
  }

  /** The server stops accepting: watches end. */
  close(): void {
    this.#advance(2);
  }

  /** The phase now, for {@link sleep}: a change after it was read wakes the sleeper at once. */
  get phase(): number {
    return this.#phase;
  }

  /**
   * Resolves after `ms`, when `signal` aborts, or when the phase changes from `seen` (read
   * before the caller's last await: a drain meanwhile woke the sleepers before this one
   * slept), whichever comes first.
   */
  sleep(ms: number, signal: AbortSignal, seen: number = this.#phase): Promise<void> {
    return new Promise((resolve) => {
      if (signal.aborted || seen !== this.#phase) return resolve();
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener("abort", done);
        this.#waiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, Math.max(0, ms));
      signal.addEventListener("abort", done, { once: true });
      this.#waiters.add(done);
    });
  }

  #advance(phase: 1 | 2): void {
    if (phase <= this.#phase) return;
    this.#phase = phase;
    for (const wake of [...this.#waiters]) wake();
  }
}
