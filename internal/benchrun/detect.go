package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const (
	measureDetect  = "detection latency p50 (p90), client action → handler ctx done"
	measureBinary  = "binary growth of a server linking httpx (agent/epoll) over client_golang alone"
	measureDrop    = "silent drop noticed"
	detectCaseList = "fin/body-read fin/body-unread rst/body-read rst/body-unread"
)

// measureDetection runs httpx BenchmarkDetect: plain net/http first, as
// the baseline of every source's row.
func measureDetection(ctx context.Context, cfg *config, b *build, rep *report) error {
	o := goBench(ctx, "./httpx/", "-bench", "^BenchmarkDetect$", "-benchtime="+strconv.Itoa(cfg.detectTrials)+"x")
	for _, src := range []string{"nethttp", "epoll", "bpf", "agent"} {
		for _, c := range strings.Fields(detectCaseList) {
			name := "BenchmarkDetect/" + src + "/" + c
			row := Row{Measure: measureDetect, Case: src + ", " + c, Target: "≤ 0.1 ms; never slower than net/http where it notices"}
			if src == "nethttp" {
				row.Case, row.Target = "plain net/http, "+c, "baseline"
			}
			missedPct := o.all(name, "missed-%")
			if len(missedPct) == 0 {
				row.Verdict, row.Note = notMeasured, o.why(name)
				rep.add(row)
				continue
			}
			p50, ok50 := first(o.all(name, "p50-us"))
			p90, ok90 := first(o.all(name, "p90-us"))
			row.Unit = "µs"
			row.Values = map[string]float64{"missed_pct": missedPct[0]}
			if ok50 {
				row.Values["p50_us"] = p50
			}
			if ok90 {
				row.Values["p90_us"] = p90
			}
			row.Value = fmt.Sprintf("%s (%s)", latency(p50, ok50), latency(p90, ok90))
			if missedPct[0] > 0 {
				row.Note = fmt.Sprintf("%.0f%% of trials saw nothing within the bound (250 ms)", missedPct[0])
			}
			if src == "nethttp" {
				row.Verdict = listed
				rep.add(row)
				continue
			}
			base, baseOK := first(o.all("BenchmarkDetect/nethttp/"+c, "p50-us"))
			ok := ok50 && p50 <= 100
			if ok && baseOK && p50 > base {
				ok = false
				row.Note = strings.TrimPrefix(row.Note+fmt.Sprintf("; slower than net/http's %.1f µs", base), "; ")
			}
			row.Verdict = verdict(ok)
			rep.add(row)
		}
	}
	return nil
}

func first(vs []float64) (float64, bool) {
	if len(vs) == 0 {
		return 0, false
	}
	return vs[0], true
}

func latency(us float64, ok bool) string {
	switch {
	case !ok:
		return "never"
	case us >= 1000:
		return fmt.Sprintf("%.2f ms", us/1000)
	}
	return fmt.Sprintf("%.1f µs", us)
}

// measureBinarySize builds the two hello-world servers stripped.
func measureBinarySize(ctx context.Context, cfg *config, b *build, rep *report) error {
	sizes := map[string]float64{}
	for _, name := range []string{"prom", "httpx"} {
		out := filepath.Join(b.dir, "hello-"+name)
		if err := goBuild(out, "./internal/benchrun/hello/"+name, "-trimpath", "-ldflags=-s -w"); err != nil {
			return err
		}
		fi, err := os.Stat(out)
		if err != nil {
			return err
		}
		sizes[name+"_mb"] = float64(fi.Size()) / 1e6
	}
	growth := sizes["httpx_mb"] - sizes["prom_mb"]
	sizes["growth_mb"] = growth
	rep.add(Row{Measure: measureBinary, Case: "hello world, go build -ldflags='-s -w'", Target: "≤ 0.5 MB stripped",
		Unit: "MB", Values: sizes, Verdict: verdict(growth <= 0.5),
		Value: fmt.Sprintf("+%.2f MB (%.2f → %.2f MB)", growth, sizes["prom_mb"], sizes["httpx_mb"]),
		Note:  "internal/benchrun/hello/prom (client_golang alone) vs hello/httpx (client_golang + httpx, default source, no bpf import)"})
	return nil
}

// measureSilentDrop runs httpx BenchmarkSilentDrop.
func measureSilentDrop(ctx context.Context, cfg *config, b *build, rep *report) error {
	o := goBench(ctx, "./httpx/", "-bench", "^BenchmarkSilentDrop$", "-benchtime=5x")
	for _, src := range []string{"epoll", "bpf"} {
		for _, d := range []time.Duration{2 * time.Second, 3 * time.Second, 5 * time.Second} {
			name := "BenchmarkSilentDrop/" + src + "/" + d.String()
			row := Row{Measure: measureDrop, Case: fmt.Sprintf("%s, DropTimeout %s, link cut after the request", src, d), Target: "≤ DropTimeout"}
			missedPct, ok := first(o.all(name, "missed-%"))
			if !ok {
				row.Verdict, row.Note = notMeasured, o.why(name)
				rep.add(row)
				continue
			}
			p50, ok50 := first(o.all(name, "p50-s"))
			mx, okMax := first(o.all(name, "max-s"))
			row.Unit = "s"
			row.Values = map[string]float64{"missed_pct": missedPct, "p50_s": p50, "max_s": mx}
			if missedPct > 0 || !okMax {
				row.Value = fmt.Sprintf("%.0f%% never noticed within %s", missedPct, 3*d)
				row.Verdict = missed
			} else {
				row.Value = fmt.Sprintf("max %.2f s (p50 %.2f s) = %.2f× DropTimeout", mx, p50, mx/d.Seconds())
				row.Verdict = verdict(ok50 && mx <= d.Seconds())
			}
			row.Note = "5 trials, a new connection each"
			rep.add(row)
		}
	}
	return nil
}
