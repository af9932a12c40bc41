package agent

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
)

// serve accepts connections on ln and hands them over.
func serve(t *testing.T, ln net.Listener) <-chan net.Conn {
	ch := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			ch <- c
		}
	}()
	return ch
}

func accept(t *testing.T, ch <-chan net.Conn) (net.Conn, uint64) {
	t.Helper()
	select {
	case c := <-ch:
		cookie, err := testnet.SocketCookie(c)
		if err != nil {
			t.Fatal(err)
		}
		return c, cookie
	case <-time.After(10 * time.Second):
		t.Fatal("no connection accepted")
	}
	return nil, 0
}

func listenIn(t *testing.T, h *testnet.Host) net.Listener {
	t.Helper()
	return listenAt(t, h, 0)
}

func listenAt(t *testing.T, h *testnet.Host, port int) net.Listener {
	t.Helper()
	ln, err := h.Listen("tcp", ":"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func port(ln net.Listener) int { return ln.Addr().(*net.TCPAddr).Port }

// TestEndToEnd follows real connections in a network namespace through the
// kernel probe and the agent to the subscriber that registered their
// listener: a client reset, a client FIN, and a cut link that ends in a
// retransmission timeout. An unrelated subscriber sees none of them, and
// the agent's per-port metrics agree with the kernel's own counters.
func TestEndToEnd(t *testing.T) {
	pair := testnet.NewPair(t)
	probe := probetest.Load(t, bpf.Options{})
	a := startAgent(t, Config{Source: probe})
	ctx := context.Background()

	// Ports outside the ephemeral range, used by no other test of this
	// package; every count below is of this test's namespace alone.
	lnA, lnB := listenAt(t, pair.Server, 24301), listenAt(t, pair.Server, 24302)
	subA, logA := subscribe(t, a, "a")
	subB, logB := subscribe(t, a, "b")
	regA, err := subA.Register(ctx, lnA.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	nsCookie, _ := pair.Server.NetNSCookie()
	if regA.NetNS != nsCookie || int(regA.Addr.Port()) != port(lnA) {
		t.Errorf("registered %+v, want netns %d port %d", regA, nsCookie, port(lnA))
	}
	if _, err := subB.Register(ctx, lnB.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	acceptA, acceptB := serve(t, lnA), serve(t, lnB)
	addrA := net.JoinHostPort(testnet.ServerAddr4.String(), strconv.Itoa(port(lnA)))
	addrB := net.JoinHostPort(testnet.ServerAddr4.String(), strconv.Itoa(port(lnB)))

	// The client resets.
	c1, err := pair.Client.Dial("tcp", addrA)
	if err != nil {
		t.Fatal(err)
	}
	_, rstCookie := accept(t, acceptA)
	c1.(*net.TCPConn).SetLinger(0)
	c1.Close()
	logA.wait(t, "peer reset", cookieKind(rstCookie, bpf.KindPeerReset))
	e := logA.wait(t, "closed", cookieKind(rstCookie, bpf.KindClosed))
	if bpf.Cause(e.Cause) != bpf.CausePeerReset || e.Listener != regA.Listener {
		t.Errorf("closed event %+v: want cause peer_reset on listener %d", e, regA.Listener)
	}

	// The client half-closes; then the server closes too.
	c2, err := pair.Client.Dial("tcp", addrA)
	if err != nil {
		t.Fatal(err)
	}
	s2, finCookie := accept(t, acceptA)
	c2.Close()
	logA.wait(t, "peer FIN", cookieKind(finCookie, bpf.KindPeerFIN))
	s2.Close()
	e = logA.wait(t, "closed", cookieKind(finCookie, bpf.KindClosed))
	if bpf.Cause(e.Cause) != bpf.CauseNormal {
		t.Errorf("closed event %+v: want cause normal", e)
	}

	// The link goes dead while the server sends: the kernel gives up
	// after TCP_USER_TIMEOUT.
	c3, err := pair.Client.Dial("tcp", addrA)
	if err != nil {
		t.Fatal(err)
	}
	defer c3.Close()
	s3, toCookie := accept(t, acceptA)
	testnet.SetUserTimeout(t, s3, 500*time.Millisecond)
	pair.Cut()
	s3.Write([]byte("are you still there?"))
	e = logA.wait(t, "timeout close", cookieKind(toCookie, bpf.KindClosed))
	// The cut drops the client's TCP traffic on its side: the server's
	// segments leave, go unanswered, are retransmitted, and the kernel
	// gives up at TCP_USER_TIMEOUT.
	if bpf.Cause(e.Cause) != bpf.CauseTimeout || e.Errno != int32(unix.ETIMEDOUT) || e.Retransmits == 0 {
		t.Errorf("closed event %+v: want cause timeout, ETIMEDOUT, retransmissions", e)
	}
	t.Logf("cut link closed with cause %s after %d retransmissions", bpf.Cause(e.Cause), e.Retransmits)
	pair.Restore()

	// The client's answers vanish (a blackhole route on its side): the
	// server retransmits until TCP_USER_TIMEOUT, a plain timeout.
	c5, err := pair.Client.Dial("tcp", addrA)
	if err != nil {
		t.Fatal(err)
	}
	defer c5.Close()
	s5, rtoCookie := accept(t, acceptA)
	testnet.SetUserTimeout(t, s5, 1500*time.Millisecond)
	if out, err := pair.Client.Exec(ctx, "ip", "route", "add", "blackhole", testnet.ServerAddr4.String()+"/32"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	s5.Write([]byte("hello?"))
	e = logA.wait(t, "retransmission timeout close", cookieKind(rtoCookie, bpf.KindClosed))
	if bpf.Cause(e.Cause) != bpf.CauseTimeout || e.Errno != int32(unix.ETIMEDOUT) || e.Retransmits == 0 {
		t.Errorf("closed event %+v: want cause timeout, ETIMEDOUT, retransmissions", e)
	}
	logA.wait(t, "retransmit", cookieKind(rtoCookie, bpf.KindRetransmit))
	pair.Client.Exec(ctx, "ip", "route", "del", "blackhole", testnet.ServerAddr4.String()+"/32")

	// B's own connection, then the check that B saw nothing of A's.
	c4, err := pair.Client.Dial("tcp", addrB)
	if err != nil {
		t.Fatal(err)
	}
	s4, bCookie := accept(t, acceptB)
	c4.Close()
	s4.Close()
	logB.wait(t, "B's closed", cookieKind(bCookie, bpf.KindClosed))
	for _, e := range logB.all() {
		if e.Cookie == rstCookie || e.Cookie == finCookie || e.Cookie == toCookie || e.Cookie == rtoCookie || int(e.Local.Port()) == port(lnA) {
			t.Errorf("subscriber B received an event of A's listener: %+v", e)
		}
	}
	for _, e := range logA.all() {
		if e.Cookie == bCookie {
			t.Errorf("subscriber A received an event of B's listener: %+v", e)
		}
	}

	// Per-port metrics against the namespace's own counters.
	scrape := scrapeMetrics(t, a)
	checkPromtool(t, scrape)
	nstat := nstatCounters(t, pair.Server)
	t.Logf("nstat in %s: %v", pair.Server.NS, nstat)
	pa, pb := strconv.Itoa(port(lnA)), strconv.Itoa(port(lnB))
	// Only this test's namespace: the probe sees the whole host.
	ns := strconv.FormatUint(uint64(probetest.NetNSInode(t, pair.Server)), 10)
	get := func(name string, labels ...string) float64 {
		if strings.HasPrefix(name, "hangup_connections_") {
			labels = append([]string{"netns", ns}, labels...)
		}
		return metricValue(t, scrape, name, labels...)
	}
	want := map[string]float64{
		`opened{port=A}`:            4,
		`closed{port=A,peer_reset}`: 1,
		`closed{port=A,timeouts}`:   2,
		`closed{port=A,normal}`:     1,
		`peer_resets{port=A}`:       1,
		`opened{port=B}`:            1,
		`closed{port=B,normal}`:     1,
	}
	got := map[string]float64{
		`opened{port=A}`:            get("hangup_connections_opened_total", "port", pa),
		`closed{port=A,peer_reset}`: get("hangup_connections_closed_total", "port", pa, "cause", "peer_reset"),
		`closed{port=A,timeouts}`:   get("hangup_connections_closed_total", "port", pa, "cause", "timeout"),
		`closed{port=A,normal}`:     get("hangup_connections_closed_total", "port", pa, "cause", "normal"),
		`peer_resets{port=A}`:       get("hangup_connections_peer_resets_total", "port", pa),
		`opened{port=B}`:            get("hangup_connections_opened_total", "port", pb),
		`closed{port=B,normal}`:     get("hangup_connections_closed_total", "port", pb, "cause", "normal"),
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("metric %s = %v, want %v", k, got[k], w)
		}
	}
	// The kernel's view of the same namespace: every abortive close from
	// ESTABLISHED or CLOSE_WAIT is an EstabReset (the peer's RST and the
	// timeout here), and the timeout is an AbortOnTimeout.
	var aborted, timeouts float64
	for _, p := range []string{pa, pb} {
		for _, c := range bpf.Causes() {
			v := get("hangup_connections_closed_total", "port", p, "cause", c.String())
			if c != bpf.CauseNormal {
				aborted += v
			}
			if c == bpf.CauseTimeout || c == bpf.CauseKeepaliveTimeout || c == bpf.CauseProbeTimeout {
				timeouts += v
			}
		}
	}
	if aborted != nstat["TcpEstabResets"] {
		t.Errorf("abortive closes in metrics %v, kernel TcpEstabResets %v", aborted, nstat["TcpEstabResets"])
	}
	if timeouts != nstat["TcpExtTCPAbortOnTimeout"] {
		t.Errorf("timeouts in metrics %v, kernel TcpExtTCPAbortOnTimeout %v", timeouts, nstat["TcpExtTCPAbortOnTimeout"])
	}
	if opened := get("hangup_connections_opened_total", "port", pa) + get("hangup_connections_opened_total", "port", pb); opened != nstat["TcpPassiveOpens"] {
		t.Errorf("opened in metrics %v, kernel TcpPassiveOpens %v", opened, nstat["TcpPassiveOpens"])
	}
	if v := get("hangup_connections_retransmissions_total", "port", pa); v == 0 {
		t.Errorf("no retransmissions counted on port %s", pa)
	}
	if segs := get("hangup_connections_retransmissions_total", "port", pa) + get("hangup_connections_retransmissions_total", "port", pb); segs != nstat["TcpRetransSegs"] {
		t.Errorf("retransmissions in metrics %v, kernel TcpRetransSegs %v", segs, nstat["TcpRetransSegs"])
	}
	if v := get("hangup_agent_subscribers"); v != 2 {
		t.Errorf("hangup_agent_subscribers = %v, want 2", v)
	}
}

// TestSeedExisting: a connection accepted before the agent (and its probe)
// started is found through sock_diag, and its later reset is reported, in
// the agent's own namespace (seeded at start) and in another one (seeded
// when its listener registers).
func TestSeedExisting(t *testing.T) {
	testnet.RequireRoot(t)
	t.Run("host namespace", func(t *testing.T) {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		client, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		server, cookie := accept(t, serve(t, ln))
		defer server.Close()

		probe := probetest.Load(t, bpf.Options{})
		a := startAgent(t, Config{Source: probe})
		c, log := subscribe(t, a, "seed")
		if _, err := c.Register(context.Background(), ln.(*net.TCPListener)); err != nil {
			t.Fatal(err)
		}
		client.(*net.TCPConn).SetLinger(0)
		client.Close()
		e := log.wait(t, "closed", cookieKind(cookie, bpf.KindClosed))
		if bpf.Cause(e.Cause) != bpf.CausePeerReset {
			t.Errorf("closed event %+v, want cause peer_reset", e)
		}
		if a.seeded.Load() == 0 {
			t.Error("nothing seeded")
		}
	})
	t.Run("other namespace", func(t *testing.T) {
		pair := testnet.NewPair(t)
		ln := listenIn(t, pair.Server)
		client, err := pair.Client.Dial("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), strconv.Itoa(port(ln))))
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		server, cookie := accept(t, serve(t, ln))
		defer server.Close()

		probe := probetest.Load(t, bpf.Options{})
		a := startAgent(t, Config{Source: probe})
		c, log := subscribe(t, a, "seed")
		if _, err := c.Register(context.Background(), ln.(*net.TCPListener)); err != nil {
			t.Fatal(err)
		}
		// Count nothing host-wide: the agent also seeds the host
		// namespace, where tests of other packages run in parallel.
		a.table.mu.Lock()
		k, ok := a.table.conns[cookie]
		a.table.mu.Unlock()
		if ns, _ := pair.Server.NetNSCookie(); !ok || k.netns != ns || int(k.port) != port(ln) {
			t.Errorf("connection %d not seeded from its namespace: %+v (found %v)", cookie, k, ok)
		}
		client.(*net.TCPConn).SetLinger(0)
		client.Close()
		e := log.wait(t, "closed", cookieKind(cookie, bpf.KindClosed))
		if bpf.Cause(e.Cause) != bpf.CausePeerReset {
			t.Errorf("closed event %+v, want cause peer_reset", e)
		}
	})
}

func scrapeMetrics(t *testing.T, a *Agent) []byte {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(a.Collector())
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError}).
		ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("scrape: %d %s", rec.Code, rec.Body)
	}
	return rec.Body.Bytes()
}

// checkPromtool pipes a scrape into promtool check metrics.
func checkPromtool(t *testing.T, scrape []byte) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		testnet.SkipOrFail(t, "promtool not installed: %v", err)
	}
	cmd := exec.Command(path, "check", "metrics")
	cmd.Stdin = bytes.NewReader(scrape)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s\nscrape:\n%s", err, out, scrape)
	}
}

// metricValue finds a sample by name and label pairs in a text scrape.
func metricValue(t *testing.T, scrape []byte, name string, labels ...string) float64 {
	t.Helper()
	sc := bufio.NewScanner(bytes.NewReader(scrape))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for i := 0; i+1 < len(labels); i += 2 {
			if !strings.Contains(line, labels[i]+`="`+labels[i+1]+`"`) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("parsing %q: %v", line, err)
		}
		return v
	}
	return 0
}

// nstatCounters reads a namespace's absolute SNMP counters.
func nstatCounters(t *testing.T, h *testnet.Host) map[string]float64 {
	t.Helper()
	if _, err := exec.LookPath("nstat"); err != nil {
		testnet.SkipOrFail(t, "nstat (iproute2) not installed: %v", err)
	}
	out, err := h.Exec(context.Background(), "nstat", "-az", "TcpEstabResets", "TcpExtTCPAbortOnTimeout", "TcpPassiveOpens", "TcpRetransSegs", "TcpOutRsts")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]float64{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && !strings.HasPrefix(f[0], "#") {
			v, _ := strconv.ParseFloat(f[1], 64)
			m[f[0]] = v
		}
	}
	return m
}

// TestSeedEveryNamespace: connections accepted in a network namespace
// before the agent started, with no subscriber ever registering their
// listener, are seeded at start and their later closes counted in that
// namespace's series.
func TestSeedEveryNamespace(t *testing.T) {
	pair := testnet.NewPair(t)
	ln := listenIn(t, pair.Server)
	addr := net.JoinHostPort(testnet.ServerAddr4.String(), strconv.Itoa(port(ln)))
	accepted := serve(t, ln)
	const n = 5
	var clients []net.Conn
	var cookies []uint64
	for range n {
		c, err := pair.Client.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, cookie := accept(t, accepted)
		clients = append(clients, c)
		cookies = append(cookies, cookie)
	}

	probe := probetest.Load(t, bpf.Options{})
	a := startAgent(t, Config{Source: probe})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		a.table.mu.Lock()
		found := 0
		for _, c := range cookies {
			if _, ok := a.table.conns[c]; ok {
				found++
			}
		}
		a.table.mu.Unlock()
		if found == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d connections seeded", found, n)
		}
	}
	for _, c := range clients {
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}
	ns := strconv.FormatUint(uint64(probetest.NetNSInode(t, pair.Server)), 10)
	p := strconv.Itoa(port(ln))
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		scrape := scrapeMetrics(t, a)
		got := metricValue(t, scrape, "hangup_connections_closed_total", "netns", ns, "port", p, "cause", "peer_reset")
		if got == n {
			if opened := metricValue(t, scrape, "hangup_connections_opened_total", "netns", ns, "port", p); opened != 0 {
				t.Errorf("seeded connections counted as opened: %v", opened)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("closed{netns=%s,port=%s,cause=peer_reset} = %v, want %d", ns, p, got, n)
		}
	}
}

// TestNetNSInfo: a namespace with per-port series is named by the process
// that listens in it.
func TestNetNSInfo(t *testing.T) {
	pair := testnet.NewPair(t)
	probe := probetest.Load(t, bpf.Options{})
	a := startAgent(t, Config{Source: probe, NoSeed: true})
	const p = 24331 // outside the ephemeral range, used by no other test
	cmd := exec.Command("ip", "netns", "exec", pair.Server.NS, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), listenEnv+"=:"+strconv.Itoa(p))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer stdin.Close()
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("server in the namespace: %q %v", line, err)
	}
	c, err := pair.Client.Dial("tcp4", net.JoinHostPort(testnet.ServerAddr4.String(), strconv.Itoa(p)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ns := strconv.FormatUint(uint64(probetest.NetNSInode(t, pair.Server)), 10)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		scrape := scrapeMetrics(t, a)
		if metricValue(t, scrape, "hangup_connections_opened_total", "netns", ns, "port", strconv.Itoa(p)) == 1 {
			want := filepath.Base(os.Args[0])
			if len(want) > 15 {
				want = want[:15] // comm's length
			}
			if v := metricValue(t, scrape, "hangup_netns_info", "netns", ns, "process", want); v != 1 {
				t.Errorf("no hangup_netns_info{netns=%q,process=%q} 1 in:\n%s", ns, want, grepLines(scrape, "hangup_netns_info"))
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the connection was not counted in its namespace")
		}
	}
}

func grepLines(scrape []byte, prefix string) string {
	var b strings.Builder
	for _, line := range strings.Split(string(scrape), "\n") {
		if strings.HasPrefix(line, prefix) {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}
