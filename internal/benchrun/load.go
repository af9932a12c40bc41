package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hangup-io/hangup/internal/benchrun/agentproc"
)

const (
	measureKeepAlive = "keep-alive throughput vs bare net/http"
	measureClose     = "`Connection: close` throughput vs bare"
	measureAgentCPU  = "agent CPU per 100k closed connections, one subscriber"
)

// wrkResult is what one wrk run reports.
type wrkResult struct {
	rps      float64
	requests float64       // completed requests (each a connection, with Connection: close)
	errors   int           // socket errors and non-2xx responses
	cpu      time.Duration // the server's utime+stime over the run
}

// cpuPerRequest is the server's CPU time per completed request, in µs.
func (r wrkResult) cpuPerRequest() float64 {
	if r.requests == 0 {
		return 0
	}
	return r.cpu.Seconds() * 1e6 / r.requests
}

// loadServer runs wrk against s and also reads, from /proc, the CPU time
// s spent over the run: unlike throughput, that does not depend on how the
// scheduler shares a CPU between two servers.
func loadServer(ctx context.Context, cfg *config, s *server, d time.Duration, closeConns bool) (wrkResult, error) {
	c0, err := agentproc.ProcessCPU(s.pid())
	if err != nil {
		return wrkResult{}, err
	}
	r, err := runWrk(ctx, cfg, s.url(), d, closeConns)
	if err != nil {
		return r, err
	}
	c1, err := agentproc.ProcessCPU(s.pid())
	r.cpu = c1 - c0
	return r, err
}

var (
	wrkRPS    = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkTotal  = regexp.MustCompile(`(\d+) requests in `)
	wrkErrors = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	wrkNon2xx = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
)

// runWrk loads url for d with conns connections from one wrk thread pinned
// to cfg.loadCPU.
func runWrk(ctx context.Context, cfg *config, url string, d time.Duration, closeConns bool) (wrkResult, error) {
	args := []string{"wrk", "-t1", "-c" + strconv.Itoa(cfg.conns), "-d" + strconv.Itoa(int(d.Seconds())) + "s"}
	if closeConns {
		args = append(args, "-H", "Connection: close")
	}
	args = pinned(cfg.loadCPU, append(args, url)...)
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk: %w\n%s", err, out)
	}
	return parseWrk(string(out))
}

func parseWrk(out string) (wrkResult, error) {
	var r wrkResult
	m := wrkRPS.FindStringSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("no Requests/sec in wrk's output:\n%s", out)
	}
	r.rps, _ = strconv.ParseFloat(m[1], 64)
	if m := wrkTotal.FindStringSubmatch(out); m != nil {
		r.requests, _ = strconv.ParseFloat(m[1], 64)
	}
	if m := wrkErrors.FindStringSubmatch(out); m != nil {
		for _, s := range m[1:] {
			n, _ := strconv.Atoi(s)
			r.errors += n
		}
	}
	if m := wrkNon2xx.FindStringSubmatch(out); m != nil {
		n, _ := strconv.Atoi(m[1])
		r.errors += n
	}
	return r, nil
}

// Load methods (-method).
const (
	// Paired: both servers loaded at the same time, each by its own
	// wrk; they share the server CPU.
	methodPaired = "paired"
	// Interleaved: one server at a time with the CPU to itself, in the
	// order A B, then B A, and so on; a ratio pairs two adjacent runs.
	methodInterleaved = "interleaved"
)

// abRun loads a and b, at once or one after the other (b first on odd
// repetitions) as cfg.method says, and returns both results.
func abRun(ctx context.Context, cfg *config, rep int, a, b *server, d time.Duration, closeConns bool) (ra, rb wrkResult, err error) {
	if cfg.method == methodPaired {
		return pairedRun(ctx, cfg, a, b, d, closeConns)
	}
	first, second := &ra, &rb
	fs, ss := a, b
	if rep%2 == 1 {
		first, second, fs, ss = second, first, b, a
	}
	if *first, err = loadServer(ctx, cfg, fs, d, closeConns); err != nil {
		return ra, rb, err
	}
	*second, err = loadServer(ctx, cfg, ss, d, closeConns)
	return ra, rb, err
}

// pairedRun loads a and b at the same time, each with its own wrk, and
// returns both results.
func pairedRun(ctx context.Context, cfg *config, a, b *server, d time.Duration, closeConns bool) (ra, rb wrkResult, err error) {
	var wg sync.WaitGroup
	var errA, errB error
	wg.Add(2)
	go func() { defer wg.Done(); ra, errA = loadServer(ctx, cfg, a, d, closeConns) }()
	go func() { defer wg.Done(); rb, errB = loadServer(ctx, cfg, b, d, closeConns) }()
	wg.Wait()
	if errA != nil {
		return ra, rb, errA
	}
	return ra, rb, errB
}

// measureLoad runs, for each source, a bare and an httpx server side by
// side on the same CPU, and loads both at once with keep-alive and with
// Connection: close, cfg.reps times each, interleaved.
func measureLoad(ctx context.Context, cfg *config, b *build, rep *report) error {
	var agent *agentproc.Agent
	for _, src := range sources {
		rowsFor := func(note string) {
			for _, m := range []string{measureKeepAlive, measureClose} {
				rep.add(Row{Measure: m, Case: src, Target: loadTarget(m), Verdict: notMeasured, Note: note})
			}
		}
		if src != "epoll" && !isRoot() {
			rowsFor("needs root")
			continue
		}
		if src == "agent" {
			var err error
			if agent, err = startAgent(cfg, b); err != nil {
				rowsFor("hangupd did not start: " + err.Error())
				continue
			}
			defer agent.Stop()
		}
		bs, err := startServer(ctx, cfg, b, bare, agent)
		if err != nil {
			return err
		}
		hs, err := startServer(ctx, cfg, b, variant{"httpx", src}, agent)
		if err != nil {
			bs.stop()
			rowsFor(err.Error())
			continue
		}
		err = loadPair(ctx, cfg, bs, hs, agent, rep)
		bs.stop()
		hs.stop()
		if err != nil {
			return err
		}
		if err := profile(ctx, cfg, b, variant{"httpx", src}, agent, rep); err != nil {
			return err
		}
	}
	return nil
}

// cpuMeasure names the CPU-per-request row that goes with a throughput
// measure.
func cpuMeasure(measure string) string {
	if measure == measureKeepAlive {
		return "keep-alive CPU per request, bare ÷ httpx"
	}
	return "`Connection: close` CPU per request, bare ÷ httpx"
}

func loadTarget(measure string) string {
	if measure == measureKeepAlive {
		return "≥ 0.97×"
	}
	return "≥ 0.95×"
}

func loadPair(ctx context.Context, cfg *config, bs, hs *server, agent *agentproc.Agent, rep *report) error {
	src := hs.v.source
	// Warm both up (page cache, TCP memory, the probe's maps).
	if _, _, err := abRun(ctx, cfg, 0, bs, hs, time.Second, false); err != nil {
		return err
	}
	ratios := map[bool][]float64{}
	bareRPS := map[bool][]float64{}
	// CPU per request: the ratio bare/httpx (what throughput would be
	// on a CPU-bound server) and the difference in µs.
	cpuRatios, cpuAdded, bareCPU := map[bool][]float64{}, map[bool][]float64{}, map[bool][]float64{}
	errs := map[bool]int{}
	for i := range cfg.reps {
		for _, closeConns := range []bool{false, true} {
			rb, rh, err := abRun(ctx, cfg, i, bs, hs, cfg.duration, closeConns)
			if err != nil {
				return err
			}
			if rb.rps == 0 {
				return fmt.Errorf("bare server served nothing")
			}
			ratios[closeConns] = append(ratios[closeConns], rh.rps/rb.rps)
			bareRPS[closeConns] = append(bareRPS[closeConns], rb.rps)
			if cb, ch := rb.cpuPerRequest(), rh.cpuPerRequest(); cb > 0 && ch > 0 {
				cpuRatios[closeConns] = append(cpuRatios[closeConns], cb/ch)
				cpuAdded[closeConns] = append(cpuAdded[closeConns], ch-cb)
				bareCPU[closeConns] = append(bareCPU[closeConns], cb)
			}
			errs[closeConns] += rb.errors + rh.errors
			slog.Info("load run", "method", cfg.method, "source", src, "rep", i+1, "close", closeConns,
				"bare_rps", int(rb.rps), "httpx_rps", int(rh.rps), "ratio", fmt.Sprintf("%.3f", rh.rps/rb.rps),
				"bare_cpu_us", fmt.Sprintf("%.2f", rb.cpuPerRequest()), "httpx_cpu_us", fmt.Sprintf("%.2f", rh.cpuPerRequest()))
		}
	}
	for _, closeConns := range []bool{false, true} {
		m := measureKeepAlive
		if closeConns {
			m = measureClose
		}
		target := 0.97
		if closeConns {
			target = 0.95
		}
		s := summarize(ratios[closeConns])
		row := Row{Measure: m, Case: src, Target: loadTarget(m), Unit: "×", Stats: &s,
			Value:   fmt.Sprintf("%.2f× (%.2f–%.2f)", s.Median, s.Min, s.Max),
			Verdict: verdict(s.Median >= target),
			Note: fmt.Sprintf("%d %s A/B pairs of %s runs, wrk -t1 -c%d; bare median %.0f req/s on this machine",
				s.N, cfg.method, cfg.duration, cfg.conns, summarize(bareRPS[closeConns]).Median)}
		if errs[closeConns] > 0 {
			row.Note += fmt.Sprintf("; %d wrk errors", errs[closeConns])
		}
		rep.add(row)
		if len(cpuRatios[closeConns]) > 0 {
			cs, add, base := summarize(cpuRatios[closeConns]), summarize(cpuAdded[closeConns]), summarize(bareCPU[closeConns])
			rep.add(Row{Measure: cpuMeasure(m), Case: src, Target: loadTarget(m), Unit: "×", Stats: &cs,
				Values:  map[string]float64{"added_us_median": add.Median, "bare_us_median": base.Median},
				Value:   fmt.Sprintf("%.2f× (%.2f–%.2f), %+.2f µs per request", cs.Median, cs.Min, cs.Max, add.Median),
				Verdict: verdict(cs.Median >= target),
				Note: fmt.Sprintf("the same %d %s pairs: the server's utime+stime (/proc, 10 ms ticks) per request served, "+
					"bare ÷ httpx (the throughput a CPU-bound server keeps); bare median %.2f µs per request", cs.N, cfg.method, base.Median)})
		}
	}
	if agent != nil {
		return agentCPU(ctx, cfg, hs, agent, rep)
	}
	return nil
}

// agentCPU loads the agent-watched server alone with closed connections
// and divides hangupd's CPU time by the connections served. The agent's
// probe sees every server socket on the host, so an idle window of the
// same length just before each run measures what the rest of the host
// costs it; the row subtracts it.
func agentCPU(ctx context.Context, cfg *config, hs *server, agent *agentproc.Agent, rep *report) error {
	var net, raw, idle []float64
	for range min(cfg.reps, 3) {
		c0, err := agent.CPUTime()
		if err != nil {
			return err
		}
		select {
		case <-time.After(cfg.duration):
		case <-ctx.Done():
			return ctx.Err()
		}
		c1, err := agent.CPUTime()
		if err != nil {
			return err
		}
		r, err := runWrk(ctx, cfg, hs.url(), cfg.duration, true)
		if err != nil {
			return err
		}
		c2, err := agent.CPUTime()
		if err != nil {
			return err
		}
		if r.requests == 0 {
			return fmt.Errorf("the agent-watched server served nothing")
		}
		per := func(d time.Duration) float64 { return d.Seconds() / r.requests * 1e5 }
		raw = append(raw, per(c2-c1))
		idle = append(idle, per(c1-c0))
		net = append(net, per((c2-c1)-(c1-c0)))
	}
	s := summarize(net)
	rep.add(Row{Measure: measureAgentCPU, Case: "real hangupd, wrk Connection: close", Target: "≤ 1 CPU-second",
		Unit: "CPU-s", Stats: &s, Verdict: verdict(s.Median <= 1),
		Values: map[string]float64{"raw_median": summarize(raw).Median, "idle_median": summarize(idle).Median},
		Value:  fmt.Sprintf("%.2f s (%.2f–%.2f)", s.Median, s.Min, s.Max),
		Note: fmt.Sprintf("%d runs of %s; hangupd's utime+stime (10 ms ticks) over the connections served, "+
			"minus an idle window of the same length (the rest of the host's sockets): raw median %.2f s, idle %.2f s",
			s.N, cfg.duration, summarize(raw).Median, summarize(idle).Median)})
	return nil
}

func isRoot() bool { return os.Geteuid() == 0 }

// cut trims a long error for a table cell.
func cut(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 200 {
		s = s[:200] + "…"
	}
	return s
}

// profile loads the httpx server of one source alone with keep-alive
// requests while it writes a CPU profile, and keeps pprof's top functions
// for the report: what costs the time where a target is missed.
func profile(ctx context.Context, cfg *config, b *build, v variant, agent *agentproc.Agent, rep *report) error {
	path := filepath.Join(b.dir, "cpu-"+v.String()+".pprof")
	s, err := startServer(ctx, cfg, b, v, agent, "--cpuprofile="+path)
	if err != nil {
		return err
	}
	_, err = runWrk(ctx, cfg, s.url(), cfg.duration, false)
	s.stop()
	if err != nil {
		return err
	}
	var tops []string
	for _, args := range [][]string{
		{"-top", "-nodecount=12"},
		{"-top", "-cum", "-nodecount=15", "-show=github.com/hangup-io/"},
	} {
		args = append(append([]string{"tool", "pprof"}, args...), b.server, path)
		out, err := exec.CommandContext(ctx, "go", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("go tool pprof: %w\n%s", err, out)
		}
		tops = append(tops, trimPprof(string(out)))
	}
	rep.Profiles = append(rep.Profiles, Profile{Source: v.source, Top: strings.Join(tops, "\n\n")})
	return nil
}

// trimPprof drops pprof's header lines up to the summary.
func trimPprof(out string) string {
	if i := strings.Index(out, "Showing nodes"); i >= 0 {
		out = out[i:]
	}
	return strings.TrimSpace(out)
}
