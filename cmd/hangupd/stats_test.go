package main

import (
	"net"
	"strconv"
	"strings"
	"testing"
)

// sample returns the value of the series whose text-format line starts
// with series+" ", and whether it is there.
func sample(body, series string) (float64, bool) {
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f, err == nil
		}
	}
	return 0, false
}

// TestProbeStats runs hangupd with --probe.stats: each program's run count
// and run time are exported, and a connection this test opens and closes
// makes the state-change program's count grow (the counts are host-wide,
// so the test asserts growth, which its own connection guarantees, not a
// number). The statistics end with hangupd.
func TestProbeStats(t *testing.T) {
	d := startDaemon(t, "--probe.stats")
	url := "http://" + d.addr + "/metrics"
	const runs = `hangup_probe_program_runs_total{hook="inet_sock_set_state"}`
	const secs = `hangup_probe_program_run_seconds_total{hook="inet_sock_set_state"}`
	_, body := scrape(t, httpClient(), url, "", "")
	before, ok := sample(body, runs)
	if !ok {
		t.Fatalf("no %s in the scrape:\n%s", runs, body)
	}
	if !strings.Contains(body, `hangup_probe_program_runs_total{hook="tcp_receive_reset"}`) {
		t.Errorf("not every program is exported:\n%s", body)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	s.Close()

	_, body = scrape(t, httpClient(), url, "", "")
	after, _ := sample(body, runs)
	if after <= before {
		t.Errorf("%s: %v before a connection of the test, %v after", runs, before, after)
	}
	if v, ok := sample(body, secs); !ok || v <= 0 {
		t.Errorf("%s = %v, %v; want > 0", secs, v, ok)
	}
	if err := d.stop(t); err != nil {
		t.Errorf("hangupd exit after SIGTERM: %v", err)
	}
}
