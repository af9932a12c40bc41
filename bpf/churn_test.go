//go:build linux

package bpf_test

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
)

// BenchmarkConnectionChurn opens and closes loopback connections in a test
// host's namespace, as fast as it can, without and with the probe loaded.
// ns/op is per connection; compare "probe" with "baseline" from the same
// run. With the probe it also reports the kernel's own average run time per
// hook invocation (BPF_ENABLE_STATS, on only for an untimed sample of 2000
// connections after the timed run), the events per connection, and lost
// events (ring-buffer reserve failures), which must stay 0.
func BenchmarkConnectionChurn(b *testing.B) {
	pair := testnet.NewPair(b)
	ln, err := pair.Server.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go acceptAndClose(ln)
	churn := func(b *testing.B) {
		b.SetParallelism(2)
		b.RunParallel(func(pb *testing.PB) {
			var c net.Conn
			err := pair.Server.Do(func() error {
				for pb.Next() {
					var err error
					if c, err = net.Dial("tcp4", ln.Addr().String()); err != nil {
						return err
					}
					c.Close()
				}
				return nil
			})
			if err != nil {
				b.Error(err)
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
	}
	// sample makes n connections, untimed, for the hook statistics.
	sample := func(n int) error {
		return pair.Server.Do(func() error {
			for range n {
				c, err := net.Dial("tcp4", ln.Addr().String())
				if err != nil {
					return err
				}
				c.Close()
			}
			return nil
		})
	}

	b.Run("baseline", churn)
	b.Run("probe", func(b *testing.B) { churnWithProbe(b, churn, sample, bpf.Options{}, nil) })
	// As the agent would run it: only watched ports' events wake the reader
	// (here none is watched).
	b.Run("probe_wake_watched", func(b *testing.B) { churnWithProbe(b, churn, sample, bpf.Options{WakeWatchedOnly: true}, nil) })
	// As an httpx server loads its own probe, its port watched: every
	// client's FIN wakes the reader, or (WakeBusyOnly) only those of
	// connections with a request in flight (here none).
	watch := func(b *testing.B, p *bpf.Probe) {
		ns, err := pair.Server.NetNSCookie()
		if err != nil {
			b.Fatal(err)
		}
		if err := p.Watch(ns, uint16(ln.Addr().(*net.TCPAddr).Port)); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("own_probe", func(b *testing.B) { churnWithProbe(b, churn, sample, bpf.Options{WatchedOnly: true}, watch) })
	b.Run("own_probe_wake_busy", func(b *testing.B) {
		churnWithProbe(b, churn, sample, bpf.Options{WatchedOnly: true, WakeBusyOnly: true}, watch)
	})
}

// churnWithProbe runs churn with the probe loaded, as a host runs it (the
// kernel's BPF statistics off: they cost two clock reads per hook run), then
// reports the kernel's run time per hook program from an untimed sample of
// connections made with the statistics on.
func churnWithProbe(b *testing.B, churn func(*testing.B), sample func(n int) error, opts bpf.Options, watch func(*testing.B, *bpf.Probe)) {
	p := probetest.Load(b, opts)
	if watch != nil {
		watch(b, p)
	}
	var (
		wg     sync.WaitGroup
		events atomic.Uint64
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		var e bpf.Event
		for {
			if err := p.ReadInto(&e); err != nil {
				if !errors.Is(err, bpf.ErrClosed) {
					b.Error(err)
				}
				return
			}
			events.Add(1)
		}
	}()
	b.ResetTimer()
	churn(b)
	b.StopTimer()

	stats, err := bpf.EnableStats()
	if err != nil {
		testnet.SkipOrFail(b, "BPF statistics unavailable: %v", err)
	}
	const sampled = 2000
	before, _ := p.HookStats()
	if err := sample(sampled); err != nil {
		b.Fatal(err)
	}
	after, err := p.HookStats()
	stats.Close()
	if err != nil {
		b.Fatal(err)
	}
	var runs uint64
	var runtime time.Duration
	for i, h := range after {
		n := h.RunCount - before[i].RunCount
		d := h.RunTime - before[i].RunTime
		runs += n
		runtime += d
		if n > 0 {
			b.ReportMetric(float64(d.Nanoseconds())/float64(n), "ns/run:"+h.Program)
		}
	}
	if runs > 0 {
		b.ReportMetric(float64(runtime.Nanoseconds())/float64(runs), "ns/hook-run")
		b.ReportMetric(float64(runtime.Nanoseconds())/sampled, "bpf-ns/conn")
	}
	st, err := p.Stats()
	if err != nil {
		b.Fatal(err)
	}
	for wait := time.Now().Add(5 * time.Second); events.Load() < st.Events && time.Now().Before(wait); {
		time.Sleep(time.Millisecond) // let the reader drain
	}
	p.Close()
	wg.Wait()
	b.ReportMetric(float64(events.Load())/float64(b.N+sampled), "events/conn")
	b.ReportMetric(float64(st.Lost), "lost")
	if st.Lost != 0 {
		b.Errorf("%d events lost", st.Lost)
	}
}

// acceptAndClose closes every connection ln accepts, until ln is closed.
func acceptAndClose(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}
