//go:build linux

package bpf_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
)

// TestRetransmittedSegmentsMatchKernel: on a lossy link, the probe's count
// of retransmitted segments equals the kernel's TcpRetransSegs for the
// server's namespace, which holds only this test's connection.
func TestRetransmittedSegmentsMatchKernel(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	before := retransSegs(t, e.pair.Server)
	c := e.connect(t, "tcp4", testnet.ServerAddr4, 0)
	// The client loses one TCP segment in eight on the way in.
	for _, args := range [][]string{
		{"add", "table", "inet", "hangup_lossy"},
		{"add", "chain", "inet", "hangup_lossy", "in", "{ type filter hook prerouting priority -300; policy accept; }"},
		{"add", "rule", "inet", "hangup_lossy", "in", "meta", "l4proto", "tcp", "numgen", "random", "mod", "8", "==", "0", "drop"},
	} {
		if _, err := e.pair.Client.Exec(ctx, "nft", args...); err != nil {
			testnet.SkipOrFail(t, "a lossy link needs nft: %v", err)
		}
	}
	const size = 4 << 20
	go func() {
		c.server.Write(make([]byte, size))
		c.server.Close()
	}()
	c.client.SetReadDeadline(time.Now().Add(60 * time.Second))
	if n, err := io.Copy(io.Discard, c.client); err != nil || n != size {
		t.Fatalf("client read %d bytes: %v", n, err)
	}
	e.rec.Wait(t, 30*time.Second, "closed", probetest.Cookie(c.cookie, bpf.KindClosed))
	kernel := retransSegs(t, e.pair.Server) - before
	key := probetest.Port(t, e.pair.Server, uint16(c.server.LocalAddr().(*net.TCPAddr).Port))
	got := probetest.WaitCounters(t, e.probe, key, func(pc bpf.PortCounters) bool { return pc.ClosedTotal() == 1 })
	t.Logf("kernel TcpRetransSegs %d; probe: %d segments in %d retransmissions", kernel, got.RetransmittedSegments, got.Retransmits)
	if kernel == 0 {
		t.Fatal("no retransmissions on the lossy link")
	}
	if got.RetransmittedSegments != kernel {
		t.Errorf("probe counted %d retransmitted segments, the kernel %d", got.RetransmittedSegments, kernel)
	}
}

// retransSegs reads Tcp RetransSegs from /proc/net/snmp in a host's namespace.
func retransSegs(t *testing.T, h *testnet.Host) uint64 {
	t.Helper()
	out, err := h.Exec(t.Context(), "cat", "/proc/net/snmp")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || fields[0] != "Tcp:" {
			continue
		}
		if names == nil {
			names = fields
			continue
		}
		for i, name := range names {
			if name == "RetransSegs" && i < len(fields) {
				v, err := strconv.ParseUint(fields[i], 10, 64)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
		}
	}
	t.Fatal(fmt.Errorf("no Tcp RetransSegs in /proc/net/snmp:\n%s", out))
	return 0
}
