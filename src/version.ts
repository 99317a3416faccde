/** The release of this build (reported by --version, health and server reflection). */
export const VERSION = "0.1.0";
