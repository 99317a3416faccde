import type { MigrationObject } from "@mikro-orm/core";
import { Migration20261123000000_foundation } from "./Migration20261123000000_foundation.js";
import { Migration20261123100000_tokens } from "./Migration20261123100000_tokens.js";
import { Migration20261123110000_machine_users } from "./Migration20261123110000_machine_users.js";
import { Migration20261204200000_sessions } from "./Migration20261204200000_sessions.js";
import { Migration20261204213000_usernames_per_tenant } from "./Migration20261204213000_usernames_per_tenant.js";
import { Migration20261204230000_audit_indexes } from "./Migration20261204230000_audit_indexes.js";
import { Migration20261204230000_proven_bindings } from "./Migration20261204230000_proven_bindings.js";
import { Migration20261204230000_signing_key_schedule } from "./Migration20261204230000_signing_key_schedule.js";
import { Migration20261204230000_state_notify } from "./Migration20261204230000_state_notify.js";
import { Migration20261205010000_verified_digests } from "./Migration20261205010000_verified_digests.js";
import { Migration20261205030000_notify_always } from "./Migration20261205030000_notify_always.js";
import { Migration20261205100000_revocation_events } from "./Migration20261205100000_revocation_events.js";
import { Migration20261206020000_binder_authority } from "./Migration20261206020000_binder_authority.js";
import { Migration20261206050000_token_lineage } from "./Migration20261206050000_token_lineage.js";
import { Migration20261206060000_session_prune_indexes } from "./Migration20261206060000_session_prune_indexes.js";
import { Migration20261206070000_audit_actor_outside } from "./Migration20261206070000_audit_actor_outside.js";
import { Migration20261206080000_truncate_resets } from "./Migration20261206080000_truncate_resets.js";
import { Migration20261207120000_machine_tokens_revoked_before } from "./Migration20261207120000_machine_tokens_revoked_before.js";
import { Migration20261207130000_revocation_tokens_revoked_before } from "./Migration20261207130000_revocation_tokens_revoked_before.js";

/**
 * Every migration, in order. Listed explicitly (not discovered by glob) so the same
 * list works from TypeScript sources, compiled output and the packed package.
 * Append new migrations at the end; never edit one that has shipped.
 */
export const MIGRATIONS: MigrationObject[] = [
  { name: "Migration20261123000000_foundation", class: Migration20261123000000_foundation },
  { name: "Migration20261123100000_tokens", class: Migration20261123100000_tokens },
  { name: "Migration20261123110000_machine_users", class: Migration20261123110000_machine_users },
  { name: "Migration20261204200000_sessions", class: Migration20261204200000_sessions },
  {
    name: "Migration20261204213000_usernames_per_tenant",
    class: Migration20261204213000_usernames_per_tenant,
  },
  { name: "Migration20261204230000_audit_indexes", class: Migration20261204230000_audit_indexes },
  { name: "Migration20261204230000_proven_bindings", class: Migration20261204230000_proven_bindings },
  {
    name: "Migration20261204230000_signing_key_schedule",
    class: Migration20261204230000_signing_key_schedule,
  },
  { name: "Migration20261204230000_state_notify", class: Migration20261204230000_state_notify },
  { name: "Migration20261205010000_verified_digests", class: Migration20261205010000_verified_digests },
  { name: "Migration20261205030000_notify_always", class: Migration20261205030000_notify_always },
  {
    name: "Migration20261205100000_revocation_events",
    class: Migration20261205100000_revocation_events,
  },
  { name: "Migration20261206020000_binder_authority", class: Migration20261206020000_binder_authority },
  { name: "Migration20261206050000_token_lineage", class: Migration20261206050000_token_lineage },
  {
    name: "Migration20261206060000_session_prune_indexes",
    class: Migration20261206060000_session_prune_indexes,
  },
  {
    name: "Migration20261206070000_audit_actor_outside",
    class: Migration20261206070000_audit_actor_outside,
  },
  { name: "Migration20261206080000_truncate_resets", class: Migration20261206080000_truncate_resets },
  {
    name: "Migration20261207120000_machine_tokens_revoked_before",
    class: Migration20261207120000_machine_tokens_revoked_before,
  },
  {
    name: "Migration20261207130000_revocation_tokens_revoked_before",
    class: Migration20261207130000_revocation_tokens_revoked_before,
  },
];
