import { type ContextValues, createContextKey } from "@connectrpc/connect";
import type { EntityManager } from "@mikro-orm/knex";

/** Context key of a call's EntityManager fork (unset until a handler asks for one). */
const requestEmKey = createContextKey<EntityManager | undefined>(undefined, {
  description: "tessera request EntityManager",
});

/**
 * The EntityManager of a handler's call over `root`: one fork per call, made on first use,
 * so a call that never touches the ORM (GetCurrentUser answers from the authentication
 * path's row) pays nothing for it, and every helper of one call shares its identity map.
 */
export function requestEms(root: EntityManager): (ctx: { values: ContextValues }) => EntityManager {
  return (ctx) => {
    let em = ctx.values.get(requestEmKey);
    if (em === undefined) {
      em = root.fork();
      ctx.values.set(requestEmKey, em);
    }
    return em;
  };
}
