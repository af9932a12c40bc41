//go:build linux

package bpf_test

import (
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
)

// TestWakeBusyOnly: with WakeBusyOnly, a client-gone event of a connection
// whose busy word counts no request leaves BusyPending in the word (it
// went out without a wakeup); one whose word counts a request leaves the
// word alone. Either event is written.
func TestWakeBusyOnly(t *testing.T) {
	pair := testnet.NewPair(t)
	p := probetest.Load(t, bpf.Options{WatchedOnly: true, WakeBusyOnly: true})
	if p.BusyWord(1) == nil {
		t.Fatal("BusyWord is nil with WakeBusyOnly")
	}
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
	if err := p.Watch(ns, uint16(ln.Addr().(*net.TCPAddr).Port)); err != nil {
		t.Fatal(err)
	}
	for _, busy := range []bool{false, true} {
		cc, sc, cookie := connect(t, pair, ln)
		word := p.BusyWord(cookie)
		// The word is the slot's: clear what earlier connections left.
		atomic.StoreUint64(word, 0)
		if busy {
			atomic.AddUint64(word, 1)
		}
		if err := cc.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		rec.Wait(t, 5*time.Second, "peer_fin", probetest.Cookie(cookie, bpf.KindPeerFIN))
		got := atomic.LoadUint64(word)
		switch {
		case busy && got != 1:
			t.Errorf("busy connection: word %#x after its FIN, want 1 (no pending mark)", got)
		case !busy && got != bpf.BusyPending:
			t.Errorf("idle connection: word %#x after its FIN, want BusyPending", got)
		}
		cc.Close()
		sc.Close()
	}
	if other := probetest.Load(t, bpf.Options{}); other.BusyWord(1) != nil {
		t.Error("BusyWord is not nil without WakeBusyOnly")
	}
}
