package agent

import (
	"net/netip"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
)

// benchAgent is an agent without a socket: the pipeline only, with one
// subscriber whose listener matches every event and whose queue a
// goroutine drains.
func benchAgent(b *testing.B) (*Agent, *subscriber, func()) {
	a := &Agent{
		cfg:    Config{QueueLen: 1 << 16},
		table:  newTable(),
		routes: newRoutes(),
		subs:   map[*subscriber]struct{}{},
	}
	s := &subscriber{a: a, id: 1, queue: make(chan wire.Event, 1<<16)}
	l := a.routes.add(s, listenerInfo{netns: 1, addr: netip.MustParseAddrPort("0.0.0.0:8080")})
	s.listeners = append(s.listeners, l)
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-s.queue:
			case <-done:
				return
			}
		}
	}()
	return a, s, func() { close(done); <-stopped }
}

// BenchmarkPipeline100kClosed feeds 100k connections (opened, peer reset,
// closed) per op through the connection table and the subscriber path.
func BenchmarkPipeline100kClosed(b *testing.B) {
	a, s, stop := benchAgent(b)
	defer stop()
	local := netip.MustParseAddrPort("10.0.0.1:8080")
	remote := netip.MustParseAddrPort("10.0.0.2:50000")
	now := time.Now()
	var e bpf.Event
	b.ReportAllocs()
	cpu0 := cpuTime()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for c := range uint64(100_000) {
			cookie := uint64(i)<<32 | c
			e = bpf.Event{Kind: bpf.KindOpened, Cookie: cookie, NetNS: 1, Local: local, Remote: remote, Time: now}
			a.handle(&e)
			e.Kind = bpf.KindPeerReset
			a.handle(&e)
			e.Kind, e.Cause = bpf.KindClosed, bpf.CausePeerReset
			a.handle(&e)
		}
	}
	b.StopTimer()
	// Process CPU time includes the goroutine draining the queue, as the
	// agent's writer would.
	b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/float64(b.N)/1e6, "cpu-ms/100k-conns")
	b.Logf("delivered %d, dropped %d", 3*100_000*b.N-int(s.dropped.Load()), s.dropped.Load())
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkTableMemory reports the agent's memory per tracked connection.
func BenchmarkTableMemory(b *testing.B) {
	const n = 100_000
	local := netip.MustParseAddrPort("10.0.0.1:8080")
	var perConn float64
	for i := 0; i < b.N; i++ {
		t := newTable()
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		e := bpf.Event{Kind: bpf.KindOpened, NetNS: 1, Local: local}
		for c := range uint64(n) {
			e.Cookie = c
			t.observe(&e)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		perConn = float64(after.HeapAlloc-before.HeapAlloc) / n
		runtime.KeepAlive(t)
	}
	b.ReportMetric(perConn, "bytes/conn")
}

// wire repeats the probe's kind and cause values; they must agree.
func TestWireConstants(t *testing.T) {
	pairs := [][2]uint8{
		{wire.KindOpened, uint8(bpf.KindOpened)}, {wire.KindPeerFIN, uint8(bpf.KindPeerFIN)},
		{wire.KindPeerReset, uint8(bpf.KindPeerReset)}, {wire.KindLocalReset, uint8(bpf.KindLocalReset)},
		{wire.KindError, uint8(bpf.KindError)}, {wire.KindRetransmit, uint8(bpf.KindRetransmit)},
		{wire.KindClosed, uint8(bpf.KindClosed)},
		{wire.CauseNormal, uint8(bpf.CauseNormal)}, {wire.CausePeerReset, uint8(bpf.CausePeerReset)},
		{wire.CauseLocalReset, uint8(bpf.CauseLocalReset)}, {wire.CauseTimeout, uint8(bpf.CauseTimeout)},
		{wire.CauseKeepaliveTimeout, uint8(bpf.CauseKeepaliveTimeout)},
		{wire.CauseProbeTimeout, uint8(bpf.CauseProbeTimeout)}, {wire.CauseError, uint8(bpf.CauseError)},
	}
	for i, p := range pairs {
		if p[0] != p[1] {
			t.Errorf("constant %d: wire %d, bpf %d", i, p[0], p[1])
		}
	}
}
