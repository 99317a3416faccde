import { Writable } from "node:stream";

/** Thrown when a secret cannot be read (no terminal, empty input, cancelled). */
export class PromptError extends Error {
  override name = "PromptError";
}

/** Read a secret piped on stdin (`--password-stdin`): everything up to EOF, one trailing newline removed. */
export async function readSecretFromStdin(input: NodeJS.ReadableStream = process.stdin): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of input) chunks.push(typeof chunk === "string" ? Buffer.from(chunk) : chunk);
  const text = Buffer.concat(chunks)
    .toString("utf8")
    .replace(/\r?\n$/, "");
  if (text.length === 0) throw new PromptError("nothing was read from stdin");
  return text;
}

/**
 * Ask for a secret on the terminal without echoing it. The prompt goes to stderr so
 * stdout stays clean for output. Needs a terminal on stdin.
 */
export async function promptHidden(question: string): Promise<string> {
  if (!process.stdin.isTTY)
    throw new PromptError("no terminal to prompt on; pipe the secret with --password-stdin");
  // Loaded here: every client command imports this module, few of them prompt.
  const { createInterface } = await import("node:readline/promises");
  let muted = false;
  const output = new Writable({
    write(chunk, _encoding, callback) {
      if (!muted) process.stderr.write(chunk);
      callback();
    },
  });
  const rl = createInterface({ input: process.stdin, output, terminal: true });
  try {
    process.stderr.write(question);
    muted = true;
    const answer = await new Promise<string>((resolve, reject) => {
      rl.once("SIGINT", () => reject(new PromptError("cancelled")));
      rl.question("").then(resolve, reject);
    });
    if (answer.length === 0) throw new PromptError("empty password");
    return answer;
  } finally {
    muted = false;
    rl.close();
    process.stderr.write("\n");
  }
}
