package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangup-io/hangup/httpx"
	"github.com/hangup-io/hangup/internal/testnet"
)

// wait is the generous bound for anything a test waits for; it is not a
// timing assertion.
const wait = 20 * time.Second

type testApp struct {
	srv    *server
	store  *Store
	dbPath string
	addr   string
	m      *httpx.Monitor
	stop   func() // shuts the server down and closes the database; idempotent
}

// start serves the order API on ln with a fresh database.
func start(t *testing.T, opts httpx.Options, ln net.Listener, afterCommit func(Order, *httpx.State)) *testApp {
	t.Helper()
	dbPath := filepath.Join(t.TempDir(), "orders.db")
	store, err := OpenStore(dbPath)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	opts.Logger = log
	m, err := httpx.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	// Longer than any wait below: a test that sees a settled order saw
	// the connection's fate, not this bound.
	app := &server{store: store, log: log, deliveryWait: 3 * wait, afterCommit: afterCommit}
	srv := &http.Server{Handler: m.Handler(app.routes())}
	m.Configure(srv)
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(m.Listener(ln))
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 3*wait)
			defer cancel()
			if err := m.Shutdown(ctx); err != nil {
				t.Errorf("shutdown: %v", err)
			}
			<-done
			m.Close()
			if err := store.Close(); err != nil {
				t.Errorf("closing the database: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return &testApp{srv: app, store: store, dbPath: dbPath, addr: ln.Addr().String(), m: m, stop: stop}
}

func loopback(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// settled waits until the order left pending, as stored in the database,
// for at most within.
func (a *testApp) settled(t *testing.T, id uint64, within time.Duration) Order {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		o, err := a.store.Get(id)
		if err != nil {
			t.Fatalf("order %d: %v", id, err)
		}
		if o.State != StatePending {
			return o
		}
		if time.Now().After(deadline) {
			t.Fatalf("order %d still pending after %s: %+v", id, within, o)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// persisted stops the server, reopens its database file and returns the
// order as stored there.
func (a *testApp) persisted(t *testing.T, id uint64) Order {
	t.Helper()
	a.stop()
	store, err := OpenStore(a.dbPath)
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	o, err := store.Get(id)
	if err != nil {
		t.Fatalf("order %d after reopening: %v", id, err)
	}
	return o
}

func postOrder(ctx context.Context, c *http.Client, base, body string) (Order, *http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/orders", strings.NewReader(body))
	if err != nil {
		return Order{}, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return Order{}, nil, err
	}
	defer resp.Body.Close()
	var o Order
	if err := json.NewDecoder(resp.Body).Decode(&o); err != nil {
		return Order{}, resp, fmt.Errorf("decoding the confirmation: %w", err)
	}
	return o, resp, nil
}

func getOrder(t *testing.T, c *http.Client, base string, id uint64) Order {
	t.Helper()
	resp, err := c.Get(fmt.Sprintf("%s/orders/%d", base, id))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var o Order
	if err := json.NewDecoder(resp.Body).Decode(&o); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET order %d: %d, %v", id, resp.StatusCode, err)
	}
	return o
}

func TestOrderConfirmed(t *testing.T) {
	a := start(t, httpx.Options{Source: httpx.SourceEpoll}, loopback(t), nil)
	base := "http://" + a.addr
	o, resp, err := postOrder(t.Context(), http.DefaultClient, base, `{"item":"book","quantity":2}`)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusCreated || o.ID == 0 || o.State != StateConfirmed {
		t.Fatalf("status %d, confirmation %+v", resp.StatusCode, o)
	}
	if got := a.settled(t, o.ID, wait); got.State != StateConfirmed || got.Reason != "" {
		t.Fatalf("stored %+v, want confirmed", got)
	}
	if got := getOrder(t, http.DefaultClient, base, o.ID); got.State != StateConfirmed || got.Settled.IsZero() {
		t.Errorf("GET: %+v, want confirmed and settled", got)
	}
}

// The client sends its order and vanishes (RST) while the server commits:
// the order is committed anyway (aborts are ignored), and the shutdown
// function marks it unconfirmed.
func TestOrderClientGone(t *testing.T) {
	type commit struct {
		o  Order
		st *httpx.State
	}
	committed := make(chan commit, 1)
	proceed := make(chan struct{})
	a := start(t, httpx.Options{Source: httpx.SourceEpoll}, loopback(t), func(o Order, st *httpx.State) {
		committed <- commit{o, st}
		<-proceed
	})
	c, err := net.Dial("tcp", a.addr)
	if err != nil {
		t.Fatal(err)
	}
	body := `{"item":"lamp","quantity":1}`
	fmt.Fprintf(c, "POST /orders HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	var cm commit
	select {
	case cm = <-committed:
	case <-time.After(wait):
		close(proceed)
		t.Fatal("order not committed")
	}
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	// Aborts are ignored: the handler goes on, but the abort is recorded.
	deadline := time.Now().Add(wait)
	for !cm.st.Aborted() {
		if time.Now().After(deadline) {
			close(proceed)
			t.Fatal("abort not recorded")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if got, _ := a.store.Get(cm.o.ID); got.State != StatePending {
		t.Fatalf("settled before the handler finished: %+v", got)
	}
	close(proceed)
	got := a.settled(t, cm.o.ID, wait)
	if got.State != StateUnconfirmed || !strings.Contains(got.Reason, "peer_reset") {
		t.Errorf("stored %+v, want unconfirmed because of peer_reset", got)
	}
	if got := a.persisted(t, cm.o.ID); got.State != StateUnconfirmed {
		t.Errorf("after reopening: %+v", got)
	}
}

// A connection httpx cannot track (here: a unix socket) leaves the
// delivery unknown: the order is unverified, never confirmed.
func TestOrderDeliveryUnknown(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "orders.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	a := start(t, httpx.Options{Source: httpx.SourceEpoll}, ln, nil)
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	o, resp, err := postOrder(t.Context(), client, "http://shop", `{"item":"pen","quantity":3}`)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if got := a.settled(t, o.ID, wait); got.State != StateUnverified || got.Reason == "" {
		t.Fatalf("stored %+v, want unverified with a reason", got)
	}
	got := getOrder(t, client, "http://shop", o.ID)
	if got.State != StateUnverified || !strings.Contains(got.Reason, "unknown") {
		t.Errorf("GET: %+v, want unverified, delivery unknown", got)
	}
	t.Logf("GET: %+v", got)
}

// The scenario of the issue, over a real network: a client in its own
// network namespace orders; its link is cut after the order was committed,
// so the confirmation the server writes is never acknowledged. The order
// must end unconfirmed, with a reason, within the drop timeout (plus
// generous slack). A normal client, with keep-alive or Connection: close,
// gets a confirmed order. Both detection sources.
func TestOrderNetwork(t *testing.T) {
	const drop = 2 * time.Second
	for _, src := range []httpx.Source{httpx.SourceBPF, httpx.SourceEpoll} {
		t.Run(string(src), func(t *testing.T) {
			for _, tc := range []struct {
				name      string
				cut       bool
				keepAlive bool
			}{
				{"confirmed", false, true},
				{"confirmed-connection-close", false, false},
				{"link-cut-before-ack", true, true},
			} {
				t.Run(tc.name, func(t *testing.T) {
					testOrderNetwork(t, src, drop, tc.cut, tc.keepAlive)
				})
			}
		})
	}
}

func testOrderNetwork(t *testing.T, src httpx.Source, drop time.Duration, cut, keepAlive bool) {
	pair := testnet.NewPair(t)
	ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	committed := make(chan Order, 1)
	proceed := make(chan struct{})
	var proceedOnce sync.Once
	release := func() { proceedOnce.Do(func() { close(proceed) }) }
	a := start(t, httpx.Options{Source: src, DropTimeout: drop}, ln, func(o Order, _ *httpx.State) {
		committed <- o
		<-proceed
	})
	t.Cleanup(release) // before the server's shutdown, which waits for the handler
	if got := a.m.Source(); got != src {
		testnet.SkipOrFail(t, "detection source %s unavailable (got %s)", src, got)
	}
	tr := &http.Transport{DialContext: pair.Client.Dialer(), DisableKeepAlives: !keepAlive}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	base := "http://" + a.addr

	type answer struct {
		o    Order
		resp *http.Response
		err  error
	}
	ctx, cancel := context.WithCancel(t.Context())
	answers := make(chan answer, 1)
	go func() {
		o, resp, err := postOrder(ctx, client, base, `{"item":"chair","quantity":4}`)
		answers <- answer{o, resp, err}
	}()
	// The client gives up (on the cut link, silently) before the test ends.
	defer func() { cancel(); <-answers }()

	var order Order
	select {
	case order = <-committed:
	case ans := <-answers:
		t.Fatalf("client: %v before the order was committed", ans.err)
	case <-time.After(wait):
		t.Fatal("order not committed")
	}
	cutAt := time.Now()
	if cut {
		pair.Cut() // from now on nothing the server sends is acknowledged
	}
	release()

	if !cut {
		ans := <-answers
		answers <- ans // for the deferred receive
		if ans.err != nil || ans.resp.StatusCode != http.StatusCreated || ans.o.ID != order.ID {
			t.Fatalf("client: %+v, %v", ans.o, ans.err)
		}
		got := a.settled(t, order.ID, wait)
		if got.State != StateConfirmed {
			t.Fatalf("stored %+v, want confirmed", got)
		}
		if got := getOrder(t, client, base, order.ID); got.State != StateConfirmed {
			t.Errorf("GET: %+v, want confirmed", got)
		}
	} else {
		// The drop timeout is the feature's promise; the slack is generous.
		got := a.settled(t, order.ID, drop+wait)
		t.Logf("%s: settled %s after the cut: %s (%s)", src, time.Since(cutAt).Round(time.Millisecond), got.State, got.Reason)
		if got.State != StateUnconfirmed || !strings.Contains(got.Reason, "not delivered") {
			t.Fatalf("stored %+v, want unconfirmed: not delivered", got)
		}
		if n := a.m.Stats().Undelivered; n != 1 {
			t.Errorf("undelivered responses %d, want 1", n)
		}
	}
	want := map[bool]string{false: StateConfirmed, true: StateUnconfirmed}[cut]
	if got := a.persisted(t, order.ID); got.State != want || got.Settled.IsZero() || (cut && got.Reason == "") {
		t.Errorf("after reopening the database: %+v, want %s", got, want)
	}
}
