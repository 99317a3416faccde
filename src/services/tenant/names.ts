import { errors } from "../../errors.js";

/** Names of tenants, applications and machine users: 1-200 characters, no control characters, no outer spaces. */
export function assertDisplayName(name: string, field = "name"): void {
  if (!name) throw errors.invalidArgument(`${field} is required`, field);
  if (name.length > 200) throw errors.invalidArgument(`${field} must be at most 200 characters`, field);
  if (name.trim() !== name)
    throw errors.invalidArgument(`${field} must not start or end with white space`, field);
  // biome-ignore lint/suspicious/noControlCharactersInRegex: refusing control characters is the point
  if (/[\u0000-\u001f\u007f]/.test(name))
    throw errors.invalidArgument(`${field} must not contain control characters`, field);
}
