import { Command, CommanderError } from "commander";
import { describeClientError, registerClientCommands } from "./cli/client-commands.js";
import { registerServerCommands } from "./cli/server-commands.js";
import { ConfigError } from "./config.js";
import { VERSION } from "./version.js";

/** Exit codes (documented in --help). */
export const EXIT = {
  ok: 0,
  error: 1,
  usage: 2,
  unauthenticated: 3,
  permissionDenied: 4,
  notFound: 5,
  unavailable: 6,
} as const;

/** Build the `tessera` command line. */
export function buildProgram(): Command {
  const program = new Command("tessera")
    .description("Tessera: authentication and identity for platform APIs")
    .version(VERSION)
    .exitOverride()
    .addHelpText(
      "after",
      `\nExit codes: 0 ok, 1 error, 2 usage, 3 unauthenticated, 4 permission denied, 5 not found, 6 unavailable.`,
    );
  registerServerCommands(program);
  registerClientCommands(program);
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

/** Run the CLI with `argv` (as process.argv). */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return EXIT.ok;
  } catch (err) {
    if (err instanceof CommanderError) {
      return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
    }
    const client = describeClientError(err, EXIT);
    if (client) {
      process.stderr.write(`error: ${client.message}\n`);
      return client.code;
    }
    if (err instanceof ConfigError) {
      process.stderr.write(`${err.message}\n`);
      return EXIT.usage;
    }
    process.stderr.write(`error: ${describeFailure(err)}\n`);
    return EXIT.error;
  }
}

const isEntry = process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href;
if (isEntry) {
  main(process.argv).then((code) => {
    // A failure ends the process now: a pool, timer or half-started server left behind by
    // a failed start must not keep alive a process that serves nothing.
    if (code !== EXIT.ok) process.exit(code);
    // `serve` keeps running; other commands exit with their code.
    if (!process.argv.includes("serve")) process.exitCode = code;
  });
}
