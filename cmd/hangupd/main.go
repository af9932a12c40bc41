// Command hangupd is the hangup host agent: it loads the kernel probe,
// exports per-port connection metrics for Prometheus, and streams each
// subscribed server the events of its own listeners over a unix socket.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/agent"
	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/exporter-toolkit/web"
)

func main() {
	if err := run(os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "hangupd:", err)
		os.Exit(1)
	}
}

type options struct {
	listenAddress  string
	telemetryPath  string
	webConfigFile  string
	socketPath     string
	socketGroup    string
	logLevel       string
	logFormat      string
	ringBufferSize int
	maxConns       int
	maxSubscribers int
	maxPerUser     int
	maxListeners   int
	maxUserListen  int
	seedBurst      int
	seedRate       float64
	queueLen       int
	maxPorts       int
	maxNamespaces  int
	stallTimeout   time.Duration
	noSeed         bool
	probeStats     bool
	capsDrop       string
	capsKeep       string
	version        bool
}

func parseFlags(args []string, out io.Writer) (*options, error) {
	var o options
	fs := flag.NewFlagSet("hangupd", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&o.listenAddress, "web.listen-address", ":9808", "address for the metrics endpoint")
	fs.StringVar(&o.telemetryPath, "web.telemetry-path", "/metrics", "path of the metrics endpoint")
	fs.StringVar(&o.webConfigFile, "web.config.file", "", "exporter-toolkit web configuration (TLS, basic auth) for the metrics endpoint; empty serves plain HTTP")
	fs.StringVar(&o.socketPath, "socket.path", wire.DefaultSocketPath, "subscriber socket (SOCK_SEQPACKET, mode 0660)")
	fs.StringVar(&o.socketGroup, "socket.group", "", "group (name or id) that may subscribe; empty keeps the agent's group")
	fs.StringVar(&o.logLevel, "log.level", "info", "log level: debug, info, warn, error")
	fs.StringVar(&o.logFormat, "log.format", "logfmt", "log format: logfmt or json")
	fs.IntVar(&o.ringBufferSize, "probe.ring-buffer-size", 0, "kernel event ring buffer in bytes (0: 1 MiB)")
	fs.IntVar(&o.maxConns, "probe.max-connections", 0, "server connections tracked at once (0: 262144)")
	fs.IntVar(&o.maxSubscribers, "subscribers.max", 0, "concurrent subscribers (0: 256)")
	fs.IntVar(&o.maxPerUser, "subscribers.max-per-user", 0, "concurrent subscribers of one user, by SO_PEERCRED uid (0: 32)")
	fs.IntVar(&o.maxListeners, "subscribers.max-listeners", 0, "listeners per subscriber (0: 64)")
	fs.IntVar(&o.maxUserListen, "subscribers.max-listeners-per-user", 0, "listeners of all of one user's subscribers (0: 256)")
	fs.IntVar(&o.queueLen, "subscribers.queue-length", 0, "events buffered per subscriber before dropping; the queue grows with use up to it (0: 4096)")
	fs.IntVar(&o.seedBurst, "seed.burst", 0, "listener registrations (each a sock_diag scan) one user may make at once (0: 16)")
	fs.Float64Var(&o.seedRate, "seed.rate", 0, "listener registrations per second one user may make after the burst (0: 2)")
	fs.DurationVar(&o.stallTimeout, "subscribers.stall-timeout", 0, "disconnect a subscriber that stopped reading for this long (0: 30s)")
	fs.IntVar(&o.maxPorts, "metrics.max-ports", 0, "distinct port label values per network namespace before port=\"other\" (0: 100)")
	fs.IntVar(&o.maxNamespaces, "metrics.max-namespaces", 0, "distinct netns label values before netns=\"other\" (0: 250)")
	fs.BoolVar(&o.probeStats, "probe.stats", false, "turn on the kernel's BPF run-time statistics while hangupd runs and export each probe program's run count and time (costs every BPF program on the host a few ns per run)")
	fs.BoolVar(&o.noSeed, "seed.disable", false, "do not look for connections that existed before start (sock_diag)")
	fs.StringVar(&o.capsDrop, "caps.drop", "auto", "after start: auto keeps only the capabilities still needed (CAP_NET_ADMIN and CAP_SYS_ADMIN to seed listeners of other namespaces, none with --seed.disable); none keeps all")
	fs.StringVar(&o.capsKeep, "caps.keep", "", "capabilities that --caps.drop=auto keeps besides the needed ones, comma-separated (e.g. CAP_SYS_PTRACE to name the processes of other users in hangup_netns_info)")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	if o.capsDrop != "auto" && o.capsDrop != "none" {
		return nil, fmt.Errorf("--caps.drop: %q is neither auto nor none", o.capsDrop)
	}
	if _, err := parseCaps(o.capsKeep); err != nil {
		return nil, fmt.Errorf("--caps.keep: %w", err)
	}
	return &o, nil
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log.level: %w", err)
	}
	ho := &slog.HandlerOptions{Level: lv}
	switch format {
	case "logfmt":
		return slog.New(slog.NewTextHandler(w, ho)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, ho)), nil
	}
	return nil, fmt.Errorf("--log.format: %q is neither logfmt nor json", format)
}

func run(args []string, logOut io.Writer) error {
	o, err := parseFlags(args, logOut)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if o.version {
		fmt.Fprintln(os.Stdout, "hangupd", versionString())
		return nil
	}
	log, err := newLogger(logOut, o.logLevel, o.logFormat)
	if err != nil {
		return err
	}
	if o.webConfigFile != "" {
		// Checked before the probe loads: a bad file fails the start at once.
		if err := web.Validate(o.webConfigFile); err != nil {
			return fmt.Errorf("--web.config.file: %w", err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// Wakeups cost the kernel microseconds each: only the client-gone
	// events of subscribers' listeners wake the agent at once.
	probe, err := bpf.Load(bpf.Options{RingBufferSize: o.ringBufferSize, MaxConnections: o.maxConns, WakeWatchedOnly: true})
	if err != nil {
		var ve *bpf.VerifierError
		if errors.As(err, &ve) {
			log.Error("the kernel's verifier rejected the probe", "err", fmt.Sprintf("%+v", ve))
		}
		return fmt.Errorf("loading the kernel probe (try `hangup doctor`): %w", err)
	}
	defer probe.Close()
	log.Info("kernel probe loaded", "component", "probe")
	if o.probeStats {
		stats, err := bpf.EnableStats()
		if err != nil {
			return fmt.Errorf("--probe.stats: %w", err)
		}
		defer stats.Close()
		log.Info("BPF run-time statistics on", "component", "probe")
	}

	a, err := agent.New(agent.Config{
		Source:                probe,
		Logger:                log,
		SocketPath:            o.socketPath,
		SocketGroup:           o.socketGroup,
		MaxSubscribers:        o.maxSubscribers,
		MaxSubscribersPerUser: o.maxPerUser,
		MaxListeners:          o.maxListeners,
		MaxListenersPerUser:   o.maxUserListen,
		SeedBurst:             o.seedBurst,
		SeedRate:              o.seedRate,
		QueueLen:              o.queueLen,
		MaxPorts:              o.maxPorts,
		MaxNamespaces:         o.maxNamespaces,
		StallTimeout:          o.stallTimeout,
		NoSeed:                o.noSeed,
		ProgramStats:          o.probeStats,
	})
	if err != nil {
		return fmt.Errorf("starting the agent: %w", err)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(a.Collector(), collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.Handle(o.telemetryPath, promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(log.With("component", "web").Handler(), slog.LevelError),
	}))
	if o.telemetryPath != "/" {
		mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/" {
				http.NotFound(w, r)
				return
			}
			fmt.Fprintf(w, "<html><head><title>hangupd</title></head><body><h1>hangupd</h1><p><a href=%q>Metrics</a></p></body></html>\n", o.telemetryPath)
		})
	}
	ln, err := net.Listen("tcp", o.listenAddress)
	if err != nil {
		a.Close()
		return fmt.Errorf("listening on %s: %w", o.listenAddress, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	webErr := make(chan error, 1)
	webFlags := &web.FlagConfig{WebConfigFile: &o.webConfigFile}
	go func() { webErr <- web.Serve(ln, srv, webFlags, log.With("component", "web")) }()
	log.Info("hangupd started", "version", versionString(), "web.listen-address", ln.Addr().String(),
		"socket.path", a.SocketPath())

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	agentErr := make(chan error, 1)
	go func() { agentErr <- a.Run(runCtx) }()
	capsErr := make(chan error, 1)
	go func() {
		select {
		case <-a.StartupDone():
			capsErr <- lowerCaps(log, o, func() error { _, err := probe.Stats(); return err })
		case <-runCtx.Done():
		}
	}()

	// The metrics endpoint stops first: scrapes read the probe, which the
	// agent closes when it stops.
	stopWeb := func() error {
		shutdownCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		return srv.Shutdown(shutdownCtx)
	}
	var result error
loop:
	for {
		select {
		case <-ctx.Done():
			log.Info("shutting down", "signal", context.Cause(ctx))
			if err := stopWeb(); err != nil {
				log.Warn("stopping the metrics endpoint", "err", err)
			}
			cancel()
			result = <-agentErr
		case err := <-agentErr:
			stopWeb()
			result = err
		case err := <-capsErr:
			capsErr = nil // a nil channel: this case is done
			if err == nil {
				continue
			}
			result = fmt.Errorf("dropping capabilities (--caps.drop=none keeps them): %w", err)
			stopWeb()
			cancel()
			<-agentErr
		case err := <-webErr:
			result = fmt.Errorf("metrics endpoint: %w", err)
			cancel()
			<-agentErr
		}
		break loop
	}
	if result == nil {
		log.Info("hangupd stopped")
	}
	return result
}

// lowerCaps applies --caps.drop and --caps.keep once the agent has started;
// check reads the probe's maps.
func lowerCaps(log *slog.Logger, o *options, check func() error) error {
	if o.capsDrop == "none" {
		pc, err := readCaps()
		if err != nil {
			return err
		}
		log.Info("capabilities kept (--caps.drop=none)", "component", "caps", "kept", pc.effective.String())
		return nil
	}
	extra, err := parseCaps(o.capsKeep)
	if err != nil {
		return fmt.Errorf("--caps.keep: %w", err)
	}
	err = dropCaps(log, capsNeeded(!o.noSeed)|extra, check)
	if errors.Is(err, errCgo) {
		log.Warn("capabilities kept", "component", "caps", "err", err)
		return nil
	}
	return err
}

func versionString() string {
	return agent.BuildVersion()
}
