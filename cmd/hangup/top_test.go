package main

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/hangup-io/hangup/agent"
	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
)

const scrapeA = `# TYPE hangup_connections_opened_total counter
hangup_connections_opened_total{netns="4026531840",port="8080"} 100
hangup_connections_opened_total{netns="4026531840",port="9090"} 10
hangup_connections_opened_total{netns="4026532000",port="80"} 5
# TYPE hangup_connections_closed_total counter
hangup_connections_closed_total{cause="normal",netns="4026531840",port="8080"} 90
hangup_connections_closed_total{cause="peer_reset",netns="4026531840",port="8080"} 1
hangup_connections_closed_total{cause="timeout",netns="4026531840",port="9090"} 0
hangup_connections_closed_total{cause="peer_reset",netns="4026532000",port="80"} 7
# TYPE hangup_connections_retransmissions_total counter
hangup_connections_retransmissions_total{netns="4026531840",port="8080"} 3
# TYPE hangup_netns_info gauge
hangup_netns_info{container_id="",netns="4026531840",pod_uid="",process="orders"} 1
`

const scrapeB = `# TYPE hangup_connections_opened_total counter
hangup_connections_opened_total{netns="4026531840",port="8080"} 120
hangup_connections_opened_total{netns="4026531840",port="9090"} 30
hangup_connections_opened_total{netns="4026532000",port="80"} 2
# TYPE hangup_connections_closed_total counter
hangup_connections_closed_total{cause="normal",netns="4026531840",port="8080"} 110
hangup_connections_closed_total{cause="peer_reset",netns="4026531840",port="8080"} 3
hangup_connections_closed_total{cause="timeout",netns="4026531840",port="9090"} 4
hangup_connections_closed_total{cause="keepalive_timeout",netns="4026531840",port="9090"} 2
hangup_connections_closed_total{cause="peer_reset",netns="4026532000",port="80"} 1
# TYPE hangup_connections_retransmissions_total counter
hangup_connections_retransmissions_total{netns="4026531840",port="8080"} 13
# TYPE hangup_netns_info gauge
hangup_netns_info{container_id="",netns="4026531840",pod_uid="",process="orders"} 1
`

// TestTopRates: two readings two seconds apart give per-second rates per
// namespace and port, aborts split by cause (timeouts summed), the most
// aborts first; a counter that went down (an agent restart) counts from 0.
func TestTopRates(t *testing.T) {
	a, err := parseSnapshot(strings.NewReader(scrapeA))
	if err != nil {
		t.Fatal(err)
	}
	b, err := parseSnapshot(strings.NewReader(scrapeB))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	a.at, b.at = now, now.Add(2*time.Second)
	rows := rates(a, b)
	if len(rows) != 3 {
		t.Fatalf("%d rows: %+v", len(rows), rows)
	}
	want := []row{
		{key: portKey{"4026531840", "9090"}, process: "orders", opened: 10, aborted: 3, timeouts: 3},
		{key: portKey{"4026531840", "8080"}, process: "orders", opened: 10, aborted: 1, peerReset: 1, retrans: 5},
		// Restarted agent: opened 5 → 2 and resets 7 → 1 count from zero.
		{key: portKey{"4026532000", "80"}, opened: 1, aborted: 0.5, peerReset: 0.5},
	}
	for i, w := range want {
		if rows[i] != w {
			t.Errorf("row %d: %+v, want %+v", i, rows[i], w)
		}
	}
	var out bytes.Buffer
	if err := render(&out, b.at, 2*time.Second, rows); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", out.String())
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 6 || !strings.Contains(lines[2], "ABORTED") || !strings.Contains(lines[3], "9090") || !strings.Contains(lines[3], "orders") {
		t.Errorf("table:\n%s", out.String())
	}
	if _, err := parseSnapshot(strings.NewReader("# TYPE up gauge\nup 1\n")); err == nil {
		t.Error("a scrape without hangup's metrics was accepted")
	}
	if _, err := parseSnapshot(strings.NewReader("hangup_connections_opened_total{ 1\n")); err == nil {
		t.Error("a garbled scrape was accepted")
	}
}

// TestTopOnce runs `hangup top --once` against a real agent's metrics
// endpoint while this test opens and resets connections in a namespace of
// its own: that namespace's row shows connections opened and aborted by
// peer resets. Bad flags and an absent agent are errors.
func TestTopOnce(t *testing.T) {
	pair := testnet.NewPair(t)
	a := startAgentWith(t, agent.Config{NoSeed: true})
	reg := prometheus.NewRegistry()
	reg.MustRegister(a.Collector())
	web, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux}
	go srv.Serve(web)
	defer srv.Close()
	url := "http://" + web.Addr().String() + "/metrics"

	ln, err := pair.Server.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	fi, err := os.Stat("/run/netns/" + pair.Server.NS)
	if err != nil {
		t.Fatal(err)
	}
	inode := strconv.FormatUint(fi.Sys().(*syscall.Stat_t).Ino, 10)

	// Resets until top has read twice.
	stop := make(chan struct{})
	traffic := make(chan struct{})
	go func() {
		defer close(traffic)
		for {
			select {
			case <-stop:
				return
			default:
			}
			c, err := pair.Client.Dial("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), port))
			if err != nil {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	var out, errb bytes.Buffer
	err = run(context.Background(), []string{"top", "--once", "--interval", "1s", "--url", url}, &out, &errb)
	close(stop)
	<-traffic
	if err != nil {
		t.Fatalf("%v\n%s", err, errb.String())
	}
	t.Logf("\n%s", out.String())
	var found bool
	for _, line := range strings.Split(out.String(), "\n") {
		f := strings.Fields(line)
		if len(f) != 10 || f[0] != inode || f[1] != port {
			continue
		}
		found = true
		opened, _ := strconv.ParseFloat(f[3], 64)
		aborted, _ := strconv.ParseFloat(f[4], 64)
		peerRST, _ := strconv.ParseFloat(f[5], 64)
		if opened <= 0 || aborted <= 0 || peerRST <= 0 {
			t.Errorf("row %q: want connections opened, aborted and peer resets", line)
		}
	}
	if !found {
		t.Errorf("no row for netns %s port %s", inode, port)
	}

	for _, args := range [][]string{
		{"top", "--once", "--url", "http://127.0.0.1:1/metrics"},
		{"top", "--interval", "0s", "--url", url},
		{"top", "--once", "--interval", "10ms", "--url", "http://" + web.Addr().String() + "/nope"},
	} {
		if err := run(context.Background(), args, &out, &errb); err == nil {
			t.Errorf("%v succeeded", args)
		}
	}
}

// TestTopTLS: top reads an https endpoint whose certificate --tls.ca-file
// trusts, with basic auth from the URL; without the CA, or with a wrong
// password, it fails.
func TestTopTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, _ := testutil.SelfSignedCert(t, dir)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "prometheus" || p != "s3cret" {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		w.Write([]byte(scrapeA))
	})}
	go srv.ServeTLS(ln, certFile, keyFile)
	defer srv.Close()
	base := "://127.0.0.1:" + strconv.Itoa(ln.Addr().(*net.TCPAddr).Port) + "/metrics"

	var out, errb bytes.Buffer
	if err := run(context.Background(), []string{"top", "--once", "--interval", "10ms",
		"--tls.ca-file", certFile, "--url", "https://prometheus:s3cret@" + base[3:]}, &out, &errb); err != nil {
		t.Fatalf("%v\n%s", err, errb.String())
	}
	if !strings.Contains(out.String(), "9090") || !strings.Contains(out.String(), "orders") {
		t.Errorf("table:\n%s", out.String())
	}
	for name, args := range map[string][]string{
		"untrusted":      {"--url", "https://prometheus:s3cret@" + base[3:]},
		"wrong password": {"--tls.ca-file", certFile, "--url", "https://prometheus:nope@" + base[3:]},
		"no CA file":     {"--tls.ca-file", dir + "/absent.pem", "--url", "https" + base},
		"no certificate": {"--tls.ca-file", keyFile, "--url", "https" + base},
	} {
		if err := run(context.Background(), append([]string{"top", "--once", "--interval", "10ms"}, args...), &out, &errb); err == nil {
			t.Errorf("%s: top succeeded", name)
		} else if strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "nope") {
			t.Errorf("%s: the error shows the password: %v", name, err)
		}
	}
}
