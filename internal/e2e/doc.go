// Package e2e holds end-to-end tests across processes and privilege
// boundaries: the real agent (hangupd, built from cmd/hangupd and run as
// root, holding the kernel probe) and an httpx server that runs as nobody
// with no capabilities in its own network namespace, connected to the
// agent only through its unix socket. The package has no code of its own;
// its tests need root, iproute2, nftables and util-linux's setpriv, and
// skip without them (or fail under HANGUP_REQUIRE_BPF=1).
package e2e
