package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/internal/benchrun/agentproc"
)

const measureSyscallsName = "syscalls per connection (strace)"

// measureSyscalls traces each server variant while it serves a fixed
// number of closed connections.
func measureSyscalls(ctx context.Context, cfg *config, b *build, rep *report) error {
	if !isRoot() {
		rep.add(Row{Measure: measureSyscallsName, Case: "bare and every source", Target: "≤ 1 dup; listed against bare",
			Verdict: notMeasured, Note: "strace -p needs root (ptrace)"})
		return nil
	}
	if _, err := exec.LookPath("strace"); err != nil {
		rep.add(Row{Measure: measureSyscallsName, Case: "bare and every source", Target: "≤ 1 dup; listed against bare",
			Verdict: notMeasured, Note: "strace is not installed"})
		return nil
	}
	var agent *agentproc.Agent
	var bareCalls float64
	for _, v := range variants {
		if v.source == "agent" {
			var err error
			if agent, err = startAgent(cfg, b); err != nil {
				rep.add(Row{Measure: measureSyscallsName, Case: v.String(), Target: "≤ 1 dup", Verdict: notMeasured, Note: cut(err.Error())})
				continue
			}
			defer agent.Stop()
		}
		s, err := startServer(ctx, cfg, b, v, agent)
		if err != nil {
			rep.add(Row{Measure: measureSyscallsName, Case: v.String(), Target: "≤ 1 dup", Verdict: notMeasured, Note: cut(err.Error())})
			continue
		}
		counts, err := traceServer(ctx, cfg, b, s)
		s.stop()
		if err != nil {
			return err
		}
		n := float64(cfg.syscallConns)
		total, dups := 0.0, 0.0
		for name, c := range counts {
			total += c
			if name == dupCall {
				dups += c
			}
		}
		row := Row{Measure: measureSyscallsName, Case: v.String(), Unit: "syscalls",
			Values: map[string]float64{"syscalls_per_conn": total / n, "dups_per_conn": dups / n}}
		if v == bare {
			bareCalls = total / n
			row.Target = "baseline"
			row.Verdict = listed
			row.Value = fmt.Sprintf("%.1f syscalls, %.2f dups", total/n, dups/n)
		} else {
			row.Target = "≤ 1 dup; listed against bare"
			row.Verdict = verdict(dups/n <= 1)
			row.Value = fmt.Sprintf("%.1f syscalls (bare %.1f, %+.1f), %.2f dups", total/n, bareCalls, total/n-bareCalls, dups/n)
		}
		row.Note = fmt.Sprintf("%d connections; most frequent: %s", cfg.syscallConns, topCalls(counts, n, 8))
		rep.add(row)
	}
	return nil
}

// dupCall is the name counted for every duplication of a descriptor.
const dupCall = "dup*"

// traceServer attaches strace to s, makes cfg.syscallConns requests on
// new connections and returns the count of each syscall.
func traceServer(ctx context.Context, cfg *config, b *build, s *server) (map[string]float64, error) {
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	get := func() error {
		resp, err := client.Get(s.url())
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		return resp.Body.Close()
	}
	for range 200 { // warm up outside the trace
		if err := get(); err != nil {
			return nil, fmt.Errorf("%s server: %w", s.v, err)
		}
	}
	out := filepath.Join(b.dir, "strace-"+s.v.String())
	cmd := exec.CommandContext(ctx, "strace", "-f", "-qq", "-o", out, "-p", fmt.Sprint(s.pid()))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("strace: %w", err)
	}
	// strace -p attaches to each thread in turn; give it time.
	time.Sleep(time.Second)
	for range cfg.syscallConns {
		if err := get(); err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, fmt.Errorf("%s server under strace: %w", s.v, err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	cmd.Process.Signal(syscall.SIGINT)
	if err := cmd.Wait(); err != nil && !isSignal(err) {
		return nil, fmt.Errorf("strace: %w: %s", err, stderr.String())
	}
	f, err := os.Open(out)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return countSyscalls(f)
}

func isSignal(err error) bool {
	ee, ok := err.(*exec.ExitError)
	return ok && !ee.Exited()
}

// straceLine matches "PID name(" at the start of a line of strace -f -o.
var straceLine = regexp.MustCompile(`^\d+\s+([a-z_0-9]+)\(`)

// countSyscalls counts the syscalls in an strace -f output: each call once
// (an interrupted one shows again as "<... name resumed>", not counted).
// Duplications of a descriptor count under dupCall.
func countSyscalls(r io.Reader) (map[string]float64, error) {
	counts := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		m := straceLine.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		name := m[1]
		switch {
		case name == "dup" || name == "dup2" || name == "dup3",
			name == "fcntl" && strings.Contains(l, "F_DUPFD"):
			name = dupCall
		}
		counts[name]++
	}
	return counts, sc.Err()
}

func topCalls(counts map[string]float64, n float64, k int) string {
	names := make([]string, 0, len(counts))
	for name := range counts {
		names = append(names, name)
	}
	slices.SortFunc(names, func(a, b string) int {
		if counts[a] != counts[b] {
			if counts[a] > counts[b] {
				return -1
			}
			return 1
		}
		return strings.Compare(a, b)
	})
	var parts []string
	for _, name := range names[:min(k, len(names))] {
		parts = append(parts, fmt.Sprintf("%s %.2f", name, counts[name]/n))
	}
	return strings.Join(parts, ", ")
}
