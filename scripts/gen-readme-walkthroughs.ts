// Copies the walkthrough scripts under examples/ into README.md: each fenced block right after a
// `<!-- walkthrough: examples/… -->` line becomes that script without its header (the leading
// comment lines and a `set -euo pipefail` line), so the README shows exactly what the tests run.
// Run with `npm run docs`; test/readme-walkthroughs.test.ts fails when a block drifts from its
// script, or when a shell or code block is neither a walkthrough nor marked `<!-- not a walkthrough: why -->`.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("..", import.meta.url));

const WALKTHROUGH = /^\s*<!-- walkthrough: (examples\/[\w./-]+) -->$/;
const NOT_WALKTHROUGH = /^\s*<!-- not a walkthrough: \S.* -->$/;
const FENCE = /^(\s*)```(\S*)$/;

/**
 * The fence languages a user runs or pastes into a program: every such block is a walkthrough
 * or says why not. Data and pictures (yaml, proto, json, an untagged diagram) need no marker.
 */
export const RUNNABLE = new Set([
  "sh",
  "bash",
  "shell",
  "console",
  "zsh",
  "ts",
  "typescript",
  "js",
  "javascript",
  "python",
  "py",
]);

/** The fence language a script is shown with, by its extension. */
export function languageOf(path: string): string {
  if (/\.(sh|bash)$/.test(path)) return "sh";
  if (/\.[cm]?ts$/.test(path)) return "ts";
  if (/\.[cm]?js$/.test(path)) return "js";
  if (/\.py$/.test(path)) return "python";
  throw new Error(`${path}: no fence language for this extension`);
}

/**
 * What the README shows of a script: all of it but the header, i.e. the leading comment lines
 * (`#`, shebang included, or `//`: how to run it, its settings) and a `set -euo pipefail` there
 * (a script stops at the first failure; pasted into a terminal, the same line would close it).
 */
export function shownPart(script: string): string {
  const lines = script.split("\n");
  let i = 0;
  while (i < lines.length && /^(#|\/\/)/.test(lines[i]!)) i++;
  if (lines[i] === "set -euo pipefail") i++;
  while (lines[i] === "") i++;
  return lines.slice(i).join("\n").trimEnd();
}

export interface Block {
  /** Index of the opening fence line. */
  open: number;
  /** Index of the closing fence line. */
  close: number;
  indent: string;
  lang: string;
  /** The block's text, its indentation removed. */
  body: string;
  /** The script a walkthrough marker names, "" when marked not a walkthrough, null when unmarked. */
  script: string | null;
}

/** The fenced blocks of a Markdown text, with the marker on the line before each, if any. */
export function fencedBlocks(markdown: string): Block[] {
  const lines = markdown.split("\n");
  const blocks: Block[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = FENCE.exec(lines[i]!);
    if (!open) continue;
    const indent = open[1]!;
    let close = i + 1;
    while (close < lines.length && lines[close] !== `${indent}\`\`\``) close++;
    if (close === lines.length) throw new Error(`README line ${i + 1}: a fence that is never closed`);
    const before = i > 0 ? lines[i - 1]! : "";
    const walkthrough = WALKTHROUGH.exec(before);
    blocks.push({
      open: i,
      close,
      indent,
      lang: open[2]!,
      body: lines
        .slice(i + 1, close)
        .map((l) => (l.startsWith(indent) ? l.slice(indent.length) : l))
        .join("\n"),
      script: walkthrough ? walkthrough[1]! : NOT_WALKTHROUGH.test(before) ? "" : null,
    });
    i = close;
  }
  return blocks;
}

type ReadScript = (path: string) => string;
const readFromRepo: ReadScript = (path) => readFileSync(join(ROOT, path), "utf8");

/** The README with every walkthrough block replaced by its script's shown part. */
export function render(readme: string, read: ReadScript = readFromRepo): string {
  const lines = readme.split("\n");
  // From the last block to the first, so earlier line indexes stay valid.
  for (const block of fencedBlocks(readme).reverse()) {
    if (!block.script) continue;
    const body = shownPart(read(block.script))
      .split("\n")
      .map((l) => (l === "" ? l : block.indent + l));
    lines.splice(
      block.open,
      block.close - block.open + 1,
      `${block.indent}\`\`\`${languageOf(block.script)}`,
      ...body,
      `${block.indent}\`\`\``,
    );
  }
  return lines.join("\n");
}

/** What is wrong with the README's blocks: drifted walkthroughs, runnable blocks without a marker. */
export function problems(readme: string, read: ReadScript = readFromRepo): string[] {
  const out: string[] = [];
  for (const block of fencedBlocks(readme)) {
    const where = `README.md line ${block.open + 1}`;
    if (block.script) {
      let script: string;
      try {
        script = read(block.script);
      } catch {
        out.push(`${where}: ${block.script} does not exist`);
        continue;
      }
      if (block.lang !== languageOf(block.script))
        out.push(`${where}: fenced as "${block.lang}", ${block.script} is ${languageOf(block.script)}`);
      if (block.body !== shownPart(script))
        out.push(`${where}: differs from ${block.script} (run npm run docs)`);
    } else if (block.script === null && RUNNABLE.has(block.lang))
      out.push(
        `${where}: a ${block.lang} block that is neither a walkthrough (<!-- walkthrough: examples/… -->) nor marked <!-- not a walkthrough: why -->`,
      );
  }
  return out;
}

/** The scripts the README shows as walkthroughs, in order of appearance. */
export function walkthroughScripts(readme: string): string[] {
  return fencedBlocks(readme)
    .map((b) => b.script)
    .filter((s): s is string => !!s);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const path = join(ROOT, "README.md");
  const readme = readFileSync(path, "utf8");
  const next = render(readme);
  if (next !== readme) writeFileSync(path, next);
  const left = problems(next);
  if (left.length > 0) {
    console.error(left.join("\n"));
    process.exitCode = 1;
  }
}
