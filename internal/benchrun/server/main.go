// Command server is the HTTP server that `make bench` loads with wrk: bare
// net/http, or the same handler behind httpx with a chosen detection
// source. It prints "listening ADDR" on stdout once it accepts connections
// and serves until SIGINT or SIGTERM.
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
	"runtime/pprof"
	"syscall"

	"github.com/hangup-io/hangup/httpx"
	_ "github.com/hangup-io/hangup/httpx/bpfsource" // SourceBPF
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "server:", err)
		os.Exit(1)
	}
}

func run() error {
	mode := flag.String("mode", "bare", "bare (net/http alone) or httpx")
	source := flag.String("source", "epoll", "httpx detection source: epoll, bpf or agent")
	agentSocket := flag.String("agent-socket", "", "the agent's socket, for --source=agent")
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.Parse()

	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("starting the CPU profile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	body := []byte("hello, world\n")
	var h http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: h, ErrorLog: slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)}
	switch *mode {
	case "bare":
	case "httpx":
		src := httpx.Source(*source)
		switch src {
		case httpx.SourceEpoll, httpx.SourceBPF, httpx.SourceAgent:
		default:
			return fmt.Errorf("--source: %q is not epoll, bpf or agent", *source)
		}
		m, err := httpx.New(httpx.Options{
			Source:      src,
			AgentSocket: *agentSocket,
			Logger:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		})
		if err != nil {
			return err
		}
		defer m.Close()
		// The agent source may watch with epoll until its session is
		// up; the harness waits for the agent to list the listener.
		if got := m.Source(); got != src && src != httpx.SourceAgent {
			return fmt.Errorf("httpx runs source %s, not the %s asked for", got, src)
		}
		srv.Handler = m.Handler(h)
		m.Configure(srv)
		ln = m.Listener(ln)
	default:
		return fmt.Errorf("--mode: %q is neither bare nor httpx", *mode)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	if err := srv.Close(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
