import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** How the bench runs the servers: compiled JavaScript (as deployed) or TypeScript through tsx. */
export type Runtime = "compiled" | "tsx";

/** A command line for a TypeScript entry point of the repository (e.g. `src/main.ts`). */
export interface Launcher {
  runtime: Runtime;
  command: string;
  args(entry: string): string[];
  cwd: string;
}

/**
 * Compile src/, gen/ and bench/ with the project's own TypeScript into `outDir` (outside
 * the working tree, so `bin/tessera.js` never picks up a stale build) and return a
 * launcher running the output with plain `node`, as a production deployment would
 * (`npm run build`, then `node dist/src/main.js serve`).
 *
 * Type errors elsewhere in the tree do not stop the bench as long as JavaScript was
 * emitted; they are returned as a warning.
 */
export function compileForBench(
  root: string,
  outDir: string,
): { launcher: Launcher; warning: string | null } {
  mkdirSync(outDir, { recursive: true });
  // Resolution of packages and of "type": "module" from the output folder.
  if (!existsSync(join(outDir, "node_modules")))
    symlinkSync(join(root, "node_modules"), join(outDir, "node_modules"), "dir");
  writeFileSync(join(outDir, "package.json"), `${JSON.stringify({ type: "module", private: true })}\n`);
  writeFileSync(
    join(outDir, "tsconfig.json"),
    `${JSON.stringify(
      {
        extends: join(root, "tsconfig.json"),
        compilerOptions: {
          noEmit: false,
          outDir: join(outDir, "dist"),
          rootDir: root,
          declaration: false,
          sourceMap: false,
          incremental: false,
        },
        include: [join(root, "src"), join(root, "gen"), join(root, "bench")],
      },
      null,
      2,
    )}\n`,
  );
  const tsc = spawnSync(
    process.execPath,
    [join(root, "node_modules", "typescript", "bin", "tsc"), "-p", join(outDir, "tsconfig.json")],
    {
      cwd: root,
      encoding: "utf8",
    },
  );
  const dist = join(outDir, "dist");
  if (!existsSync(join(dist, "src", "main.js")) || !existsSync(join(dist, "bench", "bare-server.js"))) {
    throw new Error(`TypeScript emitted no JavaScript for the bench:\n${tsc.stdout}${tsc.stderr}`);
  }
  // The command line's bundle, as `npm run build` makes it (a checkout from before the
  // bundle has no script and runs its client commands unbundled). The script of a checkout
  // from before the chunked bundle takes the bundle's file, a later one its folder
  // (dist/cli) or that file's folder.
  const bundleScript = join(root, "scripts", "bundle-cli.ts");
  if (existsSync(bundleScript)) {
    const bundled = spawnSync(
      process.execPath,
      ["--import", "tsx", bundleScript, join(dist, "cli", "client.bundle.js")],
      { cwd: root, encoding: "utf8" },
    );
    if (bundled.status !== 0)
      throw new Error(`bundling the client commands failed:\n${bundled.stdout}${bundled.stderr}`);
  }
  const warning =
    tsc.status === 0
      ? null
      : `tsc reported errors (JavaScript was emitted anyway):\n${tsc.stdout.split("\n").slice(0, 8).join("\n")}`;
  return {
    launcher: {
      runtime: "compiled",
      command: process.execPath,
      args: (entry) => [join(dist, entry.replace(/\.ts$/, ".js"))],
      cwd: outDir,
    },
    warning,
  };
}

/** Run the TypeScript sources through tsx's loader (`npm start`'s way). */
export function tsxLauncher(root: string): Launcher {
  return {
    runtime: "tsx",
    command: process.execPath,
    args: (entry) => ["--import", "tsx", join(root, entry)],
    cwd: root,
  };
}
