// Command orders is an order server built on httpx: an order is committed
// with client aborts ignored, and a shutdown function marks it unconfirmed
// when the client went away or never received the confirmation. Orders
// persist in a bbolt file.
//
//	go run . --web.listen-address=:8080 --db.path=orders.db
//	curl -d '{"item":"book","quantity":1}' localhost:8080/orders
//	curl localhost:8080/orders/1
//	curl localhost:8080/metrics
//
// POST /orders commits the order as "pending" and answers 201 with the
// confirmation, then waits until the client's TCP stack acknowledged it.
// When the request ends, the order is settled, and GET /orders/{id} shows
// its "state", with a "reason" for the last two:
//
//	confirmed    the client acknowledged every byte of the confirmation
//	unconfirmed  the client certainly did not get it: it reset the
//	             connection or vanished (link down, noticed within
//	             --httpx.drop-timeout) before acknowledging it, or the
//	             confirmation was never sent
//	unverified   sent, but nobody can tell whether it arrived: the
//	             connection is not one httpx can track (not TCP), or a
//	             live client did not acknowledge it within
//	             --order.delivery-wait
//
// Unknown is never reported as confirmed: an operator following up on
// orders whose customer may not know about them takes both unconfirmed and
// unverified. An order still pending after the server stopped was not
// settled because the server stopped first.
//
// SIGINT (Ctrl-C) or SIGTERM shuts the server down gracefully: it stops
// accepting connections and waits up to --shutdown-timeout for requests,
// including orders still being settled; a second signal stops it at once.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/httpx"
	// Links the in-process probe (and cilium/ebpf) so that -httpx.source=bpf
	// works; a server that only uses the agent or epoll leaves it out.
	_ "github.com/hangup-io/hangup/httpx/bpfsource"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "orders:", err)
		os.Exit(1)
	}
}

func run() error {
	addr := flag.String("web.listen-address", ":8080", "address to listen on")
	dbPath := flag.String("db.path", "orders.db", "bbolt database file")
	source := flag.String("httpx.source", "", "detection source: agent, bpf, epoll, none (default: best available)")
	drop := flag.Duration("httpx.drop-timeout", 10*time.Second, "how long a silently vanished client may go unnoticed")
	deliveryWait := flag.Duration("order.delivery-wait", 20*time.Second, "how long a live client may take to acknowledge a confirmation before the order is unverified")
	shutdownTimeout := flag.Duration("shutdown-timeout", 30*time.Second, "how long a graceful shutdown waits for requests and orders being settled")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	store, err := OpenStore(*dbPath)
	if err != nil {
		return err
	}
	defer func() {
		if err := store.Close(); err != nil {
			log.Error("closing the database", "err", err)
		}
	}()

	m, err := httpx.New(httpx.Options{Source: httpx.Source(*source), DropTimeout: *drop, Logger: log})
	if err != nil {
		return err
	}
	defer m.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)

	app := &server{store: store, log: log, deliveryWait: *deliveryWait}
	mux := http.NewServeMux()
	mux.Handle("/", m.Handler(app.routes()))
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Addr: *addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	m.Configure(srv)

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	// m.Listener registers the listening socket with the host agent, when
	// that is the source, so the agent streams this server's events.
	go func() { errc <- srv.Serve(m.Listener(ln)) }()
	log.Info("listening", "addr", ln.Addr().String(), "db", *dbPath)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	stop() // a second signal ends the process at once
	log.Info("shutting down", "timeout", *shutdownTimeout)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), *shutdownTimeout)
	defer cancel()
	// Waits for orders being settled too, not only for open requests.
	if err := m.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutting down: %w", err)
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	log.Info("stopped")
	return nil
}
