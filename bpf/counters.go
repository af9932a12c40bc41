//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// PortCounters are the exact per-port counts kept in the kernel. They count
// what happened, whether or not the matching event reached userspace.
type PortCounters struct {
	Opened     uint64 // passive opens (handshakes completed)
	PeerFIN    uint64
	PeerReset  uint64
	LocalReset uint64
	// Retransmits counts successful retransmissions as the kernel makes
	// them, one skb (and one KindRetransmit event) each; an skb may carry
	// several segments (GSO/TSO).
	Retransmits uint64
	// RetransmittedSegments counts the segments of those retransmissions
	// (tcp_skb_pcount), as the kernel's TcpRetransSegs (nstat) does for a
	// namespace.
	RetransmittedSegments uint64
	Errors                uint64 // distinct socket errors reported
	// Closed counts closed connections by Cause (index CauseNone is unused).
	Closed [NumCauses]uint64
}

// ClosedTotal is the number of closed connections, whatever the cause.
func (c *PortCounters) ClosedTotal() uint64 {
	var n uint64
	for _, v := range c.Closed {
		n += v
	}
	return n
}

// Add adds o's counts to c, e.g. to sum ports under one label.
func (c *PortCounters) Add(o *PortCounters) {
	c.Opened += o.Opened
	c.PeerFIN += o.PeerFIN
	c.PeerReset += o.PeerReset
	c.LocalReset += o.LocalReset
	c.Retransmits += o.Retransmits
	c.RetransmittedSegments += o.RetransmittedSegments
	c.Errors += o.Errors
	for i := range c.Closed {
		c.Closed[i] += o.Closed[i]
	}
}

// add adds one CPU's counts, in the kernel's layout.
func (c *PortCounters) add(v *probeCounters) {
	c.Add(&PortCounters{
		Opened: v.Opened, PeerFIN: v.PeerFin, PeerReset: v.PeerReset, LocalReset: v.LocalReset,
		Retransmits: v.Retransmits, RetransmittedSegments: v.RetransSegs, Errors: v.Errors, Closed: v.Closed,
	})
}

// PortKey names a local port in one network namespace: the key of the
// kernel's counters, so that two containers' :8080 are never added up.
type PortKey struct {
	// NetNS is the network namespace's inode number, as lsns, `ip netns
	// identify` and the /proc/PID/ns/net link show it (net:[NetNS]). It is
	// not the namespace cookie that events carry in Event.NetNS.
	NetNS uint32
	Port  uint16
}

// PortCounters returns the counters of every (network namespace, local
// port) that has seen a tracked connection, summed over CPUs.
func (p *Probe) PortCounters() (map[PortKey]PortCounters, error) {
	out := make(map[PortKey]PortCounters)
	var (
		key    probePortKey
		perCPU []probeCounters
	)
	it := p.maps.PortStats.Iterate()
	for it.Next(&key, &perCPU) {
		var c PortCounters
		for i := range perCPU {
			c.add(&perCPU[i])
		}
		out[PortKey{NetNS: key.Netns, Port: key.Port}] = c
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading port counters: %w", err)
	}
	return out, nil
}

// Stats are the probe's own health counters.
type Stats struct {
	Events           uint64 // events written to the ring buffer
	Lost             uint64 // events dropped because the ring buffer was full
	TrackFull        uint64 // passive connections not tracked: MaxConnections reached
	PortsFull        uint64 // counter updates dropped: the (namespace, port) table's 65536 entries are full
	RetransmitFailed uint64 // failed retransmission attempts (not counted as retransmissions)
	// HookMisses counts hook runs the kernel skipped because the same
	// program was already running on that CPU (HookStats.Missed, summed).
	// The probe settles a close from more than one hook so that a skipped
	// run delays nothing, but a skipped count is lost. Linux 5.12+.
	HookMisses uint64
}

// Stats reads the probe's health counters, summed over CPUs.
func (p *Probe) Stats() (Stats, error) {
	var vals [probeStatSTAT_MAX]uint64
	for i := range vals {
		var perCPU []uint64
		if err := p.maps.Stats.Lookup(uint32(i), &perCPU); err != nil {
			return Stats{}, fmt.Errorf("reading probe stats: %w", err)
		}
		for _, v := range perCPU {
			vals[i] += v
		}
	}
	var misses uint64
	for _, prog := range p.progs {
		if st, err := prog.Stats(); err == nil {
			misses += st.RecursionMisses
		}
	}
	return Stats{
		HookMisses:       misses,
		Events:           vals[probeStatSTAT_EVENTS],
		Lost:             vals[probeStatSTAT_LOST],
		TrackFull:        vals[probeStatSTAT_TRACK_FULL],
		PortsFull:        vals[probeStatSTAT_PORTS_FULL],
		RetransmitFailed: vals[probeStatSTAT_RETRANS_FAILED],
	}, nil
}

// flagSeeded marks a connection inserted from userspace (F_SEEDED in probe.c).
const flagSeeded = 1 << 6

// Track starts tracking an established server connection that the probe did
// not see open (one that existed before Load, found through sock_diag).
// From then on it produces events like any other. Tracking a connection that
// is already tracked is not an error. A connection that closed before Track
// was called leaves an entry behind until Untrack removes it.
func (p *Probe) Track(cookie uint64, localPort uint16) error {
	c := probeConn{Lport: localPort, Flags: flagSeeded}
	err := p.maps.Conns.Update(cookie, &c, ebpf.UpdateNoExist)
	if err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
		return fmt.Errorf("tracking connection %d: %w", cookie, err)
	}
	return nil
}

// Untrack stops tracking a connection. Untracking an unknown cookie is not
// an error.
func (p *Probe) Untrack(cookie uint64) error {
	err := p.maps.Conns.Delete(cookie)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("untracking connection %d: %w", cookie, err)
	}
	return nil
}

// TrackedCookies calls fn with the cookie of every tracked connection until
// fn returns false.
func (p *Probe) TrackedCookies(fn func(cookie uint64) bool) error {
	var (
		cookie uint64
		c      probeConn
	)
	it := p.maps.Conns.Iterate()
	for it.Next(&cookie, &c) {
		if !fn(cookie) {
			return nil
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterating tracked connections: %w", err)
	}
	return nil
}

// HookStats is the kernel's run-time accounting of one hook's program.
type HookStats struct {
	Hook     string        // tracepoint name
	Program  string        // the program's name in probe.c (a tracepoint may have two)
	RunCount uint64        // invocations
	RunTime  time.Duration // total time spent in the program
	// Missed counts invocations the kernel skipped because the program
	// was already running on the same CPU (a softirq interrupting it):
	// events and counts of those invocations are lost.
	Missed uint64
}

// PerRun is the average time of one invocation (0 if it never ran).
func (h HookStats) PerRun() time.Duration {
	if h.RunCount == 0 {
		return 0
	}
	return h.RunTime / time.Duration(h.RunCount)
}

// HookStats reads each hook program's run count and run time. The kernel
// keeps them only while statistics are enabled: see EnableStats.
func (p *Probe) HookStats() ([]HookStats, error) {
	out := make([]HookStats, 0, len(p.progs))
	for i, prog := range p.progs {
		st, err := prog.Stats()
		if err != nil {
			return nil, fmt.Errorf("reading stats of %s: %w", p.hooks[i].program, err)
		}
		out = append(out, HookStats{Hook: p.hooks[i].tracepoint, Program: p.hooks[i].program, RunCount: st.RunCount, RunTime: st.Runtime, Missed: st.RecursionMisses})
	}
	return out, nil
}

// EnableStats turns on the kernel's BPF run-time statistics (as the
// kernel.bpf_stats_enabled sysctl does) until the returned closer is closed.
// They cost a few nanoseconds per invocation of every BPF program on the
// host, so enable them for measurements, not permanently.
func EnableStats() (io.Closer, error) {
	c, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, classify(fmt.Errorf("enabling BPF statistics: %w", err))
	}
	return c, nil
}
