/**
 * The README walkthroughs (scripts under examples/) and the test that runs each against a fresh
 * server. test/readme-walkthroughs.test.ts checks that these lists are exactly the scripts the
 * README shows, so a walkthrough added to the README without a test run fails there.
 */

/** Run by test/examples.test.ts from the checkout, in this order, twice, on one server. */
export const SHELL_WALKTHROUGHS = [
  "examples/quick-start-curl.sh",
  "examples/quick-start-buf.sh",
  "examples/quick-start-cli.sh",
  "examples/tokens.sh",
  "examples/curl.sh",
  "examples/cli.sh",
  "examples/admin-token.sh",
  "examples/verify.sh",
  "examples/introspect.sh",
  "examples/oauth.sh",
  "examples/audit.sh",
] as const;

/** Run by test/sdk-package.test.ts from a project where only the packed @tessera/sdk (and grpc-js) is installed. */
export const PACKAGE_WALKTHROUGHS = [
  "examples/sdk-ts/quick-start.ts",
  "examples/sdk-esm/walkthrough.mjs",
  "examples/sdk-cjs/walkthrough.cjs",
  "examples/grpc-js/walkthrough.cjs",
  "examples/grpc-js/machine-user.cjs",
] as const;

/** Run by test/sdk-package.test.ts with Debian's /usr/bin/python3 (grpcio), beside the SDK's descriptor set. */
export const PYTHON_WALKTHROUGHS = ["examples/python/walkthrough.py"] as const;

/** Modules under examples/ that a walkthrough imports: not walkthroughs themselves, so not shown as one. */
export const WALKTHROUGH_MODULES = ["examples/python/tessera_user_api.py"] as const;
