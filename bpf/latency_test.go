//go:build linux

package bpf_test

import (
	"errors"
	"net"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
)

// BenchmarkDetectionLatency measures how long a client-gone event waits
// between the kernel hook (the event's CLOCK_MONOTONIC timestamp) and the
// return of ReadInto in a reader that blocks for it, with the connection's
// own "opened" record still unread, as in a server that reacts to aborts.
// One connection per iteration, across a veth pair; it reports the median
// and the 90th percentile in microseconds.
func BenchmarkDetectionLatency(b *testing.B) {
	for _, tc := range []struct {
		name  string
		kind  bpf.Kind
		abort func(net.Conn) error
	}{
		{"peer_reset", bpf.KindPeerReset, func(c net.Conn) error {
			if err := c.(*net.TCPConn).SetLinger(0); err != nil {
				return err
			}
			return c.Close()
		}},
		{"peer_fin", bpf.KindPeerFIN, func(c net.Conn) error { return c.(*net.TCPConn).CloseWrite() }},
	} {
		b.Run(tc.name, func(b *testing.B) { benchLatency(b, tc.kind, tc.abort) })
	}
}

func benchLatency(b *testing.B, kind bpf.Kind, abort func(net.Conn) error) {
	pair := testnet.NewPair(b)
	p := probetest.Load(b, bpf.Options{})
	ns, err := pair.Server.NetNSCookie()
	if err != nil {
		b.Fatal(err)
	}
	ln, err := pair.Server.Listen("tcp4", testnet.ServerAddr4.String()+":0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()

	type seen struct {
		cookie  uint64
		latency time.Duration
	}
	got := make(chan seen, 64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		var e bpf.Event
		for {
			if err := p.ReadInto(&e); err != nil {
				if !errors.Is(err, bpf.ErrClosed) {
					b.Error(err)
				}
				return
			}
			now := monotonic()
			if e.NetNS == ns && e.Kind == kind {
				got <- seen{e.Cookie, now - e.Mono}
			}
		}
	}()
	defer func() { p.Close(); <-done }()

	lat := make([]time.Duration, 0, b.N)
	for b.Loop() {
		cc, err := pair.Client.Dial("tcp4", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		sc, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		cookie, err := testnet.SocketCookie(sc)
		if err != nil {
			b.Fatal(err)
		}
		if err := abort(cc); err != nil {
			b.Fatal(err)
		}
		timeout := time.After(5 * time.Second)
	wait:
		for {
			select {
			case s := <-got:
				if s.cookie == cookie {
					lat = append(lat, s.latency)
					break wait
				}
			case <-timeout:
				b.Fatalf("no %s event for cookie %d", kind, cookie)
			}
		}
		cc.Close()
		sc.Close()
	}
	slices.Sort(lat)
	us := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))]) / float64(time.Microsecond) }
	b.ReportMetric(us(0.5), "p50-µs")
	b.ReportMetric(us(0.9), "p90-µs")
}

// monotonic is CLOCK_MONOTONIC, the clock of Event.Mono.
func monotonic() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}
