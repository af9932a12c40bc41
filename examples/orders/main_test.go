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
	"testing"
	"time"

	"github.com/hangup-io/hangup/httpx"
)

type testApp struct {
	srv   *server
	store *Store
	addr  string
}

func start(t *testing.T, afterCommit func(Order, *httpx.State)) *testApp {
	t.Helper()
	store, err := OpenStore(filepath.Join(t.TempDir(), "orders.db"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	m, err := httpx.New(httpx.Options{Source: httpx.SourceEpoll, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	app := &server{store: store, log: log, deliveryWait: 10 * time.Second, afterCommit: afterCommit}
	srv := &http.Server{Handler: m.Handler(app.routes())}
	m.Configure(srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := m.Shutdown(ctx); err != nil {
			t.Error(err)
		}
		m.Close()
		store.Close()
	})
	return &testApp{srv: app, store: store, addr: ln.Addr().String()}
}

func (a *testApp) waitState(t *testing.T, id uint64, want string) Order {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		o, err := a.store.Get(id)
		if err == nil && o.State == want {
			return o
		}
		if time.Now().After(deadline) {
			t.Fatalf("order %d: %+v, %v; want state %s", id, o, err, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestOrderConfirmed(t *testing.T) {
	a := start(t, nil)
	resp, err := http.Post("http://"+a.addr+"/orders", "application/json", strings.NewReader(`{"item":"book","quantity":2}`))
	if err != nil {
		t.Fatal(err)
	}
	var o Order
	json.NewDecoder(resp.Body).Decode(&o)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated || o.ID == 0 {
		t.Fatalf("status %d, order %+v", resp.StatusCode, o)
	}
	a.waitState(t, o.ID, StateConfirmed)
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
	a := start(t, func(o Order, st *httpx.State) {
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
	case <-time.After(20 * time.Second):
		t.Fatal("order not committed")
	}
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	// Aborts are ignored: the handler goes on, but the abort is recorded.
	deadline := time.Now().Add(20 * time.Second)
	for !cm.st.Aborted() {
		if time.Now().After(deadline) {
			t.Fatal("abort not recorded")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if got, _ := a.store.Get(cm.o.ID); got.State != StatePending {
		t.Fatalf("settled before the handler finished: %+v", got)
	}
	close(proceed)
	got := a.waitState(t, cm.o.ID, StateUnconfirmed)
	if !strings.Contains(got.Reason, "peer_reset") {
		t.Errorf("reason %q", got.Reason)
	}
}
