/**
 * Protecting a service of your own with Tessera (`import … from "@tessera/sdk/server"`):
 * a Connect interceptor and a plain Node middleware on one core. The one barrel of the
 * subpath; everything public is named here.
 */

export type { TesseraLogger } from "../logger.js";
export {
  TESSERA_ERROR_DOMAIN,
  TesseraAuthError,
  type TesseraAuthReason,
  toConnectError,
} from "./errors.js";
export { createTesseraAuthInterceptor, ruleOf, type TesseraAuthInterceptor } from "./interceptor.js";
export type { JwtVerifyMode } from "./jwt-paths.js";
export {
  createTesseraAuthMiddleware,
  principalOf,
  type TesseraAuthMiddleware,
  type TesseraMiddlewareOptions,
  type TesseraMiddlewareRequest,
  type TesseraMiddlewareResponse,
} from "./middleware.js";
export { JWT_ALGORITHMS, type JwtAlgorithm } from "./offline-jwt.js";
export {
  clientAddressKey,
  clientCertificateKey,
  clientCertificateThumbprint,
  type TesseraPrincipal,
  tesseraContextValues,
  tesseraPrincipalKey,
} from "./principal.js";
export type { RevocationWatchStats } from "./revocation-watch.js";
export type { StreamHold } from "./stream-holds.js";
export {
  createTesseraAuth,
  type TesseraAuth,
  type TesseraAuthOptions,
  type TesseraAuthStats,
} from "./tessera-auth.js";
export type { DownstreamRule } from "./verdicts.js";
