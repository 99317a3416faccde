/**
 * Time-ordered ids made in a loop, to count the instructions of one id under callgrind: the
 * hand-written src/storage/uuid-v7.ts against the `uuid` package's v7. Bundled first, so
 * that no TypeScript loader is in the count:
 *
 *   npx esbuild bench/uuid-ids.ts --bundle --platform=node --format=esm --outfile=/tmp/ids.mjs
 *   valgrind --tool=callgrind node /tmp/ids.mjs ours|uuid 0
 *   valgrind --tool=callgrind node /tmp/ids.mjs ours|uuid 200000
 *
 * One id is the difference of the two counts over 200000 (start-up and loading cancel out).
 */
import { v7 } from "uuid";
import { uuidV7 } from "../src/storage/uuid-v7.js";

const [impl = "ours", count = "200000"] = process.argv.slice(2);
const make = impl === "uuid" ? () => v7() : () => uuidV7();
const n = Number(count);
// Every id goes into a checksum so that the loop is not optimised away.
let sum = 0;
for (let i = 0; i < n; i++) sum += make().charCodeAt(35);
process.stdout.write(`${impl} ${n} ${sum}\n`);
