package main

import (
	"strings"
	"testing"
)

func TestParseWrk(t *testing.T) {
	out := `Running 5s test @ http://127.0.0.1:40001/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  400.00us   9.00ms   80.00%
    Req/Sec    26.50k     1.20k   28.00k    70.00%
  132400 requests in 5.00s, 16.29MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:  26478.51
Transfer/sec:      3.26MB
`
	r, err := parseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.rps != 26478.51 || r.requests != 132400 || r.errors != 10 {
		t.Errorf("got %+v, want 26478.51 req/s, 132400 requests, 10 errors", r)
	}
	if _, err := parseWrk("unable to connect to 127.0.0.1:1 Connection refused\n"); err == nil {
		t.Error("no error for wrk output without Requests/sec")
	}
}

func TestParseBench(t *testing.T) {
	out := `goos: linux
BenchmarkOverhead/direct/bare-2         	52113270	        22.61 ns/op	       0 B/op	       0 allocs/op
BenchmarkOverhead/direct/httpx-2        	  571200	      2103 ns/op	    1234 B/op	      14 allocs/op
BenchmarkOverhead/direct/bare-2         	52113270	        24.00 ns/op	       0 B/op	       0 allocs/op
BenchmarkDetect/nethttp/fin/body-unread-2       	      20	  62789116 ns/op	       100.0 missed-%
BenchmarkDetect/epoll/rst/body-read-2           	      20	    133747 ns/op	        59.88 max-us	         0 missed-%	        18.48 p50-us
--- SKIP: BenchmarkDetect/bpf
    detect_bench_test.go:181: the bpf source needs root (CAP_BPF, CAP_PERFMON)
BenchmarkPipeline100kClosed 	       3	 40000000 ns/op	        70.5 cpu-ms/100k-conns
PASS
`
	o := parseBench(out)
	if got := o.all("BenchmarkOverhead/direct/bare", "ns/op"); len(got) != 2 || got[0] != 22.61 || got[1] != 24 {
		t.Errorf("direct/bare ns/op = %v, want [22.61 24]", got)
	}
	if got := o.all("BenchmarkOverhead/direct/httpx", "allocs/op"); len(got) != 1 || got[0] != 14 {
		t.Errorf("direct/httpx allocs/op = %v, want [14]", got)
	}
	if got := o.all("BenchmarkDetect/nethttp/fin/body-unread", "p50-us"); len(got) != 0 {
		t.Errorf("p50 of a case that never noticed = %v, want none", got)
	}
	if got := o.all("BenchmarkDetect/epoll/rst/body-read", "p50-us"); len(got) != 1 || got[0] != 18.48 {
		t.Errorf("epoll p50 = %v, want [18.48]", got)
	}
	if got := o.all("BenchmarkPipeline100kClosed", "cpu-ms/100k-conns"); len(got) != 1 || got[0] != 70.5 {
		t.Errorf("pipeline = %v, want [70.5] (a name without -GOMAXPROCS suffix)", got)
	}
	if why := o.why("BenchmarkDetect/bpf/fin/body-read"); !strings.Contains(why, "needs root") {
		t.Errorf("why = %q, want the skip reason", why)
	}
	if why := o.why("BenchmarkChurn"); why != "benchmark not present" {
		t.Errorf("why of an absent benchmark = %q", why)
	}
}

func TestCountSyscalls(t *testing.T) {
	out := `101 accept4(3, {sa_family=AF_INET, sin_port=htons(5000)}, [16], SOCK_CLOEXEC|SOCK_NONBLOCK) = 7
101 fcntl(7, F_DUPFD_CLOEXEC, 0) = 8
101 fcntl(7, F_GETFL) = 0x802 (flags O_RDWR|O_NONBLOCK)
102 epoll_pwait(4,  <unfinished ...>
101 dup3(8, 9, O_CLOEXEC) = 9
102 <... epoll_pwait resumed>[], 128, 0, NULL, 0) = 0
101 +++ exited with 0 +++
102 --- SIGURG {si_signo=SIGURG, si_code=SI_TKILL} ---
`
	c, err := countSyscalls(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{"accept4": 1, dupCall: 2, "fcntl": 1, "epoll_pwait": 1}
	if len(c) != len(want) {
		t.Errorf("got %v, want %v", c, want)
	}
	for k, v := range want {
		if c[k] != v {
			t.Errorf("%s: got %v, want %v (all: %v)", k, c[k], v, c)
		}
	}
}

func TestSummarize(t *testing.T) {
	s := summarize([]float64{0.9, 0.5, 0.7, 0.6})
	if s.N != 4 || s.Min != 0.5 || s.Max != 0.9 || s.Median < 0.6499 || s.Median > 0.6501 {
		t.Errorf("got %+v, want n=4 min=0.5 max=0.9 median=0.65", s)
	}
	if s.Samples[0] != 0.9 {
		t.Error("summarize reordered the samples")
	}
	if s := summarize(nil); s.N != 0 {
		t.Errorf("empty: %+v", s)
	}
}

func TestCPUUnit(t *testing.T) {
	for unit, want := range map[string]float64{"cpu-ms/100k-conns": 1e-3, "cpu-s/100k-conns": 1, "cpu-us/100k": 1e-6} {
		if got, ok := cpuUnit(unit); !ok || got != want {
			t.Errorf("%s: got %v %v, want %v", unit, got, ok, want)
		}
	}
	for _, unit := range []string{"bytes/conn", "cpu-ms/op", "cpu-h/100k-conns"} {
		if _, ok := cpuUnit(unit); ok {
			t.Errorf("%s recognised as CPU per 100k connections", unit)
		}
	}
}
