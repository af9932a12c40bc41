package httpx

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

const namespace = "hangup"

var (
	requestsDesc = prometheus.NewDesc(
		prometheus.BuildFQName(namespace, "http", "requests_total"),
		"Requests that ended, by connection status (normal, aborted, timeout, aborted_timeout).",
		[]string{"outcome"}, nil)
	abortsDesc = prometheus.NewDesc(
		prometheus.BuildFQName(namespace, "http", "aborts_total"),
		"Requests whose client went away, by reason.",
		[]string{"reason"}, nil)
	undeliveredDesc = prometheus.NewDesc(
		prometheus.BuildFQName(namespace, "http", "undelivered_responses_total"),
		"Responses written but never acknowledged by the client: the connection died first.",
		nil, nil)
	sourceDesc = prometheus.NewDesc(
		prometheus.BuildFQName(namespace, "http", "detection_source"),
		"The detection source in use (1) and the others (0). The agent source shows epoll while the agent is away.",
		[]string{"source"}, nil)
	agentAwayDesc = prometheus.NewDesc(
		prometheus.BuildFQName(namespace, "http", "agent_disconnected"),
		"1 while the agent source has no session with the host agent and watches its connections with epoll; 0 while connected. Exported only by servers using the agent source.",
		nil, nil)
)

var outcomes = [4]string{"normal", "aborted", "timeout", "aborted_timeout"}

// metrics holds the Monitor's counters. Counters are atomics; Collect
// turns them into constant metrics.
type metrics struct {
	requests    [4]atomic.Uint64 // by Status
	aborts      [numReasons]atomic.Uint64
	undelivered atomic.Uint64
	latency     prometheus.Histogram
}

func newMetrics() *metrics {
	return &metrics{
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace,
			Subsystem: "http",
			Name:      "abort_detection_latency_seconds",
			Help:      "Time from the kernel's event to the request being marked aborted (aborts without a kernel timestamp are not observed).",
			Buckets:   prometheus.ExponentialBuckets(0.0001, 4, 9), // 100µs .. 6.5s
		}),
	}
}

func (x *metrics) request(s Status) { x.requests[s&3].Add(1) }

func (x *metrics) aborted(r Reason, latency time.Duration) {
	x.aborts[r].Add(1)
	x.latency.Observe(max(latency, 0).Seconds())
}

// Describe implements prometheus.Collector.
func (m *Monitor) Describe(ch chan<- *prometheus.Desc) {
	ch <- requestsDesc
	ch <- abortsDesc
	ch <- undeliveredDesc
	ch <- sourceDesc
	ch <- agentAwayDesc
	m.metrics.latency.Describe(ch)
}

// Collect implements prometheus.Collector.
func (m *Monitor) Collect(ch chan<- prometheus.Metric) {
	x := m.metrics
	for i, o := range outcomes {
		ch <- prometheus.MustNewConstMetric(requestsDesc, prometheus.CounterValue, float64(x.requests[i].Load()), o)
	}
	for r := ReasonPeerFIN; r < numReasons; r++ {
		ch <- prometheus.MustNewConstMetric(abortsDesc, prometheus.CounterValue, float64(x.aborts[r].Load()), r.String())
	}
	ch <- prometheus.MustNewConstMetric(undeliveredDesc, prometheus.CounterValue, float64(x.undelivered.Load()))
	cur := m.Source()
	for _, s := range sources {
		v := 0.0
		if s == cur {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(sourceDesc, prometheus.GaugeValue, v, string(s))
	}
	if _, ok := m.src.(*agentSource); ok {
		away := 0.0
		if cur != SourceAgent {
			away = 1
		}
		ch <- prometheus.MustNewConstMetric(agentAwayDesc, prometheus.GaugeValue, away)
	}
	x.latency.Collect(ch)
}

// Stats is a snapshot of a Monitor's counters, for tests and status pages.
type Stats struct {
	Requests    map[Status]uint64
	Aborts      map[Reason]uint64
	Undelivered uint64
}

// Stats returns the counters' current values.
func (m *Monitor) Stats() Stats {
	x := m.metrics
	st := Stats{Requests: make(map[Status]uint64), Aborts: make(map[Reason]uint64), Undelivered: x.undelivered.Load()}
	for i := range x.requests {
		st.Requests[Status(i)] = x.requests[i].Load()
	}
	for r := ReasonPeerFIN; r < numReasons; r++ {
		st.Aborts[r] = x.aborts[r].Load()
	}
	return st
}
