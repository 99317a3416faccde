import { readdirSync, readFileSync } from "node:fs";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import {
  fencedBlocks,
  problems,
  render,
  shownPart,
  walkthroughScripts,
} from "../scripts/gen-readme-walkthroughs.js";
import {
  PACKAGE_WALKTHROUGHS,
  PYTHON_WALKTHROUGHS,
  SHELL_WALKTHROUGHS,
  WALKTHROUGH_MODULES,
} from "./walkthroughs.js";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const readme = readFileSync(join(ROOT, "README.md"), "utf8");

/** The runnable files under examples/, but examples/workflows (a service of its own, with its own test). */
function exampleScripts(dir = join(ROOT, "examples")): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const path = join(dir, e.name);
    if (e.isDirectory()) return e.name === "workflows" || e.name.startsWith(".") ? [] : exampleScripts(path);
    return /\.(sh|[cm]?[jt]s|py)$/.test(e.name) ? [relative(ROOT, path)] : [];
  });
}

describe("the README's walkthroughs", () => {
  it("are each byte for byte their script under examples/ (npm run docs copies them), and every shell or code block is one or says why not", () => {
    expect(problems(readme)).toEqual([]);
    expect(render(readme)).toBe(readme);
  });

  it("are exactly the scripts the tests run, and every script under examples/ is one of them", () => {
    const shown = walkthroughScripts(readme);
    expect(new Set(shown).size, "a script shown twice").toBe(shown.length);
    expect([...shown].sort()).toEqual(
      [...SHELL_WALKTHROUGHS, ...PACKAGE_WALKTHROUGHS, ...PYTHON_WALKTHROUGHS].sort(),
    );
    const modules: readonly string[] = WALKTHROUGH_MODULES;
    expect(
      exampleScripts()
        .filter((f) => !modules.includes(f))
        .sort(),
    ).toEqual([...shown].sort());
  });

  it("leaves no client key or secret to the working copy: the quick start's certificate goes under examples/.secrets/", () => {
    expect(readme).not.toMatch(/--out \.\/my-backend|certFolder: "\.\/my-backend"/);
    const gitignore = readFileSync(join(ROOT, ".gitignore"), "utf8").split("\n");
    expect(gitignore).toContain("examples/.secrets/");
    for (const script of SHELL_WALKTHROUGHS) {
      const text = readFileSync(join(ROOT, script), "utf8");
      // Every file a script writes is under $SECRETS, which is a folder of examples/.secrets/.
      const secrets = /^SECRETS=examples\/\.secrets\/.+$/m.test(text);
      for (const line of text.split("\n").filter((l) => / > "|--out /.test(l)))
        expect(secrets && /(> "\$SECRETS\/|--out "\$SECRETS\/)/.test(line), `${script}: ${line}`).toBe(true);
    }
  });
});

describe("the README generator (scripts/gen-readme-walkthroughs.ts)", () => {
  const scripts: Record<string, string> = {
    "examples/a.sh":
      "#!/usr/bin/env bash\n# how to run it\nset -euo pipefail\n\necho one\n# a step\necho two\n",
    "examples/b.mjs": "// header\n// more\nconsole.log(1);\n",
  };
  const read = (path: string) => {
    const text = scripts[path];
    if (text === undefined) throw new Error(`no ${path}`);
    return text;
  };
  const doc = [
    "# t",
    "<!-- walkthrough: examples/a.sh -->",
    "```sh",
    "old",
    "```",
    "- item",
    "  <!-- walkthrough: examples/b.mjs -->",
    "  ```js",
    "  ```",
    "<!-- not a walkthrough: output -->",
    "```sh",
    "$ something",
    "```",
    "```yaml",
    "a: 1",
    "```",
    "",
  ].join("\n");

  it("shows a script without its header comment and its set -euo pipefail, comments in the body kept", () => {
    expect(shownPart(scripts["examples/a.sh"]!)).toBe("echo one\n# a step\necho two");
    expect(shownPart(scripts["examples/b.mjs"]!)).toBe("console.log(1);");
  });

  it("copies each script into the block after its marker, indented as the block is", () => {
    const out = render(doc, read);
    expect(out).toContain(
      "<!-- walkthrough: examples/a.sh -->\n```sh\necho one\n# a step\necho two\n```\n- item",
    );
    expect(out).toContain("  <!-- walkthrough: examples/b.mjs -->\n  ```js\n  console.log(1);\n  ```\n");
    expect(problems(out, read)).toEqual([]);
    expect(render(out, read)).toBe(out);
  });

  it("reports a drifted block, a missing script, a wrong fence language and an unmarked shell or code block", () => {
    const out = render(doc, read);
    expect(problems(out.replace("echo two", "echo 2"), read)).toEqual([
      "README.md line 3: differs from examples/a.sh (run npm run docs)",
    ]);
    expect(problems(out.replace("examples/b.mjs", "examples/c.mjs"), read)).toEqual([
      "README.md line 10: examples/c.mjs does not exist",
    ]);
    expect(problems(out.replace("  ```js", "  ```ts"), read)[0]).toMatch(
      /fenced as "ts", examples\/b\.mjs is js/,
    );
    const unmarked = problems(out.replace("<!-- not a walkthrough: output -->\n", ""), read);
    expect(unmarked).toHaveLength(1);
    expect(unmarked[0]).toMatch(/^README\.md line 13: a sh block that is neither a walkthrough/);
    // A marker only counts on the line right before its block.
    expect(
      problems(
        out.replace("<!-- not a walkthrough: output -->\n", "<!-- not a walkthrough: output -->\n\n"),
        read,
      ),
    ).toHaveLength(1);
  });

  it("finds the README's blocks, indented ones included", () => {
    expect(fencedBlocks(readme).filter((b) => b.indent !== "").length).toBeGreaterThan(0);
  });
});
