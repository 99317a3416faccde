// The output of client commands; it loads nothing (the protobuf helpers for messages are
// in messages.ts), so that whoami prints without the protobuf runtime.

/**
 * What a terminal acts on rather than shows: C0 controls (ESC starts its sequences: OSC 52
 * writes the clipboard; CR and backspace rewrite a line), DEL, C1 controls (U+009B is CSI
 * to a terminal that reads 8-bit controls) and the bidirectional marks and overrides that
 * reorder what follows (U+061C, the Arabic letter mark, among them). Tab and newline are
 * kept only in text the CLI composed itself (an error with a hint on its next line).
 */
// biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is the point
const CONTROLS = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
const CONTROLS_IN_TEXT =
  // biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is the point
  /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
/** What JSON.stringify leaves raw of {@link CONTROLS} (it escapes C0 itself). */
const CONTROLS_IN_JSON = /[\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

const escaped = (c: string) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`;

/**
 * `text` with every character a terminal would act on written as `\uXXXX`: what a server
 * answers (a name, a message) is shown, never obeyed. `lines`: tabs and newlines stay (a
 * message of the CLI's own with a hint on its next line).
 */
export function printable(text: string, lines = false): string {
  return text.replace(lines ? CONTROLS_IN_TEXT : CONTROLS, escaped);
}

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
    // Inside JSON strings only (nowhere else can they be): `\u009b` reads back as the same text.
    process.stdout.write(`${JSON.stringify(value, null, 2).replace(CONTROLS_IN_JSON, escaped)}\n`);
  }

  /** Print one result: `json` in json mode, else `fields` as "key  value" lines. */
  record(json: unknown, fields: [string, string][]): void {
    if (this.json) {
      this.document(json);
      return;
    }
    const width = Math.max(...fields.map(([k]) => k.length));
    process.stdout.write(`${fields.map(([k, v]) => `${k.padEnd(width)}  ${printable(v)}`).join("\n")}\n`);
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
    rows = rows.map((r) => r.map((c) => printable(c)));
    const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
    const line = (cells: string[]) =>
      cells
        .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
        .join("  ")
        .trimEnd();
    process.stdout.write(`${[line(headers), ...rows.map(line)].join("\n")}\n`);
  }

  /**
   * A plain message (table mode) or a JSON document. One line: the names and messages of a
   * server's in it have their newlines and tabs escaped too, or a server could add lines
   * of its own that pass for the CLI's ("error: ... run curl ... | sh").
   */
  message(json: unknown, text: string): void {
    if (this.json) this.document(json);
    else process.stdout.write(`${printable(text)}\n`);
  }

  /** A one-line note for the human at the terminal, escaped as {@link message}: always stderr. */
  note(text: string): void {
    process.stderr.write(`${printable(text)}\n`);
  }
}
