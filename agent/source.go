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
