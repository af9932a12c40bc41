package main

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
)

const (
	measureOverhead = "added per request, handler using no State feature (go bench)"
	measureFeature  = "what Finish, a time limit, WaitDelivered cost when used"
	measureChurn    = "loopback connection churn with the probe vs without"
)

// benchResult is one line of `go test -bench` output.
type benchResult struct {
	name    string // without the -GOMAXPROCS suffix
	metrics map[string]float64
}

// benchOutput is what one `go test -bench` run printed.
type benchOutput struct {
	results []benchResult
	skips   map[string]string // benchmark → why it skipped
	failed  string            // non-empty when go test failed: the tail of its output
}

var (
	benchLine = regexp.MustCompile(`^(Benchmark\S*?)(?:-\d+)?\s+(\d+)\s+(.*)$`)
	skipLine  = regexp.MustCompile(`^\s*--- SKIP: (Benchmark\S+)`)
	// The reason follows the SKIP line, indented: "    file.go:12: why".
	reasonLine = regexp.MustCompile(`^\s+\S+\.go:\d+: (.*)$`)
)

func parseBench(out string) benchOutput {
	o := benchOutput{skips: map[string]string{}}
	var lastSkip string
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if m := skipLine.FindStringSubmatch(l); m != nil {
			lastSkip = m[1]
			o.skips[lastSkip] = "skipped"
			continue
		}
		if m := reasonLine.FindStringSubmatch(l); m != nil && lastSkip != "" {
			o.skips[lastSkip] = m[1]
			lastSkip = ""
			continue
		}
		lastSkip = ""
		m := benchLine.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		r := benchResult{name: m[1], metrics: map[string]float64{}}
		f := strings.Fields(m[3])
		for i := 0; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				break
			}
			r.metrics[f[i+1]] = v
		}
		o.results = append(o.results, r)
	}
	return o
}

// all returns the values of metric unit of every result named name, in
// output order (one per -count repetition).
func (o benchOutput) all(name, unit string) []float64 {
	var vs []float64
	for _, r := range o.results {
		if v, ok := r.metrics[unit]; ok && r.name == name {
			vs = append(vs, v)
		}
	}
	return vs
}

// why says why nothing was measured for a benchmark name (or prefix).
func (o benchOutput) why(prefix string) string {
	for name, reason := range o.skips {
		if strings.HasPrefix(name, prefix) || strings.HasPrefix(prefix, name) {
			return "skipped: " + reason
		}
	}
	if o.failed != "" {
		return "go test failed: " + o.failed
	}
	return "benchmark not present"
}

// goBench runs go test -bench in pkg (from the module root) and parses it.
func goBench(ctx context.Context, pkg string, args ...string) benchOutput {
	args = append([]string{"test", "-run", "^$", "-timeout", "30m"}, append(args, pkg)...)
	slog.Info("go " + strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Env = append(os.Environ(), "HANGUP_REQUIRE_BPF=")
	out, err := cmd.CombinedOutput()
	o := parseBench(string(out))
	if err != nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		o.failed = strings.Join(lines[max(0, len(lines)-3):], " / ")
		slog.Warn("go test failed", "pkg", pkg, "err", err, "output", string(out))
	}
	return o
}

// diffs pairs the i-th values of a and b and returns b[i]-a[i].
func diffs(a, b []float64) []float64 {
	var d []float64
	for i := range min(len(a), len(b)) {
		d = append(d, b[i]-a[i])
	}
	return d
}

func ratios(base, x []float64) []float64 {
	var r []float64
	for i := range min(len(base), len(x)) {
		if base[i] != 0 {
			r = append(r, x[i]/base[i])
		}
	}
	return r
}

func measureGoBench(ctx context.Context, cfg *config, b *build, rep *report) error {
	count := "-count=" + strconv.Itoa(cfg.count)
	hx := goBench(ctx, "./httpx/", "-bench", "^(BenchmarkOverhead|BenchmarkFeatureCost)$", "-benchmem", count)
	for _, c := range []struct{ sub, what string }{
		{"direct", "handler called directly"},
		{"server", "loopback server, keep-alive client"},
	} {
		bareName, hxName := "BenchmarkOverhead/"+c.sub+"/bare", "BenchmarkOverhead/"+c.sub+"/httpx"
		ns := summarize(diffs(hx.all(bareName, "ns/op"), hx.all(hxName, "ns/op")))
		allocs := summarize(diffs(hx.all(bareName, "allocs/op"), hx.all(hxName, "allocs/op")))
		row := Row{Measure: measureOverhead, Case: c.what, Target: "≤ 1 µs and ≤ 2 allocs"}
		if ns.N == 0 {
			row.Verdict, row.Note = notMeasured, hx.why(hxName)
			rep.add(row)
			continue
		}
		row.Unit, row.Stats = "ns", &ns
		row.Values = map[string]float64{"added_ns": ns.Median, "added_allocs": allocs.Median,
			"bare_ns": summarize(hx.all(bareName, "ns/op")).Median}
		row.Value = added(ns, allocs)
		row.Verdict = verdict(ns.Median <= 1000 && allocs.Median <= 2)
		row.Note = fmt.Sprintf("httpx − bare from the same BenchmarkOverhead run, %d repetitions; bare %.2f µs/op",
			ns.N, row.Values["bare_ns"]/1e3)
		rep.add(row)
	}
	featureRows(hx, rep)

	ag := goBench(ctx, "./agent/", "-bench", ".", "-benchmem", "-count="+strconv.Itoa(min(cfg.count, 3)))
	agentGoBench(ag, rep)

	if !isRoot() {
		rep.add(Row{Measure: measureChurn, Case: "bpf BenchmarkConnectionChurn", Target: "≥ 0.90×", Verdict: notMeasured, Note: "needs root"})
		return nil
	}
	ch := goBench(ctx, "./bpf/", "-bench", "^BenchmarkConnectionChurn$", count)
	for _, v := range []struct{ sub, what string }{
		{"probe", "default options (every client-gone event wakes the reader)"},
		{"probe_wake_watched", "as hangupd loads it (WakeWatchedOnly: only subscribers' ports wake it)"},
		{"own_probe", "as an httpx server loaded it before WakeBusyOnly (WatchedOnly, its port watched: every client's FIN wakes it)"},
		{"own_probe_wake_busy", "as an httpx server loads it (WatchedOnly, its port watched, WakeBusyOnly: a FIN wakes it only with a request in flight, here none)"},
	} {
		name := "BenchmarkConnectionChurn/" + v.sub
		r := summarize(ratios(ch.all("BenchmarkConnectionChurn/baseline", "conns/s"), ch.all(name, "conns/s")))
		row := Row{Measure: measureChurn, Case: "bpf BenchmarkConnectionChurn/" + v.sub, Target: "≥ 0.90×"}
		if r.N == 0 {
			row.Verdict, row.Note = notMeasured, ch.why(name)
		} else {
			row.Unit, row.Stats, row.Verdict = "×", &r, verdict(r.Median >= 0.90)
			row.Value = fmt.Sprintf("%.2f× (%.2f–%.2f)", r.Median, r.Min, r.Max)
			bpfNS := summarize(ch.all(name, "bpf-ns/conn"))
			row.Note = fmt.Sprintf("probe with %s ÷ baseline conns/s, %d interleaved repetitions", v.what, r.N)
			if bpfNS.N > 0 {
				row.Note += fmt.Sprintf("; BPF time %.1f µs per connection", bpfNS.Median/1e3)
			}
		}
		rep.add(row)
	}
	return nil
}

// agentGoBench reports every agent benchmark metric per 100k connections
// that is a CPU time (cpu-ms/100k-conns today).
func agentGoBench(o benchOutput, rep *report) {
	found := false
	seen := map[string]bool{}
	for _, r := range o.results {
		for unit := range r.metrics {
			key := r.name + " " + unit
			scale, ok := cpuUnit(unit)
			if !ok || seen[key] {
				continue
			}
			seen[key] = true
			found = true
			vs := o.all(r.name, unit)
			for i := range vs {
				vs[i] *= scale
			}
			s := summarize(vs)
			rep.add(Row{Measure: measureAgentCPU, Case: "go bench " + r.name, Target: "≤ 1 CPU-second",
				Unit: "CPU-s", Stats: &s, Verdict: verdict(s.Median <= 1),
				Value: fmt.Sprintf("%.2f s (%.2f–%.2f)", s.Median, s.Min, s.Max),
				Note:  fmt.Sprintf("metric %s, %d repetitions (pipeline in process, no kernel)", unit, s.N)})
		}
	}
	if !found {
		rep.add(Row{Measure: measureAgentCPU, Case: "go bench (./agent)", Target: "≤ 1 CPU-second",
			Verdict: notMeasured, Note: "no agent benchmark reports a cpu-…/100k metric; " + o.why("BenchmarkPipeline")})
	}
}

// cpuUnit recognises a CPU time per 100k connections and returns its
// factor to seconds.
func cpuUnit(unit string) (float64, bool) {
	if !strings.HasPrefix(unit, "cpu-") || !strings.Contains(unit, "/100k") {
		return 0, false
	}
	switch strings.TrimPrefix(strings.SplitN(unit, "/", 2)[0], "cpu-") {
	case "s":
		return 1, true
	case "ms":
		return 1e-3, true
	case "us", "µs":
		return 1e-6, true
	case "ns":
		return 1e-9, true
	}
	return 0, false
}

// featureRows lists BenchmarkFeatureCost: each feature's cost over the
// plain httpx request of the same run.
func featureRows(o benchOutput, rep *report) {
	base := "BenchmarkFeatureCost/none"
	if len(o.all(base, "ns/op")) == 0 {
		rep.add(Row{Measure: measureFeature, Case: "Finish, SetTimeLimit, WaitDelivered", Target: "listed",
			Verdict: notMeasured, Note: o.why("BenchmarkFeatureCost")})
		return
	}
	seen := map[string]bool{}
	for _, r := range o.results {
		feat, ok := strings.CutPrefix(r.name, "BenchmarkFeatureCost/")
		if !ok || r.name == base || seen[r.name] {
			continue
		}
		seen[r.name] = true
		ns := summarize(diffs(o.all(base, "ns/op"), o.all(r.name, "ns/op")))
		allocs := summarize(diffs(o.all(base, "allocs/op"), o.all(r.name, "allocs/op")))
		rep.add(Row{Measure: measureFeature, Case: feat, Target: "listed", Verdict: listed, Unit: "ns", Stats: &ns,
			Values: map[string]float64{"added_ns": ns.Median, "added_allocs": allocs.Median},
			Value:  added(ns, allocs),
			Note: fmt.Sprintf("over a plain httpx request through a loopback keep-alive server, %d repetitions; "+
				"ns/op is wall time per request, waits included", ns.N)})
	}
}

// added formats a cost over a baseline: the median and range of the added
// time, and the median added allocations.
func added(ns, allocs Stats) string {
	return fmt.Sprintf("%+.2f µs (%+.2f to %+.2f), %+.0f allocs", ns.Median/1e3, ns.Min/1e3, ns.Max/1e3, allocs.Median)
}
