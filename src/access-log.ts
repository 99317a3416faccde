import { fstatSync, write, writeSync } from "node:fs";
import { type Logger, pino } from "pino";

/**
 * Where access lines go: one JSON line per call (call-observer.ts builds it), written at a
 * level that follows the service's log level (SIGHUP changes `level`, as on a pino logger).
 */
export interface AccessLog {
  /** The threshold, a pino level name; lines below it are not written. */
  level: string;
  /** Whether a line at this pino level name is written now. */
  isLevelEnabled(level: string): boolean;
  /**
   * Write one complete line (ending in "\n"). `ascii`: the caller knows every character of
   * it is ASCII, whose UTF-8 is one byte per character, so it may be copied as Latin-1.
   */
  writeLine(line: string, ascii?: boolean): void;
  /**
   * When present, a call's line is written through a logger instead (an app given a logger
   * of its own: {@link accessLogOf}): its fields at `level`, message "access", so that the
   * logger's formatters, timestamp, base, mixin, bindings and streams apply. `writeLine` is
   * then not used.
   */
  writeFields?(level: string, fields: Record<string, unknown>): void;
}

/** Access lines lost because the access log's buffer was full (process-wide, like stderr itself). */
export const accessLogStats = { dropped: 0 };

/** Bytes of access lines the access log holds while stderr's reader falls behind; past it lines are dropped (counted). */
export const ACCESS_LOG_BUFFER_BYTES = 16 * 1024 * 1024;

/**
 * One write's size: PIPE_BUF on Linux, so that each write to a pipe is atomic and a line of
 * the service logger (written synchronously to the same stderr by the event loop) can never
 * land inside one of ours when the pipe is full.
 */
const CHUNK = 4096;
/**
 * Full chunks gathered before they are written, back to back (64 KiB). A write to a pipe
 * wakes its reader (journald, a container runtime) on another CPU, and on this VM that
 * wake-up, not the copy, is most of a write's cost; chunk by chunk it was ~7 % of a JWT
 * call's CPU (bench/results/2026-12-05-session6.md). In a burst only the first write finds
 * the reader asleep, and each write is still one chunk of at most PIPE_BUF bytes.
 */
const BURST = 16;
/** How long a line may wait before it is written when calls are few. */
const FLUSH_MS = 250;
/** Retry delay after EAGAIN (a non-blocking stderr whose pipe is full). */
const RETRY_MS = 20;
/** Written chunks kept for reuse: one burst and the chunk being filled. */
const SPARE_CHUNKS = BURST + 1;

const LEVELS = pino.levels.values;
/** For a 10 ms pause of a synchronous flush whose pipe is full. */
const PAUSE = new Int32Array(new SharedArrayBuffer(4));

/**
 * The access log of `tessera serve`: lines gathered into 4 KiB chunks and written to stderr
 * asynchronously, one write at a time (through the event loop's stream when stderr is a pipe
 * or a socket, else libuv's thread pool: see {@link createAccessLog}), in bursts of 16 chunks,
 * at least every 250 ms and when the process exits.
 *
 * Written by hand rather than through pino and SonicBoom because of what a line costs on the
 * hot path: pino's serialisation and SonicBoom's string buffer (it measures the whole
 * pending string's byte length at every write) cost a visible share of an authenticated
 * call, where a line built as one template string and copied into a chunk costs a fraction
 * of that (bench/observe-cost.ts; bench/results/2026-12-05-access-log.md). Lines keep
 * pino's format (`level`, `time`, `service`, fields, `msg`), so one reader reads both logs.
 *
 * Why asynchronous: a synchronous write blocks the event loop whenever stderr's reader (a
 * pipe to journald, a container runtime, a test harness) is slower than the calls. Lines
 * wait in memory up to {@link ACCESS_LOG_BUFFER_BYTES}; past it a line is dropped, counted
 * (`tessera_access_log_dropped_total`) and the first drop is reported through `onDrop`. The
 * price: the last lines are lost if the process is killed outright (SIGKILL, a crash of V8).
 */
export class AccessLogWriter implements AccessLog {
  level: string;
  /** Chunks waiting to be written, oldest first; the first may be partly written already. */
  private readonly pending: Buffer[] = [];
  private pendingBytes = 0;
  /**
   * Chunks whose write has landed, to be filled again: a new 4 KiB buffer each time cost
   * an allocation outside V8's heap and its sweep (bench/results/2026-12-06-observe-cuts.md).
   */
  private readonly spare: Buffer[] = [];
  /** The whole chunk behind each chunk's backing store, for the views written from it. */
  private readonly chunkOf = new WeakMap<ArrayBufferLike, Buffer>();
  private chunk = this.newChunk();
  private used = 0;
  private writing = false;
  /** Set by close: chunks are no longer written asynchronously, only by its synchronous flush. */
  private closing = false;
  private readonly timer: NodeJS.Timeout;
  private readonly onExit = () => this.flushSync();
  /** Who waits for the write under way to end (close). */
  private idle: (() => void)[] = [];

  /**
   * `sink`: when given, the libuv stream on `fd` (a pipe or socket) that chunks are written
   * through, from the event loop (see {@link createAccessLog}); otherwise libuv's thread
   * pool writes them. `fd` is still what `flushSync` writes to.
   */
  constructor(
    level: string,
    private readonly fd = 2,
    private readonly onDrop?: () => void,
    private readonly sink?: ChunkSink,
  ) {
    this.level = level;
    // The stream reports a failed write to its callback and as an "error" event: without a
    // listener the event would crash the process, as a write to a closed stderr must not.
    sink?.on("error", ignoreSinkError);
    this.timer = setInterval(() => this.flush(), FLUSH_MS);
    this.timer.unref();
    process.once("exit", this.onExit);
  }

  isLevelEnabled(level: string): boolean {
    return (LEVELS[level] ?? 0) >= (LEVELS[this.level] ?? Number.POSITIVE_INFINITY);
  }

  writeLine(line: string, ascii = false): void {
    if (this.pendingBytes + this.used + line.length > ACCESS_LOG_BUFFER_BYTES) {
      this.drop(1);
      return;
    }
    // Buffer#write copies as much of the line as fits: less than 4 bytes left free means it
    // may have been cut (a UTF-8 character takes up to 4), so the line goes to the next chunk.
    // An ASCII line is copied as Latin-1: the same bytes, without UTF-8's encoder.
    const encoding = ascii ? "latin1" : "utf8";
    const written = this.chunk.write(line, this.used, encoding);
    if (CHUNK - this.used - written >= 4) {
      this.used += written;
      return;
    }
    this.sealChunk();
    if (this.pending.length >= BURST) this.writeNext();
    const again = this.chunk.write(line, 0, encoding);
    if (CHUNK - again >= 4) this.used = again;
    else this.enqueue(Buffer.from(line));
  }

  /** Start writing what is gathered (the timer calls it; calls fill chunks and seal them). */
  flush(): void {
    this.seal();
  }

  /**
   * Write everything now, blocking (at exit, or at shutdown after the last call). A chunk
   * whose asynchronous write is under way is left to it.
   */
  flushSync(): void {
    this.sealChunk();
    const first = this.writing ? 1 : 0;
    let tries = 0;
    let next = first;
    while (next < this.pending.length) {
      const chunk = this.pending[next]!;
      try {
        const written = writeSync(this.fd, chunk);
        this.pendingBytes -= written;
        if (written < chunk.length) this.pending[next] = chunk.subarray(written);
        else next++;
      } catch (err) {
        // A non-blocking pipe that stays full for a second, or stderr gone: the rest is lost (counted).
        if ((err as NodeJS.ErrnoException).code === "EAGAIN" && tries++ < 100) {
          Atomics.wait(PAUSE, 0, 0, 10);
          continue;
        }
        this.pending.splice(first, next - first);
        this.discard(first);
        return;
      }
    }
    this.pending.length = first;
  }

  /**
   * Write what is held, in order, and stop (the timer, the exit hook): no new asynchronous
   * write starts; the one under way, if any, is waited for (at most `waitMs`), then the rest
   * is written synchronously after it. A write that outlasts `waitMs` is a destination that
   * hangs: the lines behind it are dropped (counted) rather than written ahead of it, or
   * written synchronously into the same hang.
   */
  async close(waitMs = 1_000): Promise<void> {
    clearInterval(this.timer);
    process.removeListener("exit", this.onExit);
    this.closing = true;
    this.sealChunk();
    if (this.writing) {
      let timer: NodeJS.Timeout | undefined;
      const landed = await new Promise<boolean>((resolve) => {
        this.idle.push(() => resolve(true));
        timer = setTimeout(() => resolve(false), waitMs);
      });
      clearTimeout(timer);
      if (!landed) {
        this.discard(1);
        return;
      }
    }
    this.flushSync();
  }

  private seal(): void {
    this.sealChunk();
    this.writeNext();
  }

  private sealChunk(): void {
    if (this.used > 0) {
      this.pending.push(this.chunk.subarray(0, this.used));
      this.pendingBytes += this.used;
      this.chunk = this.spare.pop() ?? this.newChunk();
      this.used = 0;
    }
  }

  private newChunk(): Buffer {
    // Never a slice of Node's shared pool: the backing store names this chunk alone.
    const chunk = Buffer.allocUnsafeSlow(CHUNK);
    this.chunkOf.set(chunk.buffer, chunk);
    return chunk;
  }

  private enqueue(buffer: Buffer): void {
    if (this.pendingBytes + buffer.length > ACCESS_LOG_BUFFER_BYTES) {
      this.drop(1);
      return;
    }
    this.pending.push(buffer);
    this.pendingBytes += buffer.length;
    this.writeNext();
  }

  private writeNext(): void {
    if (this.writing || this.closing || this.pending.length === 0) return;
    this.writing = true;
    const head = this.pending[0]!;
    if (this.sink !== undefined) {
      // A stream's write is whole or fails: it waits for the pipe itself (no EAGAIN here).
      this.sink.write(head, (err) => this.written(err ?? null, err ? 0 : head.length));
      return;
    }
    write(this.fd, head, 0, head.length, null, (err, written) => this.written(err, written));
  }

  /** The write of the first pending chunk ended: `written` bytes of it reached stderr, or `err`. */
  private written(err: NodeJS.ErrnoException | null, written: number): void {
    this.writing = false;
    if (this.idle.length > 0) for (const resolve of this.idle.splice(0)) resolve();
    if (err) {
      if (err.code === "EAGAIN") {
        setTimeout(() => this.writeNext(), RETRY_MS).unref();
        return;
      }
      // stderr is gone (EPIPE, EBADF): nothing can be written any more; count what is lost.
      this.discard(0);
      return;
    }
    this.advance(written);
    this.writeNext();
  }

  /** `written` bytes of the first pending chunk reached stderr. */
  private advance(written: number): void {
    const head = this.pending[0]!;
    this.pendingBytes -= written;
    if (written < head.length) {
      this.pending[0] = head.subarray(written);
      return;
    }
    this.pending.shift();
    // Only once the whole write has landed: until then the stream or the thread pool reads it.
    const chunk = this.chunkOf.get(head.buffer);
    if (chunk !== undefined && this.spare.length < SPARE_CHUNKS) this.spare.push(chunk);
  }

  /** Give up the pending chunks from index `from` on (stderr cannot take them), counting their lines. */
  private discard(from: number): void {
    for (const chunk of this.pending.splice(from)) {
      this.pendingBytes -= chunk.length;
      this.drop(countLines(chunk));
    }
  }

  /** Count `lines` lost; the first loss of the process is reported. */
  private drop(lines: number): void {
    const first = accessLogStats.dropped === 0;
    accessLogStats.dropped += lines;
    if (first && lines > 0) this.onDrop?.();
  }
}

function countLines(chunk: Buffer): number {
  let n = 0;
  for (let i = chunk.indexOf(10); i >= 0; i = chunk.indexOf(10, i + 1)) n++;
  return n;
}

/**
 * The access log of `tessera serve` (see {@link AccessLogWriter}), on stderr, at the service
 * logger's level.
 */
export function createAccessLog(level: string, onDrop?: () => void): AccessLogWriter {
  return new AccessLogWriter(level, 2, onDrop, stderrStream());
}

/** What {@link AccessLogWriter} writes a chunk through when stderr is a pipe or a socket. */
export interface ChunkSink {
  write(chunk: Buffer, done: (err?: Error | null) => void): unknown;
  on(event: "error", listener: (err: Error) => void): unknown;
}

function ignoreSinkError(): void {}

/**
 * `process.stderr` when it is a pipe or a socket (journald, a container runtime, a test
 * harness), else undefined (a file or a terminal: libuv's thread pool writes the chunks).
 *
 * Why: Node opens such a stderr as a non-blocking libuv stream, whose write is tried at
 * once on the event loop (one write(2) of the chunk, the same system call the thread pool
 * would make) and, when the pipe is full, waits for it through the event loop's poll. The
 * thread pool's write instead wakes a pool thread and the event loop back for every chunk:
 * system calls and context switches that made the access log a visible share of a call's
 * CPU. Each chunk is still one write of at most PIPE_BUF bytes ending at a line's end, so
 * a line can never be split by the service logger's.
 */
function stderrStream(): ChunkSink | undefined {
  try {
    const stat = fstatSync(2);
    return stat.isFIFO() || stat.isSocket() ? process.stderr : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Access lines through a pino logger, under its level: what an app given a logger of its own
 * (and no access log) uses. Written as `logger[level](fields, "access")`, so that the
 * logger's formatters, timestamp, base, mixin, child bindings and a `pino.multistream`'s
 * level routing apply to them as to any other line (writing raw lines into its stream
 * bypassed all of them: after an `error` line a multistream sent the next access line to
 * its error sink). The hand-built fast writer is only for `tessera serve`'s own stderr.
 */
export function accessLogOf(logger: Logger): AccessLog {
  return {
    get level() {
      return logger.level;
    },
    set level(level: string) {
      logger.level = level;
    },
    isLevelEnabled: (level) => logger.isLevelEnabled(level),
    writeLine: (line) => {
      // Only a caller that built a line itself comes here: parsed back into fields.
      const { level, time: _time, msg, ...fields } = JSON.parse(line) as Record<string, unknown>;
      const name = typeof level === "number" ? (pino.levels.labels[level] ?? "info") : "info";
      (logger[name as "info"] as (obj: object, msg?: string) => void)(
        fields,
        typeof msg === "string" ? msg : "",
      );
    },
    writeFields: (level, fields) => {
      (logger[level as "info"] as (obj: object, msg: string) => void)(fields, "access");
    },
  };
}
