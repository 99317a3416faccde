// The output of client commands; it loads nothing (the protobuf helpers for messages are
// in messages.ts), so that whoami prints without the protobuf runtime.

/** The `--output` formats. */
export type OutputFormat = "json" | "table";

/**
 * Writes command results to stdout: one JSON document with `--output json`, aligned
 * text with `--output table`. Notes for humans go to stderr, so stdout stays parseable.
 */
export class Output {
  constructor(readonly format: OutputFormat) {}

  get json(): boolean {
    return this.format === "json";
  }

  /** Print a JSON document (json mode only). */
  document(value: unknown): void {
    process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
  }

  /** Print one result: `json` in json mode, else `fields` as "key  value" lines. */
  record(json: unknown, fields: [string, string][]): void {
    if (this.json) {
      this.document(json);
      return;
    }
    const width = Math.max(...fields.map(([k]) => k.length));
    process.stdout.write(`${fields.map(([k, v]) => `${k.padEnd(width)}  ${v}`).join("\n")}\n`);
  }

  /** Print a list: `json` in json mode, else a table with a header row. */
  list(json: unknown, headers: string[], rows: string[][]): void {
    if (this.json) {
      this.document(json);
      return;
    }
    if (rows.length === 0) {
      process.stderr.write("(none)\n");
      return;
    }
    const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
    const line = (cells: string[]) =>
      cells
        .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
        .join("  ")
        .trimEnd();
    process.stdout.write(`${[line(headers), ...rows.map(line)].join("\n")}\n`);
  }

  /** A plain message (table mode) or a JSON document. */
  message(json: unknown, text: string): void {
    if (this.json) this.document(json);
    else process.stdout.write(`${text}\n`);
  }

  /** A note for the human at the terminal: always stderr. */
  note(text: string): void {
    process.stderr.write(`${text}\n`);
  }
}
