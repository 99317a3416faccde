import { SchemaMigration } from "./schema-migration.js";

/**
 * Indexes for reading the audit log (AuditService.ListAuditEvents): newest first within a
 * tenant (keyset on `at`, `id`), and by actor, target and request id. The tenant's index
 * replaces the one on `tenant_id` alone, which it covers. Retention deletes by `at` (its
 * index stays).
 */
export class Migration20261204230000_audit_indexes extends SchemaMigration {
  override async up(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("audit_events", (t) => {
        t.dropIndex(["tenant_id"], "audit_events_tenant_id_index");
      }),
    );
    this.addSchema((schema) =>
      schema.alterTable("audit_events", (t) => {
        t.index(["tenant_id", "at", "id"], "audit_events_tenant_id_at_id_index");
        t.index(["actor_id", "at"], "audit_events_actor_id_at_index");
        t.index(["target_id", "at"], "audit_events_target_id_at_index");
        t.index(["request_id"], "audit_events_request_id_index");
      }),
    );
  }

  override async down(): Promise<void> {
    this.addSchema((schema) =>
      schema.alterTable("audit_events", (t) => {
        t.dropIndex(["request_id"], "audit_events_request_id_index");
        t.dropIndex(["target_id", "at"], "audit_events_target_id_at_index");
        t.dropIndex(["actor_id", "at"], "audit_events_actor_id_at_index");
        t.dropIndex(["tenant_id", "at", "id"], "audit_events_tenant_id_at_id_index");
      }),
    );
    this.addSchema((schema) =>
      schema.alterTable("audit_events", (t) => {
        t.index(["tenant_id"], "audit_events_tenant_id_index");
      }),
    );
  }
}
