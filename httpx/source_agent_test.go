package httpx

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
	"github.com/hangup-io/hangup/internal/wire"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// Agent source tests. The agent is the real hangupd, built from
// cmd/hangupd and run as a separate process that holds the kernel probe;
// killing it is a SIGKILL. The server runs in the test process (as root,
// for the network namespaces), with its source forced to SourceAgent and
// loading the probe in-process made a test failure: everything it learns
// comes from the agent over the unix socket.

// agentProc is a running hangupd.
type agentProc struct {
	cmd    *exec.Cmd
	out    *testutil.Buffer
	exited chan struct{}
}

// agentSocketPath returns a short socket path in a fresh directory (unix
// socket paths are limited to 108 bytes).
func agentSocketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "hx")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s")
}

// startHangupd runs the agent on sock until it is killed or the test ends,
// and waits until it answers. It skips (or fails under HANGUP_REQUIRE_BPF=1)
// when the probe cannot load.
func startHangupd(t *testing.T, sock string) *agentProc {
	t.Helper()
	testnet.RequireRoot(t)
	bin := testutil.BuildHangupd(t)
	p := &agentProc{out: &testutil.Buffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, "--socket.path", sock, "--web.listen-address", "127.0.0.1:0", "--log.level", "debug")
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.kill()
		t.Logf("hangupd (pid %d) log:\n%s", p.cmd.Process.Pid, p.out)
	})
	deadline := time.Now().Add(wait)
	for {
		select {
		case <-p.exited:
			out := p.out.String()
			if strings.Contains(out, "operation not permitted") || strings.Contains(out, "not supported") {
				testnet.SkipOrFail(t, "hangupd cannot load the probe:\n%s", out)
			}
			t.Fatalf("hangupd exited:\n%s", out)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := wire.Dial(ctx, sock, wire.ClientConfig{Name: "test-ready"})
		cancel()
		if err == nil {
			c.Close()
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("hangupd does not answer on %s: %v\n%s", sock, err, p.out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill ends the agent with SIGKILL: no goodbye to its subscribers, a stale
// socket file left behind.
func (p *agentProc) kill() {
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Kill()
	<-p.exited
}

// noProbeInProcess makes the test fail if the Monitor loads the probe.
func noProbeInProcess(t *testing.T) {
	failBPF(t, func() { t.Error("httpx loaded the kernel probe in-process") })
}

func agentOf(t *testing.T, m *Monitor) *agentSource {
	t.Helper()
	s, ok := m.src.(*agentSource)
	if !ok {
		t.Fatalf("source %T, want the agent source", m.src)
	}
	return s
}

// registered counts the listeners the agent took in the current session.
func (s *agentSource) registered() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.regs)
}

// onEpoll reports whether c is watched by the epoll fallback rather than
// by the agent.
func (s *agentSource) onEpoll(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.conns[c]
	return !ok || c.agent.epoll
}

// sourceGauge returns the source hangup_http_detection_source says is in
// use.
func sourceGauge(t *testing.T, m *Monitor) Source {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var in []Source
	for _, f := range mfs {
		if f.GetName() != "hangup_http_detection_source" {
			continue
		}
		for _, mt := range f.GetMetric() {
			if mt.GetGauge().GetValue() == 1 {
				in = append(in, Source(mt.GetLabel()[0].GetValue()))
			}
		}
	}
	if len(in) != 1 {
		t.Fatalf("detection_source gauges at 1: %v", in)
	}
	return in[0]
}

// agentRequest is what agentHandler reports.
type agentRequest struct {
	path string
	c    *conn
	result
}

// agentHandler reports its connection when it starts, then waits for its
// context (or the generous bound) and reports what it saw.
func agentHandler(started, results chan<- agentRequest) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		st := FromContext(r.Context())
		started <- agentRequest{path: r.URL.Path, c: st.c}
		woke := "timer"
		select {
		case <-r.Context().Done():
			woke = "ctx"
		case <-time.After(wait):
		}
		results <- agentRequest{path: r.URL.Path, result: result{
			status: st.Status(), reason: st.AbortReason(), cause: context.Cause(r.Context()), woke: woke,
		}}
	}
}

// agentServer starts a monitored server on the pair's server host, its
// listener passed to the agent at sock, and waits until the agent took it.
func agentServer(t *testing.T, pair *testnet.Pair, sock string, log *slog.Logger, h http.Handler) (*Monitor, *testServer) {
	t.Helper()
	noProbeInProcess(t)
	m := newMonitor(t, Options{Source: SourceAgent, AgentSocket: sock, DropTimeout: 2 * time.Second, Logger: log})
	ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	ts := serve(t, m, m.Listener(ln), h, nil)
	src := agentOf(t, m)
	eventually(t, "the agent registered the listener", func() bool { return src.registered() == 1 })
	return m, ts
}

// TestAgentDetect: a server whose only source is the agent gets its
// requests ABORTED with the right reason when the client resets, half-closes
// (both with the request body unread, where net/http never notices) or
// vanishes (a cut link, turned into a keepalive timeout by the 2s drop
// timeout). The connections are never on epoll: the agent alone tells.
func TestAgentDetect(t *testing.T) {
	sock := agentSocketPath(t)
	startHangupd(t, sock)
	for _, tc := range []struct {
		how  string
		want Reason
	}{
		{"rst", ReasonPeerReset},
		{"fin", ReasonPeerFIN},
		{"cut", ReasonKeepaliveTimeout},
	} {
		t.Run(tc.how, func(t *testing.T) {
			started, results := make(chan agentRequest, 1), make(chan agentRequest, 1)
			pair := testnet.NewPair(t)
			m, ts := agentServer(t, pair, sock, nil, agentHandler(started, results))
			src := agentOf(t, m)
			c, err := pair.Client.Dial("tcp", ts.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if tc.how == "cut" {
				rawGet(t, c, "/think") // complete: the handler idles on the socket
			} else {
				rawRequest(t, c, "/upload") // most of the body never comes
			}
			req := waitFor(t, started, "handler")
			if src.onEpoll(req.c) || m.Source() != SourceAgent {
				t.Fatalf("connection on epoll (source %s), want it covered by the agent", m.Source())
			}
			switch tc.how {
			case "rst":
				reset(t, c)
			case "fin":
				if err := c.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatal(err)
				}
			case "cut":
				pair.Cut()
			}
			res := waitFor(t, results, "handler result")
			if res.woke != "ctx" || res.status != StatusAborted || res.reason != tc.want || !errors.Is(res.cause, ErrAborted) {
				t.Errorf("got %+v, want ABORTED %s before the handler's wait ended", res.result, tc.want)
			}
			if n := m.Stats().Aborts[tc.want]; n != 1 {
				t.Errorf("aborts{reason=%s} = %d, want 1", tc.want, n)
			}
			if g := sourceGauge(t, m); g != SourceAgent {
				t.Errorf("detection_source gauge says %s", g)
			}
		})
	}
}

// TestAgentRestart: the agent is killed while two long requests run and
// started again. While it is away epoll watches both connections (the
// first client resets then, and its request is marked); after the restart
// the new agent finds the second connection (sock_diag) when the listener
// is registered again, covers it, and marks its request when its client
// half-closes. Each switch is logged once and shown by the source metric.
func TestAgentRestart(t *testing.T) {
	lo, hi := agentRetryMin, agentRetryMax
	t.Cleanup(func() { agentRetryMin, agentRetryMax = lo, hi }) // after the Monitor's
	agentRetryMin, agentRetryMax = 50*time.Millisecond, 500*time.Millisecond

	sock := agentSocketPath(t)
	ag := startHangupd(t, sock)
	pair := testnet.NewPair(t)
	logs := &testutil.Buffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	started, results := make(chan agentRequest, 2), make(chan agentRequest, 2)
	m, ts := agentServer(t, pair, sock, log, agentHandler(started, results))
	src := agentOf(t, m)
	defer func() {
		if t.Failed() {
			t.Logf("httpx log:\n%s", logs)
		}
	}()

	conns := map[string]*conn{}
	clients := map[string]net.Conn{}
	for _, path := range []string{"/gap", "/after"} {
		c, err := pair.Client.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		rawRequest(t, c, path) // long: the body never comes
		req := waitFor(t, started, "handler "+path)
		conns[req.path], clients[req.path] = req.c, c
	}
	for path, c := range conns {
		if src.onEpoll(c) {
			t.Fatalf("%s on epoll before the agent went away", path)
		}
	}

	ag.kill()
	eventually(t, "the switch to epoll", func() bool {
		return m.Source() == SourceEpoll && src.onEpoll(conns["/gap"]) && src.onEpoll(conns["/after"])
	})
	if g := sourceGauge(t, m); g != SourceEpoll {
		t.Errorf("detection_source gauge says %s while the agent is away", g)
	}

	// During the gap: epoll covers the request.
	reset(t, clients["/gap"])
	res := waitFor(t, results, "the /gap result")
	if res.path != "/gap" || res.woke != "ctx" || res.status != StatusAborted || res.reason != ReasonPeerReset {
		t.Errorf("during the gap: got %s %+v, want /gap ABORTED peer_reset", res.path, res.result)
	}

	// After the restart: the new agent covers the request still running.
	startHangupd(t, sock)
	eventually(t, "the switch back to the agent", func() bool {
		return m.Source() == SourceAgent && src.registered() == 1 && !src.onEpoll(conns["/after"])
	})
	if g := sourceGauge(t, m); g != SourceAgent {
		t.Errorf("detection_source gauge says %s after the agent returned", g)
	}
	if err := clients["/after"].(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	res = waitFor(t, results, "the /after result")
	if res.path != "/after" || res.woke != "ctx" || res.status != StatusAborted || res.reason != ReasonPeerFIN {
		t.Errorf("after the restart: got %s %+v, want /after ABORTED peer_fin", res.path, res.result)
	}

	out := logs.String()
	if n := strings.Count(out, "lost the agent"); n != 1 || !strings.Contains(out, "err=") {
		t.Errorf("%d 'lost the agent' lines (want 1, with err)", n)
	}
	if n := strings.Count(out, "agent is back"); n != 1 {
		t.Errorf("%d 'agent is back' lines, want 1", n)
	}
}

// staleSocket leaves a socket file nobody listens on, as a killed agent
// does.
func staleSocket(t *testing.T) string {
	t.Helper()
	path := agentSocketPath(t)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	return path
}

// TestAgentUnreachableAtStart: SourceAuto tries the agent only when its
// socket exists, and falls back loudly (bpf, then epoll) when the agent
// does not answer; an explicit SourceAgent starts on epoll and keeps
// trying. No privileges needed.
func TestAgentUnreachableAtStart(t *testing.T) {
	failBPF(t, nil)
	newLogged := func(opts Options) (*Monitor, string) {
		var buf testutil.Buffer
		opts.Logger = slog.New(slog.NewTextHandler(&buf, nil))
		m, err := New(opts)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		return m, buf.String()
	}

	t.Run("auto, stale socket", func(t *testing.T) {
		m, log := newLogged(Options{AgentSocket: staleSocket(t)})
		if m.Source() != SourceEpoll || !strings.Contains(log, "level=WARN") ||
			!strings.Contains(log, "source=agent fallback=bpf") || !strings.Contains(log, "source=bpf fallback=epoll") ||
			!strings.Contains(log, "err=") {
			t.Errorf("source %s, log:\n%s", m.Source(), log)
		}
	})
	t.Run("auto, no socket", func(t *testing.T) {
		m, log := newLogged(Options{AgentSocket: filepath.Join(t.TempDir(), "none")})
		if m.Source() != SourceEpoll || strings.Contains(log, "source=agent") {
			t.Errorf("source %s, log:\n%s", m.Source(), log)
		}
	})
	t.Run("explicit", func(t *testing.T) {
		var buf testutil.Buffer
		m, err := New(Options{Source: SourceAgent, AgentSocket: staleSocket(t), Logger: slog.New(slog.NewTextHandler(&buf, nil))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() }) // after serve's cleanup
		if _, ok := m.src.(*agentSource); !ok || m.Source() != SourceEpoll || !strings.Contains(buf.String(), "agent unreachable") {
			t.Fatalf("source %T %s, log:\n%s", m.src, m.Source(), buf.String())
		}
		// Connections are watched (by epoll) meanwhile.
		started, results := make(chan struct{}, 1), make(chan result, 1)
		ln := m.Listener(loopback(t))
		if _, ok := ln.(*agentListener); !ok {
			t.Errorf("Listener returned %T", ln)
		}
		ts := serve(t, m, ln, waitingHandler(started, results), nil)
		c, err := net.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		rawRequest(t, c, "/")
		waitFor(t, started, "handler")
		reset(t, c)
		if res := waitFor(t, results, "result"); res.status != StatusAborted || res.reason != ReasonPeerReset {
			t.Errorf("got %+v, want ABORTED peer_reset", res)
		}
	})
	t.Run("other sources", func(t *testing.T) {
		m := newMonitor(t, Options{Source: SourceEpoll})
		ln := loopback(t)
		defer ln.Close()
		if m.Listener(ln) != ln {
			t.Error("Listener wrapped a listener without the agent source")
		}
	})
}

// fakeAgent speaks the agent's side of the protocol on a unix socket, with
// no kernel probe: the test decides which events it sends, when the
// session ends and whether the agent answers at all. It needs no
// privileges, so the switching logic is tested everywhere.
type fakeAgent struct {
	path   string
	ln     *net.UnixListener
	down   atomic.Bool // refuse new sessions (a dead agent)
	refuse atomic.Bool // refuse listeners (as at the agent's limit)
	regs   atomic.Int32

	mu   sync.Mutex
	sess *wire.Conn
	wg   sync.WaitGroup
}

func startFakeAgent(t *testing.T) *fakeAgent {
	t.Helper()
	fa := &fakeAgent{path: agentSocketPath(t)}
	var err error
	fa.ln, err = net.ListenUnix("unixpacket", &net.UnixAddr{Name: fa.path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	fa.wg.Add(1)
	go fa.accept()
	t.Cleanup(func() {
		fa.ln.Close()
		fa.kill()
		fa.wg.Wait()
	})
	return fa
}

func (fa *fakeAgent) accept() {
	defer fa.wg.Done()
	for {
		uc, err := fa.ln.AcceptUnix()
		if err != nil {
			return
		}
		if fa.down.Load() {
			uc.Close()
			continue
		}
		c := wire.NewConn(uc)
		fa.mu.Lock()
		fa.sess = c
		fa.mu.Unlock()
		fa.wg.Add(1)
		go fa.session(c)
	}
}

func (fa *fakeAgent) session(c *wire.Conn) {
	defer fa.wg.Done()
	defer c.Close()
	var f wire.Frame
	fd, err := c.ReadFrame(&f)
	if fd >= 0 {
		unix.Close(fd)
	}
	if err != nil || f.Type != wire.TypeHello {
		return
	}
	if c.WriteFrame(&wire.Frame{Type: wire.TypeWelcome, Welcome: wire.Welcome{MaxListeners: 64, QueueLen: 64}}, -1) != nil {
		return
	}
	for {
		fd, err := c.ReadFrame(&f)
		if err != nil {
			return
		}
		if f.Type != wire.TypeRegister || fd < 0 {
			if fd >= 0 {
				unix.Close(fd)
			}
			continue
		}
		reply := wire.Frame{Type: wire.TypeError, Error: wire.Error{Code: wire.CodeLimit, Request: f.Register.Request, Message: "too many listeners"}}
		if !fa.refuse.Load() {
			ns, _ := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
			sa, _ := unix.Getsockname(fd)
			var addr netip.AddrPort
			if sa4, ok := sa.(*unix.SockaddrInet4); ok {
				addr = netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), uint16(sa4.Port))
			}
			reply = wire.Frame{Type: wire.TypeRegistered, Registered: wire.Registered{
				Request: f.Register.Request, Listener: uint32(fa.regs.Add(1)), NetNS: ns, Addr: addr,
			}}
		}
		unix.Close(fd)
		c.WriteFrame(&reply, -1)
	}
}

// send writes a frame to the current session.
func (fa *fakeAgent) send(t *testing.T, f wire.Frame) {
	t.Helper()
	fa.mu.Lock()
	defer fa.mu.Unlock()
	if fa.sess == nil {
		t.Fatal("no session")
	}
	if err := fa.sess.WriteFrame(&f, -1); err != nil {
		t.Fatal(err)
	}
}

// kill ends the current session, as a dying agent does.
func (fa *fakeAgent) kill() {
	fa.mu.Lock()
	defer fa.mu.Unlock()
	if fa.sess != nil {
		fa.sess.Close()
		fa.sess = nil
	}
}

// TestAgentSwitching drives the agent source with a fake agent, without
// privileges: events mark requests with the probe's reasons; a drop notice
// makes the source ask the sockets themselves; when the agent goes away,
// epoll takes over every connection, and when it returns the listener is
// registered again and the connections handed back; a listener the agent
// refuses keeps its connections on epoll.
func TestAgentSwitching(t *testing.T) {
	lo, hi := agentRetryMin, agentRetryMax
	t.Cleanup(func() { agentRetryMin, agentRetryMax = lo, hi }) // after the Monitor's
	agentRetryMin, agentRetryMax = 20*time.Millisecond, 200*time.Millisecond

	fa := startFakeAgent(t)
	logs := &testutil.Buffer{}
	m := newMonitor(t, Options{Source: SourceAgent, AgentSocket: fa.path, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	src := agentOf(t, m)
	defer func() {
		if t.Failed() {
			t.Logf("httpx log:\n%s", logs)
		}
	}()
	started, results := make(chan agentRequest, 8), make(chan agentRequest, 8)
	ts := serve(t, m, m.Listener(loopback(t)), agentHandler(started, results), nil)
	eventually(t, "the listener registered", func() bool { return src.registered() == 1 })

	request := func(addr, path string) (net.Conn, *conn) {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		rawRequest(t, c, path) // the body never comes
		req := waitFor(t, started, "handler "+path)
		if req.path != path {
			t.Fatalf("handler %s started, want %s", req.path, path)
		}
		return c, req.c
	}
	expect := func(path string, want Reason) {
		t.Helper()
		res := waitFor(t, results, path+" result")
		if res.path != path || res.woke != "ctx" || res.status != StatusAborted || res.reason != want {
			t.Errorf("got %s %+v, want %s ABORTED %s", res.path, res.result, path, want)
		}
	}

	// An event from the agent marks the request, with the probe's reason.
	_, c := request(ts.addr, "/event")
	if src.onEpoll(c) {
		t.Fatal("connection on epoll with the agent up")
	}
	fa.send(t, wire.Frame{Type: wire.TypeEvent, Event: wire.Event{Listener: 1, Cookie: c.cookie, Kind: wire.KindClosed, Cause: wire.CauseTimeout}})
	expect("/event", ReasonTimeout)

	// The agent lost events: the source asks the sockets, and finds a
	// reset the agent never reported.
	client, droppedConn := request(ts.addr, "/dropped")
	if src.onEpoll(droppedConn) {
		t.Fatal("connection on epoll with the agent up")
	}
	reset(t, client)
	for done := false; !done; {
		fa.send(t, wire.Frame{Type: wire.TypeDropped, Dropped: wire.Dropped{Count: 1, Total: 1}})
		select {
		case res := <-results:
			results <- res
			done = true
		case <-time.After(100 * time.Millisecond):
		}
	}
	expect("/dropped", ReasonPeerReset)

	// The agent goes away: epoll takes every connection over.
	gap, gapConn := request(ts.addr, "/gap")
	_, afterConn := request(ts.addr, "/after")
	fa.down.Store(true)
	fa.kill()
	eventually(t, "the switch to epoll", func() bool {
		return m.Source() == SourceEpoll && src.onEpoll(gapConn) && src.onEpoll(afterConn)
	})
	reset(t, gap)
	expect("/gap", ReasonPeerReset)

	// It returns: the listener is registered again, the connection handed
	// back, and the agent's event marks it.
	fa.down.Store(false)
	eventually(t, "the switch back", func() bool {
		return m.Source() == SourceAgent && src.registered() == 1 && !src.onEpoll(afterConn)
	})
	if n := fa.regs.Load(); n != 2 {
		t.Errorf("%d registrations, want 2 (one per session)", n)
	}
	fa.send(t, wire.Frame{Type: wire.TypeEvent, Event: wire.Event{Listener: 2, Cookie: afterConn.cookie, Kind: wire.KindPeerFIN}})
	expect("/after", ReasonPeerFIN)

	// A listener the agent refuses: its connections stay on epoll.
	fa.refuse.Store(true)
	ts2 := serve(t, m, m.Listener(loopback(t)), agentHandler(started, results), nil)
	eventually(t, "the refusal logged", func() bool { return strings.Contains(logs.String(), "did not take a listener") })
	refused, refusedConn := request(ts2.addr, "/refused")
	if !src.onEpoll(refusedConn) || m.Source() != SourceAgent {
		t.Errorf("connection of a refused listener: on epoll %v, source %s", src.onEpoll(refusedConn), m.Source())
	}
	reset(t, refused)
	expect("/refused", ReasonPeerReset)

	out := logs.String()
	if strings.Count(out, "lost the agent") != 1 || strings.Count(out, "agent is back") != 1 {
		t.Errorf("want one line per switch; log:\n%s", out)
	}
}
