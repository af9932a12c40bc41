// Package probetest loads the kernel probe for tests and records its events,
// so that a test can wait for the events of its own sockets.
package probetest

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/testnet"
)

// Load loads and attaches the probe, closing it when the test ends. When
// the probe cannot load for lack of privileges or kernel support, the test
// is skipped, or fails under HANGUP_REQUIRE_BPF=1. Any other error fails.
func Load(t testing.TB, opts bpf.Options) *bpf.Probe {
	t.Helper()
	return LoadWith(t, bpf.Load, opts)
}

// LoadWith is Load with another loader, such as one that picks other
// program variants.
func LoadWith(t testing.TB, load func(bpf.Options) (*bpf.Probe, error), opts bpf.Options) *bpf.Probe {
	t.Helper()
	p, err := load(opts)
	switch {
	case errors.Is(err, bpf.ErrPermission), errors.Is(err, bpf.ErrNotSupported):
		testnet.SkipOrFail(t, "cannot load the BPF probe: %v", err)
	case err != nil:
		t.Fatalf("loading the probe: %+v", err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("closing the probe: %v", err)
		}
	})
	return p
}

// Recorder reads a probe's events in the background and keeps those that
// pass its filter.
type Recorder struct {
	probe  *bpf.Probe
	mu     sync.Mutex
	cond   *sync.Cond
	events []bpf.Event
	err    error
	done   bool
}

// Record starts reading events from p until the test ends. Only events for
// which keep returns true are kept (nil keeps all): filter by network
// namespace cookie so that parallel tests never see each other's sockets.
func Record(t testing.TB, p *bpf.Probe, keep func(*bpf.Event) bool) *Recorder {
	r := &Recorder{probe: p}
	r.cond = sync.NewCond(&r.mu)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		var e bpf.Event
		for {
			err := p.ReadInto(&e)
			if err != nil {
				r.mu.Lock()
				if !errors.Is(err, bpf.ErrClosed) {
					r.err = err
				}
				r.done = true
				r.cond.Broadcast()
				r.mu.Unlock()
				return
			}
			if keep != nil && !keep(&e) {
				continue
			}
			r.mu.Lock()
			r.events = append(r.events, e)
			r.cond.Broadcast()
			r.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		p.Close()
		<-stopped
		if r.err != nil {
			t.Errorf("reading probe events: %v", r.err)
		}
	})
	return r
}

// InNetNS keeps the events of one network namespace.
func InNetNS(cookie uint64) func(*bpf.Event) bool {
	return func(e *bpf.Event) bool { return e.NetNS == cookie }
}

// Wait blocks until an event satisfies match and returns it, or fails the
// test after timeout listing what was seen.
func (r *Recorder) Wait(t testing.TB, timeout time.Duration, what string, match func(*bpf.Event) bool) bpf.Event {
	t.Helper()
	e, ok := r.WaitFor(timeout, match)
	if !ok {
		st, err := r.probe.Stats()
		hs, _ := r.probe.HookStats()
		t.Fatalf("no %s event within %s (probe stats %+v %v, hooks %+v); seen:\n%s", what, timeout, st, err, hs, r.Dump())
	}
	return e
}

// WaitFor is Wait without a test: it reports whether the event came.
func (r *Recorder) WaitFor(timeout time.Duration, match func(*bpf.Event) bool) (bpf.Event, bool) {
	deadline := time.Now().Add(timeout)
	timer := time.AfterFunc(timeout, func() {
		r.mu.Lock()
		r.cond.Broadcast()
		r.mu.Unlock()
	})
	defer timer.Stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		for i := range r.events {
			if match(&r.events[i]) {
				return r.events[i], true
			}
		}
		if r.done || !time.Now().Before(deadline) {
			return bpf.Event{}, false
		}
		r.cond.Wait()
	}
}

// Events returns a copy of the kept events that satisfy match (all if nil).
func (r *Recorder) Events(match func(*bpf.Event) bool) []bpf.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []bpf.Event
	for i := range r.events {
		if match == nil || match(&r.events[i]) {
			out = append(out, r.events[i])
		}
	}
	return out
}

// Dump formats the kept events, one a line, for failure messages.
func (r *Recorder) Dump() string {
	var b strings.Builder
	for _, e := range r.Events(nil) {
		fmt.Fprintf(&b, "  %s\n", e.String())
	}
	if b.Len() == 0 {
		return "  (none)\n"
	}
	return b.String()
}

// Cookie matches the events of one socket and kind.
func Cookie(cookie uint64, kind bpf.Kind) func(*bpf.Event) bool {
	return func(e *bpf.Event) bool { return e.Cookie == cookie && e.Kind == kind }
}

// NetNSInode returns the inode number of a test host's network namespace,
// the namespace half of the probe's counter keys (bpf.PortKey.NetNS).
func NetNSInode(t testing.TB, h *testnet.Host) uint32 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat("/run/netns/"+h.NS, &st); err != nil {
		t.Fatalf("namespace %s: %v", h.NS, err)
	}
	return uint32(st.Ino)
}

// Port is the counter key of a port in a test host's namespace.
func Port(t testing.TB, h *testnet.Host, port uint16) bpf.PortKey {
	t.Helper()
	return bpf.PortKey{NetNS: NetNSInode(t, h), Port: port}
}

// WaitCounters polls the probe's counters of one (namespace, port) until ok
// accepts them and returns them, or fails the test after 10 seconds.
func WaitCounters(t testing.TB, p *bpf.Probe, key bpf.PortKey, ok func(bpf.PortCounters) bool) bpf.PortCounters {
	t.Helper()
	var got bpf.PortCounters
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		counters, err := p.PortCounters()
		if err != nil {
			t.Fatal(err)
		}
		if got = counters[key]; ok(got) {
			return got
		}
	}
	t.Fatalf("counters of port %d in netns %d: %+v", key.Port, key.NetNS, got)
	return got
}
