import type { MigrationObject } from "@mikro-orm/core";
import { Migration20261123000000_foundation } from "./Migration20261123000000_foundation.js";

/**
 * Every migration, in order. Listed explicitly (not discovered by glob) so the same
 * list works from TypeScript sources, compiled output and the packed package.
 * Append new migrations at the end; never edit one that has shipped.
 */
export const MIGRATIONS: MigrationObject[] = [
  { name: "Migration20261123000000_foundation", class: Migration20261123000000_foundation },
];
