import { Command, CommanderError } from "commander";
import { VERSION } from "../version.js";
import { registerAuditCommands } from "./audit-commands.js";
import { registerClientCommands } from "./client-commands.js";
import { registerCompletionCommand } from "./completion.js";
import { EXIT, EXIT_HELP, UsageError } from "./exit-codes.js";
import { printable } from "./output.js";
import { registerServerCommands } from "./server-commands.js";

// The `tessera` command line. This module and the command trees it registers import only
// commander: each command loads what it uses when it runs (its command group's actions
// with the SDK core for client commands, the server's modules for `serve`), so that
// `tessera --help` and `tessera whoami` start in a blink. src/main.ts loads it, from the
// build's bundle when there is one (scripts/bundle-cli.ts).

/** Build the `tessera` command line. */
export function buildProgram(): Command {
  const program = new Command("tessera")
    .description("Tessera: authentication and identity for platform APIs")
    .version(VERSION)
    .exitOverride()
    .addHelpText("after", `\n${EXIT_HELP}`);
  registerServerCommands(program);
  registerClientCommands(program);
  registerAuditCommands(program);
  registerCompletionCommand(program);
  return program;
}

/**
 * The one line a failed command prints. A database driver's error (MikroORM's
 * `…Exception` with a SQLSTATE or driver code) is named by class, code and constraint
 * only: its message holds the SQL with its values, a password hash among them when a
 * bootstrap insert fails.
 */
export function describeFailure(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const e = err as Error & { code?: unknown; constraint?: unknown };
  if (/Exception$/.test(err.name) && e.code !== undefined)
    return `database error: ${err.name} (${String(e.code)}${typeof e.constraint === "string" ? `, ${e.constraint}` : ""})`;
  return err.message;
}

/**
 * Make a closed stdout or stderr (`tessera --help | head -5`) end the process at once,
 * silently, with {@link EXIT.brokenPipe}, as git and gh end there (they die of SIGPIPE,
 * which Node ignores): a write after the reader left fails with EPIPE, which Node emits
 * as an 'error' event and, with no listener, turns into a crash with a stack trace. Every
 * output path writes through these two streams (commander's help, the output helpers,
 * completion scripts, the server commands' one-time secrets), so one listener each
 * covers them all.
 */
export function exitOnBrokenPipe(streams: NodeJS.WriteStream[] = [process.stdout, process.stderr]): void {
  for (const stream of streams) {
    if (!stream.listeners("error").includes(onStreamError)) stream.on("error", onStreamError);
  }
}

function onStreamError(err: NodeJS.ErrnoException): void {
  if (err.code === "EPIPE") process.exit(EXIT.brokenPipe);
  throw err;
}

/** Run the CLI with `argv` (as process.argv). */
export async function main(argv: string[]): Promise<number> {
  exitOnBrokenPipe();
  // A failure's message may quote what a server answered (a value it could not decode):
  // shown, never obeyed by the terminal, and on one line unless the CLI composed the lines
  // itself (`lines`: a client error, whose server parts are escaped already; the config's).
  const fail = (text: string, lines = false) => process.stderr.write(`${printable(text, lines)}\n`);
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return EXIT.ok;
  } catch (err) {
    if (err instanceof CommanderError) {
      return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
    }
    if (err instanceof UsageError) {
      fail(`error: ${err.message}`);
      return EXIT.usage;
    }
    // Only a client command can have raised a client error, and it loaded the SDK then
    // (this import shares the copy of the error classes that the command used).
    const { describeClientError } = await import("./client-errors.js");
    const client = describeClientError(err, EXIT);
    if (client) {
      fail(`error: ${client.message}`, true);
      return client.code;
    }
    // A configuration error comes from config.ts, loaded by the server commands only.
    if (err instanceof Error && err.name === "ConfigError") {
      fail(`error: ${err.message}`, true);
      return EXIT.usage;
    }
    fail(`error: ${describeFailure(err)}`);
    return EXIT.error;
  }
}
