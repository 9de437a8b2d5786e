// Every bound of the shutdown path, in one place. The execs' own grace is --shutdown-grace-ms
// (config.ts); these bound what comes after it, so that close() always resolves and the
// process exits within the grace plus SHUTDOWN_SLACK_MS.

// WebSockets told 1001 get this long for the close handshake, then are terminated. A client
// answers a close frame in one round trip; one that does not would otherwise hold the public
// listener open for ws's own 30 s close timeout.
export const WS_CLOSE_HANDSHAKE_MS = 500

// Supervisor connections sent GOAWAY get this long to close, then are destroyed. By then every
// session and relay on them has ended (the sessions phase comes first), so a healthy peer needs
// one round trip; a stopped or blackholed one would never answer.
export const SUPERVISOR_GOAWAY_MS = 300

// After its connections are destroyed, the supervisor listener reports closed within a turn or
// two of the event loop; the bound only keeps a lost callback from holding shutdown.
export const SUPERVISOR_LISTENER_CLOSE_MS = 200

// A supervisor session told to end (shutdown, a newer session, a revoked token) that does not
// go is cut off after this. Its last lines are a few hundred bytes; a peer that does not read
// them within two seconds is not going to.
export const SESSION_END_GRACE_MS = 2000

// The embedded SSH daemon: connections get this long to go away after the DISCONNECT, then are
// destroyed; the listener gets as long again to report closed. Together its published "~2 s".
export const EMBEDDED_SSHD_CLOSE_MS = 1000

// On SIGTERM/SIGINT the gateway exits within --shutdown-grace-ms plus this, or is exited with
// status 1. What follows the grace is bounded above: about 2.5 s at worst (the embedded
// daemon's two seconds, then the listeners' half second), so this leaves room for a loaded
// machine and no more.
export const SHUTDOWN_SLACK_MS = 5000

// On SIGTERM/SIGINT the supervisor agent stops within this, or is exited with status 1: it
// destroys its relays and its connection, then waits for the embedded daemon (~2 s).
export const SUPERVISOR_STOP_MS = 5000
