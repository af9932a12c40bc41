package agent

import "github.com/hangup-io/hangup/bpf"

// Source is where the agent's events and exact counts come from. *bpf.Probe
// implements it; the agent sees only decoded Go values, never cilium/ebpf.
type Source interface {
	// ReadInto blocks until the next event; after Close it returns an
	// error matching bpf.ErrClosed.
	ReadInto(e *bpf.Event) error
	// PortCounters returns the exact kernel counts per (network
	// namespace, local port).
	PortCounters() (map[bpf.PortKey]bpf.PortCounters, error)
	// Stats returns the probe's health counters.
	Stats() (bpf.Stats, error)
	// Track starts tracking a connection that existed before the probe.
	Track(cookie uint64, localPort uint16) error
	// Untrack stops tracking a connection.
	Untrack(cookie uint64) error
	// TrackedCookies calls fn with every connection the probe tracks,
	// until fn returns false.
	TrackedCookies(fn func(cookie uint64) bool) error
	// Close ends ReadInto.
	Close() error
}

var _ Source = (*bpf.Probe)(nil)

// watcher is implemented by a probe that can wake the agent at once for
// the client-gone events of some ports only (bpf.Options.WakeWatchedOnly):
// the agent watches the ports of its subscribers' listeners, whose events
// a server waits for; the rest wait for the probe's next poll, which the
// metrics do not mind.
type watcher interface {
	Watch(netnsCookie uint64, port uint16) error
	Unwatch(netnsCookie uint64, port uint16) error
}

var _ watcher = (*bpf.Probe)(nil)
