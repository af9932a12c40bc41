package deploy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangup-io/hangup/httpx"
	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestQueriesMatchScrapes checks every rule and dashboard query against
// what the code really exports: it runs hangupd (as root), a server in a
// network namespace that subscribes to it through httpx's agent source, and
// an httpx server on the epoll source with an aborted request, scrapes all
// three over HTTP, and reports each metric, label and label value that a
// query names and no scrape has.
func TestQueriesMatchScrapes(t *testing.T) {
	testnet.RequireRoot(t)
	s := schema{}
	// Prometheus writes up for every target, with job and instance only.
	s.add("up", nil)

	agent := startHangupd(t)
	pair := testnet.NewPair(t)

	// A server in its own namespace, subscribed to the agent, so that its
	// port, namespace and subscriber series exist.
	am, ln := agentServer(t, pair.Server, agent.socket)
	port := ln.Addr().(*net.TCPAddr).Port
	waitFor(t, "the server to reach the agent", func() (bool, string) {
		return am.Source() == httpx.SourceAgent, string(am.Source())
	})

	// Traffic from the client namespace: requests on connections that
	// close normally, then one the client resets.
	client := &http.Client{Transport: &http.Transport{DialContext: pair.Client.Dialer(), DisableKeepAlives: true}, Timeout: 10 * time.Second}
	url := fmt.Sprintf("http://%s/", ln.Addr())
	for range 3 {
		mustGet(t, client, url)
	}
	c, err := pair.Client.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).SetLinger(0)
	c.Close()

	inode := netnsInode(t, pair.Server.NS)
	var agentScrape map[string]*dto.MetricFamily
	waitFor(t, "hangupd to export the server's port and subscription", func() (bool, string) {
		agentScrape = scrape(t, agent.url)
		opened := 0.0
		for _, m := range agentScrape["hangup_connections_opened_total"].GetMetric() {
			// Other tests' namespaces may use the same port: with the
			// netns label, count only the server's namespace.
			if ns := labelOf(m, "netns"); labelOf(m, "port") == strconv.Itoa(port) && (ns == "" || ns == inode) {
				opened += m.GetCounter().GetValue()
			}
		}
		subs := gaugeValue(agentScrape, "hangup_agent_subscribers")
		listeners := gaugeValue(agentScrape, "hangup_agent_listeners")
		return opened >= 4 && subs >= 1 && listeners >= 1 && len(agentScrape["hangup_subscriber_dropped_events_total"].GetMetric()) > 0,
			fmt.Sprintf("opened on port %d in netns %s: %v (netns values of the port: %v), subscribers %v, listeners %v",
				port, inode, opened, portLabelValues(agentScrape, "hangup_connections_opened_total", port, "netns"), subs, listeners)
	})
	// The contract: netns is the namespace's inode, as lsns shows it. (Had
	// the label another value, the wait above would have failed.)
	if nss := portLabelValues(agentScrape, "hangup_connections_opened_total", port, "netns"); len(nss) > 0 {
		t.Logf("port %d: netns values %v, the server's namespace is %s", port, nss, inode)
	}
	s.addScrape(agentScrape)

	// httpx metrics of the subscribed server (source="agent").
	s.addScrape(scrapeCollector(t, am))
	// And of a server on the epoll source with an aborted request.
	s.addScrape(scrapeCollector(t, epollServerWithAbort(t)))

	errs := checkQueries(t, s)
	for _, e := range errs {
		t.Error(e)
	}
	if len(errs) > 0 {
		var b strings.Builder
		for _, name := range slices.Sorted(maps.Keys(s)) {
			if strings.HasPrefix(name, "hangup_") || name == "up" {
				fmt.Fprintf(&b, "  %s %v\n", name, slices.Sorted(maps.Keys(s[name])))
			}
		}
		t.Logf("exported (scrapes, plus recorded series):\n%s", b.String())
	}
}

// agentServer runs an HTTP server in host's namespace whose httpx Monitor
// uses the agent at socket and registers the server's listener with it.
// Both stop when the test ends.
func agentServer(t *testing.T, host *testnet.Host, socket string) (*httpx.Monitor, net.Listener) {
	t.Helper()
	m, err := httpx.New(httpx.Options{Source: httpx.SourceAgent, AgentSocket: socket})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	ln, err := host.Listen("tcp", netip.AddrPortFrom(host.Addr4, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: m.Handler(okHandler()), ReadHeaderTimeout: 10 * time.Second}
	m.Configure(srv)
	go srv.Serve(m.Listener(ln))
	t.Cleanup(func() { srv.Close() })
	return m, ln
}

// agentProcess is a running hangupd.
type agentProcess struct {
	url    string // of /metrics
	socket string
}

// startHangupd builds and starts hangupd with its own socket and metrics
// port, stopping it when the test ends.
func startHangupd(t *testing.T) agentProcess {
	t.Helper()
	bin := testutil.BuildHangupd(t)
	dir, err := os.MkdirTemp("", "hangup-deploy")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "hangup.sock")
	addr := freeAddr(t)
	// Every port keeps its own label: the probe sees the whole host, and
	// other tests' ports must not push this test's into "other".
	cmd := exec.Command(bin, "--web.listen-address="+addr, "--socket.path="+sock,
		"--metrics.max-ports=65536", "--log.format=json")
	a := agentProcess{url: "http://" + addr + "/metrics", socket: sock}
	runAgent(t, cmd, a, &testutil.Buffer{})
	return a
}

// freeAddr returns a loopback address with a port free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// runAgent starts cmd, a hangupd (or a wrapper that runs one), logging to
// logs, and waits until a's socket exists and its metrics answer. It stops
// the process with SIGTERM when the test ends. A probe that cannot load
// skips the test, or fails it under HANGUP_REQUIRE_BPF=1.
func runAgent(t *testing.T, cmd *exec.Cmd, a agentProcess, logs *testutil.Buffer) {
	t.Helper()
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("hangupd logs:\n%s", logs.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(a.socket); err == nil {
			if resp, err := http.Get(a.url); err == nil {
				resp.Body.Close()
				return
			}
		}
		select {
		case <-exited:
			if l := logs.String(); strings.Contains(l, "loading the kernel probe") && (strings.Contains(l, "permission denied") || strings.Contains(l, "not supported")) {
				testnet.SkipOrFail(t, "hangupd cannot load the probe: %v\n%s", waitErr, logs.String())
			}
			t.Fatalf("hangupd exited: %v\n%s", waitErr, logs.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("hangupd did not start within 30s:\n%s", logs.String())
		}
	}
}

// epollServerWithAbort runs an httpx server on the epoll source on
// loopback, serves it three requests and one whose client hangs up while
// the handler waits, and returns its Monitor once the abort is counted.
func epollServerWithAbort(t *testing.T) *httpx.Monitor {
	t.Helper()
	m, err := httpx.New(httpx.Options{Source: httpx.SourceEpoll})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	started := make(chan struct{}, 1)
	mux := http.NewServeMux()
	mux.Handle("/", okHandler())
	mux.HandleFunc("/wait", func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		select {
		case <-r.Context().Done():
		case <-time.After(30 * time.Second):
		}
	})
	srv := &http.Server{Handler: m.Handler(mux), ReadHeaderTimeout: 10 * time.Second}
	m.Configure(srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	for range 3 {
		mustGet(t, http.DefaultClient, "http://"+ln.Addr().String()+"/")
	}
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c, "GET /wait HTTP/1.1\r\nHost: test\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler never started")
	}
	c.Close()
	waitFor(t, "the aborted request to be counted", func() (bool, string) {
		st := m.Stats()
		return st.Requests[httpx.StatusAborted] >= 1, fmt.Sprintf("%+v", st)
	})
	return m
}

func okHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
}

func mustGet(t *testing.T, c *http.Client, url string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
}

// scrapeCollector serves c on a registry of its own, as a server would,
// and scrapes it over HTTP.
func scrapeCollector(t *testing.T, c prometheus.Collector) map[string]*dto.MetricFamily {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: promhttp.HandlerFor(reg, promhttp.HandlerOpts{}), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	defer srv.Close()
	return scrape(t, "http://"+ln.Addr().String()+"/metrics")
}

// scrape reads a metrics endpoint in the text format.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scraping %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping %s: %s %v\n%s", url, resp.Status, err, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parsing the scrape of %s: %v", url, err)
	}
	return mfs
}

// addScrape adds every series of a scrape, a histogram as Prometheus stores
// it: _bucket (with le), _sum and _count.
func (s schema) addScrape(mfs map[string]*dto.MetricFamily) {
	for name, mf := range mfs {
		for _, m := range mf.GetMetric() {
			lbls := map[string]string{}
			for _, lp := range m.GetLabel() {
				lbls[lp.GetName()] = lp.GetValue()
			}
			if mf.GetType() != dto.MetricType_HISTOGRAM {
				s.add(name, lbls)
				continue
			}
			s.add(name+"_sum", lbls)
			s.add(name+"_count", lbls)
			for _, b := range m.GetHistogram().GetBucket() {
				bl := maps.Clone(lbls)
				bl["le"] = strconv.FormatFloat(b.GetUpperBound(), 'g', -1, 64)
				s.add(name+"_bucket", bl)
			}
			bl := maps.Clone(lbls)
			bl["le"] = "+Inf"
			s.add(name+"_bucket", bl)
		}
	}
}

func labelOf(m *dto.Metric, name string) string {
	for _, lp := range m.GetLabel() {
		if lp.GetName() == name {
			return lp.GetValue()
		}
	}
	return ""
}

func gaugeValue(mfs map[string]*dto.MetricFamily, name string) float64 {
	v := 0.0
	for _, m := range mfs[name].GetMetric() {
		v += m.GetGauge().GetValue()
	}
	return v
}

// portLabelValues returns the values of label on the series of one port.
func portLabelValues(mfs map[string]*dto.MetricFamily, name string, port int, label string) []string {
	var out []string
	for _, m := range mfs[name].GetMetric() {
		if labelOf(m, "port") == strconv.Itoa(port) {
			if v := labelOf(m, label); v != "" {
				out = append(out, v)
			}
		}
	}
	return out
}

// netnsInode returns the inode of a named network namespace, what lsns and
// /proc/PID/ns/net show.
func netnsInode(t *testing.T, name string) string {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat("/run/netns/"+name, &st); err != nil {
		t.Fatal(err)
	}
	return strconv.FormatUint(st.Ino, 10)
}

// waitFor polls cond until it holds, failing the test after 30s with the
// last state cond described.
func waitFor(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		ok, state := cond()
		if ok {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %s", what, state)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
