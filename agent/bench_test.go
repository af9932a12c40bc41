package agent

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/wire"
)

// benchSubscriberEnv names the agent socket to the benchmark's subscriber
// process (the test binary run again, see TestMain).
const benchSubscriberEnv = "HANGUP_BENCH_SUBSCRIBER"

// sentinel is the cookie of the event that ends a benchmark subscriber.
const sentinel = ^uint64(0)

// benchSubscriber is a server in a process of its own: it registers a
// listener with the agent, says "ready PORT", counts the events it gets
// and, at the sentinel, says "done EVENTS DROPPED" and leaves.
func benchSubscriber(path string) error {
	var n, dropped atomic.Uint64
	end := make(chan struct{})
	var once sync.Once
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := wire.Dial(ctx, path, wire.ClientConfig{
		Name: "bench",
		OnEvent: func(e wire.Event) {
			if e.Cookie == sentinel {
				once.Do(func() { close(end) })
				return
			}
			n.Add(1)
		},
		OnDropped: func(d wire.Dropped) { dropped.Store(d.Total) },
	})
	if err != nil {
		return err
	}
	defer c.Close()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	if _, err := c.Register(ctx, ln.(*net.TCPListener)); err != nil {
		return err
	}
	fmt.Printf("ready %d\n", ln.Addr().(*net.TCPAddr).Port)
	select {
	case <-end:
	case <-c.Done():
		return c.Err()
	}
	fmt.Printf("done %d %d\n", n.Load(), dropped.Load())
	return nil
}

// noBacklog hides the fake source's Buffered: the agent then cannot tell
// that more events wait, as with a source that does not say.
type noBacklog struct{ *fakeSource }

func (noBacklog) Buffered() {} // not backlogSource's method: shadows it

// BenchmarkAgent100kClosed measures the agent's CPU time per 100k closed
// connections (opened, peer reset, closed: two of the three events say the
// client is gone) on the whole path: the pipeline, the subscriber's queue,
// the socket writes, with a subscriber in another process reading every
// event, so that the process's CPU time is the agent's alone. "backlog":
// the source says when more events wait (as a ring buffer can), so writes
// are batched; "no-backlog": it does not, and each urgent event is written
// at once.
func BenchmarkAgent100kClosed(b *testing.B) {
	for _, mode := range []string{"backlog", "no-backlog"} {
		b.Run(mode, func(b *testing.B) {
			fs := newFakeSource()
			var src Source = fs
			if mode == "no-backlog" {
				src = noBacklog{fs}
			}
			a := startAgent(b, Config{Source: src, NoSeed: true, QueueLen: 1 << 16, Logger: slog.New(slog.DiscardHandler)})
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), benchSubscriberEnv+"="+a.SocketPath())
			cmd.Stderr = os.Stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				b.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			defer cmd.Wait()
			lines := bufio.NewScanner(out)
			var port uint16
			if !lines.Scan() {
				b.Fatalf("subscriber: %v", lines.Err())
			}
			if _, err := fmt.Sscanf(lines.Text(), "ready %d", &port); err != nil {
				b.Fatalf("subscriber said %q: %v", lines.Text(), err)
			}
			ns, err := currentNetNSCookie()
			if err != nil {
				b.Fatal(err)
			}
			local := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
			remote := netip.MustParseAddrPort("127.0.0.1:50000")
			now := time.Now()
			b.ReportAllocs()
			cpu0 := cpuTime()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for c := range uint64(100_000) {
					e := bpf.Event{Kind: bpf.KindOpened, Cookie: uint64(i)<<32 | c, NetNS: ns, Local: local, Remote: remote, Time: now}
					fs.ch <- e
					e.Kind = bpf.KindPeerReset
					fs.ch <- e
					e.Kind, e.Cause = bpf.KindClosed, bpf.CausePeerReset
					fs.ch <- e
				}
			}
			// The sentinel is sent until it arrives: a full queue may drop it.
			stopSentinel := make(chan struct{})
			go func() {
				t := time.NewTicker(50 * time.Millisecond)
				defer t.Stop()
				for {
					select {
					case fs.ch <- bpf.Event{Kind: bpf.KindPeerReset, Cookie: sentinel, NetNS: ns, Local: local, Remote: remote}:
					case <-stopSentinel:
						return
					}
					select {
					case <-t.C:
					case <-stopSentinel:
						return
					}
				}
			}()
			scanned := lines.Scan()
			close(stopSentinel)
			if !scanned {
				b.Fatalf("subscriber: %v", lines.Err())
			}
			b.StopTimer()
			cpu := cpuTime() - cpu0
			var got, dropped uint64
			fmt.Sscanf(lines.Text(), "done %d %d", &got, &dropped)
			b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/100k-conns")
			b.ReportMetric(float64(dropped), "dropped")
			b.Logf("%s: %d events sent, %d received, %d dropped, agent CPU %v", mode, 3*100_000*b.N, got, dropped, cpu)
		})
	}
}

// BenchmarkDeliveryLatency measures the time from an event leaving the
// source to the subscriber's OnEvent (both in this process, CLOCK_MONOTONIC):
// the pipeline, the write, the wakeup of the client's reader.
func BenchmarkDeliveryLatency(b *testing.B) {
	src := newFakeSource()
	a := startAgent(b, Config{Source: src, NoSeed: true, Logger: slog.New(slog.DiscardHandler)})
	got := make(chan time.Duration, 1)
	ctx := context.Background()
	c, err := wire.Dial(ctx, a.SocketPath(), wire.ClientConfig{
		OnEvent: func(e wire.Event) { got <- monoNow() - time.Duration(e.MonoNs) },
	})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	if _, err := c.Register(ctx, ln.(*net.TCPListener)); err != nil {
		b.Fatal(err)
	}
	ns, _ := currentNetNSCookie()
	local := ln.Addr().(*net.TCPAddr).AddrPort()
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		src.ch <- bpf.Event{Kind: bpf.KindPeerReset, Cookie: uint64(i + 1), NetNS: ns, Local: local, Mono: monoNow()}
		lat = append(lat, <-got)
	}
	b.StopTimer()
	reportLatency(b, lat)
}

// BenchmarkKernelToSubscriber measures, with the real probe, the time from
// the kernel's event (a client's RST, in a network namespace) to the
// subscriber's OnEvent through the agent: the probe's wakeup, the ring
// buffer, the agent, the socket.
func BenchmarkKernelToSubscriber(b *testing.B) {
	pair := testnet.NewPair(b)
	probe := &timedSource{Probe: probetest.Load(b, bpf.Options{})}
	a := startAgent(b, Config{Source: probe, NoSeed: true, Logger: slog.New(slog.DiscardHandler)})
	resets := make(chan wire.Event, 16)
	ctx := context.Background()
	c, err := wire.Dial(ctx, a.SocketPath(), wire.ClientConfig{OnEvent: func(e wire.Event) {
		if e.Kind == wire.KindPeerReset {
			e.MonoNs = uint64(monoNow()) - e.MonoNs // latency, measured here
			resets <- e
		}
	}})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ln, err := pair.Server.Listen("tcp4", ":0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	if _, err := c.Register(ctx, ln.(*net.TCPListener)); err != nil {
		b.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- conn
		}
	}()
	addr := net.JoinHostPort(testnet.ServerAddr4.String(), strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		cl, err := pair.Client.Dial("tcp4", addr)
		if err != nil {
			b.Fatal(err)
		}
		srv := <-accepted
		cookie, err := testnet.SocketCookie(srv)
		if err != nil {
			b.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond) // the opened event is read: an idle agent
		b.StartTimer()
		cl.(*net.TCPConn).SetLinger(0)
		cl.Close()
		for e := range resets {
			if e.Cookie == cookie {
				lat = append(lat, time.Duration(e.MonoNs))
				break
			}
		}
		srv.Close()
	}
	b.StopTimer()
	reportLatency(b, lat)
	probe.mu.Lock()
	slices.Sort(probe.lat)
	if n := len(probe.lat); n > 0 {
		b.ReportMetric(float64(probe.lat[n/2].Nanoseconds())/1e3, "probe-p50-µs")
	}
	probe.mu.Unlock()
}

// timedSource is the probe, timing the kernel-to-ReadInto part of each
// peer reset's path: the probe's own share of the latency.
type timedSource struct {
	*bpf.Probe
	mu  sync.Mutex
	lat []time.Duration
}

func (s *timedSource) ReadInto(e *bpf.Event) error {
	err := s.Probe.ReadInto(e)
	if err == nil && e.Kind == bpf.KindPeerReset {
		d := monoNow() - e.Mono
		s.mu.Lock()
		s.lat = append(s.lat, d)
		s.mu.Unlock()
	}
	return err
}

func reportLatency(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Nanoseconds()) / 1e3 }
	b.ReportMetric(q(0.5), "p50-µs")
	b.ReportMetric(q(0.9), "p90-µs")
	b.ReportMetric(q(0.99), "p99-µs")
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
