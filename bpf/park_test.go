//go:build linux

package bpf_test

import (
	"net"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
)

// TestParkedReaderWakesForRoutineRecords: a parked reader (one that waits
// with no deadline) is woken by routine records too, which otherwise wait
// for its next poll: with a poll interval of an hour, each connection's
// opened record is read at once.
func TestParkedReaderWakesForRoutineRecords(t *testing.T) {
	pair := testnet.NewPair(t)
	p := probetest.Load(t, bpf.Options{FlushInterval: time.Hour})
	bpf.ParkWhenEmpty(p)
	ns, err := pair.Server.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	rec := probetest.Record(t, p, probetest.InNetNS(ns))
	ln, err := pair.Server.Listen("tcp4", testnet.ServerAddr4.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for range 5 {
		cc, sc, cookie := connect(t, pair, ln)
		defer cc.Close()
		defer sc.Close()
		rec.Wait(t, 5*time.Second, "opened", probetest.Cookie(cookie, bpf.KindOpened))
	}
}

// TestReaderParksWhenIdle: once a whole poll interval brought nothing, the
// reader parks instead of polling on, and parks again after a connection's
// records woke it. The probe sees the whole host, so the test waits for
// quiet intervals, which any host has within seconds.
func TestReaderParksWhenIdle(t *testing.T) {
	pair := testnet.NewPair(t)
	p := probetest.Load(t, bpf.Options{FlushInterval: 20 * time.Millisecond})
	ns, err := pair.Server.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	rec := probetest.Record(t, p, probetest.InNetNS(ns))
	waitParked := func() {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !bpf.Parked(p) {
			if time.Now().After(deadline) {
				t.Fatal("the reader did not park in 30s of 20ms poll intervals")
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	waitParked()
	ln, err := pair.Server.Listen("tcp4", testnet.ServerAddr4.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cookie := resetByClient(t, pair, ln)
	rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(cookie, bpf.KindClosed))
	waitParked()
}

// TestParkedReaderMissesNoWakeup: a reader that parks at every empty ring
// is woken for every record, also for one that lands between finding the
// ring empty and waiting. The look at the ring must come after the
// poller's read began: the read begins by clearing a wakeup the poller
// latched, so one that came after an earlier look was lost, and the parked
// reader waited for the next record (a benchmark hung for 9 minutes on it).
func TestParkedReaderMissesNoWakeup(t *testing.T) {
	pair := testnet.NewPair(t)
	p := probetest.Load(t, bpf.Options{FlushInterval: time.Hour})
	bpf.ParkWhenEmpty(p)
	ns, err := pair.Server.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	// Widen the window between finding the ring empty and waiting, where
	// records now often land.
	bpf.BeforeWait(p, func() { time.Sleep(time.Millisecond) })
	rec := probetest.Record(t, p, probetest.InNetNS(ns))
	ln, err := pair.Server.Listen("tcp4", testnet.ServerAddr4.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const n = 300
	for i := range n {
		cc, sc, cookie := connect(t, pair, ln)
		cc.(*net.TCPConn).SetLinger(0)
		cc.Close()
		_, ok := rec.WaitFor(10*time.Second, probetest.Cookie(cookie, bpf.KindPeerReset))
		sc.Close()
		if !ok {
			t.Fatalf("connection %d: its reset was not read in 10s (a lost wakeup)", i)
		}
	}
}
