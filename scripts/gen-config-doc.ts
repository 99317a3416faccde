// Renders docs/configuration.md from CONFIG_REFERENCE, which src/config.ts reads off the zod
// schema (each key's variable and meaning are registered on it in src/config/). Run with
// `npm run docs`; test/config.test.ts fails on drift.
import { writeFileSync } from "node:fs";
import { CONFIG_REFERENCE } from "../src/config.js";

export function renderConfigDoc(): string {
  const rows = CONFIG_REFERENCE.map(
    (r) => `| \`${r.path}\` | \`${r.env}\` | ${r.default} | ${r.description} |`,
  );
  return [
    "# Configuration reference",
    "",
    "Tessera reads a YAML file (path from `--config` or `TESSERA_CONFIG`), then environment variables, which",
    "win over the file. Unknown keys and invalid values stop the server at start with a message naming the key",
    "and its variable. Nested keys in YAML follow the dotted path, e.g. `server.port` is",
    "",
    "```yaml",
    "server:",
    "  port: 50052",
    "```",
    "",
    "| key | environment variable | default | meaning |",
    "| --- | --- | --- | --- |",
    ...rows,
    "",
    "Generated from the configuration schema (`src/config/`) by `npm run docs`.",
    "",
  ].join("\n");
}

if (import.meta.url === `file://${process.argv[1]}`) {
  writeFileSync(new URL("../docs/configuration.md", import.meta.url), renderConfigDoc());
}
