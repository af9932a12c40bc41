// Command orders is an order server built on httpx: an order is committed
// with client aborts ignored, and a shutdown function marks it unconfirmed
// when the client went away or never received the confirmation.
//
//	go run . --web.listen-address=:8080 --db.path=orders.db
//	curl -d '{"item":"book","quantity":1}' localhost:8080/orders
//	curl localhost:8080/orders/1
//	curl localhost:8080/metrics
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
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	store, err := OpenStore(*dbPath)
	if err != nil {
		return err
	}
	defer store.Close()

	m, err := httpx.New(httpx.Options{Source: httpx.Source(*source), DropTimeout: *drop, Logger: log})
	if err != nil {
		return err
	}
	defer m.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)

	app := &server{store: store, log: log, deliveryWait: time.Minute}
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
	log.Info("listening", "addr", *addr)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Waits for settling orders too, not only for open requests.
	if err := m.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutting down: %w", err)
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
