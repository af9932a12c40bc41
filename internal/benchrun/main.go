// Command benchrun is `make bench`: it measures hangup against its
// baselines in one run and writes the table of issue 7's targets to
// docs/benchmarks.md and docs/benchmarks.json, with the machine's
// description.
//
// Every throughput figure is a ratio to bare net/http measured at the same
// time on the same CPU (paired runs, each server with its own wrk), over
// several repetitions: the table gives the median and the range of the
// ratios, never a lone absolute figure. Run it as root from the module's
// root; it builds what it runs (the bench server, hangupd, the test
// binaries) and needs wrk and strace (the Makefile installs them).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"
)

// config is what the flags set.
type config struct {
	out, jsonOut string
	reps         int
	duration     time.Duration
	conns        int
	method       string // methodInterleaved or methodPaired
	syscallConns int
	detectTrials int
	count        int // -count of the go benchmarks
	quick        bool
	only         []string
	serverCPU    string // taskset list for servers and the agent; empty: no pinning
	loadCPU      string // taskset list for the load generators
}

// sections in the order they run; -only picks some.
var sections = []string{"load", "syscalls", "gobench", "detect", "binsize", "drop"}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "benchrun:", err)
		os.Exit(1)
	}
}

func run() error {
	var cfg config
	var only string
	flag.StringVar(&cfg.out, "out", "docs/benchmarks.md", "the Markdown table to write")
	flag.StringVar(&cfg.jsonOut, "json", "docs/benchmarks.json", "the JSON results to write")
	flag.IntVar(&cfg.reps, "reps", 5, "repetitions of every paired load run")
	flag.DurationVar(&cfg.duration, "duration", 5*time.Second, "length of one load run")
	flag.StringVar(&cfg.method, "method", methodInterleaved, "load runs: paired (both servers at once on the same CPU) or interleaved (one at a time, A B B A ...)")
	flag.IntVar(&cfg.conns, "conns", 32, "wrk connections per server")
	flag.IntVar(&cfg.syscallConns, "syscall-conns", 2000, "closed connections traced for the syscall count")
	flag.IntVar(&cfg.count, "count", 5, "repetitions (-count) of the go benchmarks")
	flag.IntVar(&cfg.detectTrials, "detect-trials", 200, "trials per detection latency case")
	flag.BoolVar(&cfg.quick, "quick", os.Getenv("BENCH_QUICK") == "1", "skip the silent-drop measurement (minutes of wall time); BENCH_QUICK=1 sets it")
	flag.StringVar(&only, "only", "", "comma-separated sections to run ("+strings.Join(sections, ",")+"); empty: all")
	flag.Parse()
	if only != "" {
		for _, s := range strings.Split(only, ",") {
			if !slices.Contains(sections, s) {
				return fmt.Errorf("-only: unknown section %q (have %s)", s, strings.Join(sections, ","))
			}
			cfg.only = append(cfg.only, s)
		}
	}
	if cfg.method != methodInterleaved && cfg.method != methodPaired {
		return fmt.Errorf("-method: %q is neither %s nor %s", cfg.method, methodInterleaved, methodPaired)
	}
	if cfg.reps < 1 || cfg.duration <= 0 || cfg.conns < 1 || cfg.syscallConns < 1 || cfg.detectTrials < 1 || cfg.count < 1 {
		return fmt.Errorf("-reps, -duration, -conns, -syscall-conns, -detect-trials and -count must be positive")
	}
	if _, err := os.Stat("internal/benchrun"); err != nil {
		return fmt.Errorf("run from the module's root (make bench): %w", err)
	}
	if os.Geteuid() != 0 {
		slog.Warn("not root: the bpf and agent sources, strace and the network namespaces need root; those rows will say not measured")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	start := time.Now()
	mach := describeMachine()
	if mach.CPUs >= 2 {
		cfg.serverCPU, cfg.loadCPU = "0", "1"
	}
	slog.Info("machine", "cpu", mach.CPU, "cpus", mach.CPUs, "kernel", mach.Kernel, "go", mach.Go)

	b, err := newBuild()
	if err != nil {
		return err
	}
	defer b.cleanup()

	rep := &report{Machine: mach, Started: start.UTC()}
	want := func(s string) bool { return len(cfg.only) == 0 || slices.Contains(cfg.only, s) }
	steps := []struct {
		name string
		fn   func(context.Context, *config, *build, *report) error
	}{
		{"load", measureLoad},
		{"syscalls", measureSyscalls},
		{"gobench", measureGoBench},
		{"detect", measureDetection},
		{"binsize", measureBinarySize},
		{"drop", measureSilentDrop},
	}
	for _, st := range steps {
		if !want(st.name) {
			continue
		}
		if st.name == "drop" && cfg.quick {
			rep.add(Row{Measure: measureDrop, Case: "DropTimeout 2s, 3s, 5s", Target: "≤ DropTimeout",
				Verdict: notMeasured, Note: "skipped (BENCH_QUICK=1)"})
			continue
		}
		t0 := time.Now()
		slog.Info("measuring", "section", st.name)
		if err := st.fn(ctx, &cfg, b, rep); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("%s: %w", st.name, err)
		}
		rep.Sections = append(rep.Sections, Section{Name: st.name, Seconds: time.Since(t0).Seconds()})
	}
	rep.Seconds = time.Since(start).Seconds()
	rep.Machine.LoadEnd = loadAvg()
	rep.Quick = cfg.quick
	rep.Only = cfg.only
	rep.Config = fmt.Sprintf("method=%s reps=%d duration=%s conns=%d syscall-conns=%d detect-trials=%d count=%d server-cpu=%q load-cpu=%q",
		cfg.method, cfg.reps, cfg.duration, cfg.conns, cfg.syscallConns, cfg.detectTrials, cfg.count, cfg.serverCPU, cfg.loadCPU)
	if err := rep.write(cfg.out, cfg.jsonOut); err != nil {
		return err
	}
	slog.Info("done", "took", time.Since(start).Round(time.Second), "table", cfg.out, "json", cfg.jsonOut)
	return nil
}
