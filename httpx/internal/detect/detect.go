// Package detect is the seam between httpx and the detection sources that
// live outside it: a source reports, per socket cookie, that a client has
// gone and why, and knows nothing of requests. The in-process kernel probe
// (package httpx/bpfsource) registers itself here, so that a server that
// does not import it never links cilium/ebpf.
package detect

import (
	"log/slog"
	"sync"
	"syscall"
	"time"
)

// Kind is what a source says about a connection.
type Kind uint8

// Kinds, from the connection's point of view.
const (
	PeerFIN          Kind = iota + 1 // the client half-closed (FIN)
	PeerReset                        // the client reset (RST)
	Timeout                          // unacknowledged data or zero-window probes timed out
	KeepaliveTimeout                 // keepalive probes went unanswered
	Error                            // another socket error ended the connection
)

// Sink receives a source's reports. at is when the kernel saw it (zero:
// unknown).
type Sink interface {
	Deliver(cookie uint64, k Kind, at time.Time)
}

// Source is a started detection source that works from socket cookies.
type Source interface {
	// WatchPort asks for the events of connections accepted on a local
	// port in a network namespace (SO_NETNS_COOKIE); it is called once per
	// pair, before the first connection of the pair is looked up.
	WatchPort(netnsCookie uint64, port uint16) error
	// Close stops the source; nothing is delivered after it returns.
	Close() error
}

// Tracker is a Source that can be told of a connection it may have missed.
// The kernel skips a probe run that would nest in another run of the same
// program on a CPU, so a passive open is, rarely, never seen; httpx tells
// the source of each connection whose request lives long enough to need
// drop detection (a cost per long request, not per connection).
type Tracker interface {
	// Track makes sure the connection with this socket cookie, accepted
	// on local port port, is tracked; tracking it twice is no error.
	Track(cookie uint64, port uint16) error
}

// Busier is a Source that wakes its reader at once for a client-gone event
// only while the connection has a request in flight (bpf.Probe.BusyWord):
// httpx adds 1 to the connection's word when a request starts and
// subtracts 1 when it ends. A start that finds BusyPending set in the old
// value clears it and asks the socket: an event may wait for the reader's
// next poll.
type Busier interface {
	BusyWord(cookie uint64) *uint64
}

// BusyPending is bpf.BusyPending (a test in httpx/bpfsource checks it).
const BusyPending = 1 << 63

// BPFOptions configures the in-process probe (see bpf.Options).
type BPFOptions struct {
	RingBufferSize int
	MaxConnections int
	FlushInterval  time.Duration
}

// StartFunc starts a source that delivers to sink.
type StartFunc func(opts BPFOptions, sink Sink, log *slog.Logger) (Source, error)

var (
	mu  sync.Mutex
	bpf StartFunc
)

// RegisterBPF makes the in-process probe available; httpx/bpfsource calls
// it from its init function.
func RegisterBPF(f StartFunc) {
	mu.Lock()
	defer mu.Unlock()
	bpf = f
}

// BPF returns the registered in-process probe, or nil.
func BPF() StartFunc {
	mu.Lock()
	defer mu.Unlock()
	return bpf
}

// Probe event kinds and close causes as the kernel probe numbers them (bpf
// package; the agent relays them unchanged). A test in httpx/bpfsource
// checks them against package bpf.
const (
	ProbeKindPeerFIN   = 2
	ProbeKindPeerReset = 3
	ProbeKindError     = 5
	ProbeKindClosed    = 7

	ProbeCausePeerReset        = 2
	ProbeCauseTimeout          = 4
	ProbeCauseKeepaliveTimeout = 5
	ProbeCauseProbeTimeout     = 6
	ProbeCauseError            = 7
)

// FromProbe maps what the kernel probe reports about a connection (event
// kind, close cause, socket error) to a Kind. Timeouts are taken from the
// closed event, which follows the error event at once and tells a
// keepalive timeout from a retransmission timeout.
func FromProbe(kind, cause uint8, errno syscall.Errno) (Kind, bool) {
	switch kind {
	case ProbeKindPeerFIN:
		return PeerFIN, true
	case ProbeKindPeerReset:
		return PeerReset, true
	case ProbeKindClosed:
		switch cause {
		case ProbeCausePeerReset:
			return PeerReset, true
		case ProbeCauseTimeout, ProbeCauseProbeTimeout:
			return Timeout, true
		case ProbeCauseKeepaliveTimeout:
			return KeepaliveTimeout, true
		case ProbeCauseError:
			return Error, true
		}
	case ProbeKindError:
		if errno == syscall.ECONNRESET {
			return PeerReset, true
		}
	}
	return 0, false
}
