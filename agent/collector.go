package agent

import (
	"cmp"
	"log/slog"
	"maps"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"

	"github.com/hangup-io/hangup/bpf"
	"github.com/prometheus/client_golang/prometheus"
)

const namespace = "hangup"

// other is the port and netns label value of what is beyond the caps
// (Config.MaxPorts per namespace, Config.MaxNamespaces).
const other = "other"

// ProgramStatsSource is a Source that reports the kernel's run-time
// statistics of each of its programs (see Config.ProgramStats).
type ProgramStatsSource interface {
	HookStats() ([]bpf.HookStats, error)
}

var _ ProgramStatsSource = (*bpf.Probe)(nil)

// collector exports the probe's exact per-port counts and the agent's own
// counters. Per-port series come from the kernel's maps, not from events,
// so a full ring buffer never falsifies them.
type collector struct {
	a   *Agent
	log *slog.Logger

	opened, closed, peerFIN, peerReset, localReset, retrans, sockErrors *prometheus.Desc
	probeEvents, probeLost, trackFull, retransFailed                    *prometheus.Desc
	events, tracked, seeded, subscribers, listeners, dropped            *prometheus.Desc
	subDelivered, subDropped, subQueued, buildInfo                      *prometheus.Desc
	folded, labelLimit, netnsInfo                                       *prometheus.Desc
	progRuns, progRunTime                                               *prometheus.Desc

	labels labeller
}

// Collector returns the agent's Prometheus collector. Register it on a
// registry of your own; nothing is registered globally.
func (a *Agent) Collector() prometheus.Collector {
	port := []string{"netns", "port"}
	d := func(sub, name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, sub, name), help, labels, nil)
	}
	return &collector{
		a:   a,
		log: a.log.With("component", "collector"),

		opened:     d("connections", "opened_total", "Server connections opened (handshake completed on a listener), by network namespace and local port.", port...),
		closed:     d("connections", "closed_total", "Server connections closed, by network namespace, local port and cause.", "netns", "port", "cause"),
		peerFIN:    d("connections", "peer_fins_total", "Server connections half-closed by the client (FIN), by network namespace and local port.", port...),
		peerReset:  d("connections", "peer_resets_total", "Server connections reset by the client (RST received), by network namespace and local port.", port...),
		localReset: d("connections", "local_resets_total", "Server connections reset by this host (RST sent), by network namespace and local port.", port...),
		retrans:    d("connections", "retransmissions_total", "Segments retransmitted on server connections, by network namespace and local port.", port...),
		sockErrors: d("connections", "errors_total", "Socket errors reported on server connections, by network namespace and local port.", port...),

		probeEvents:   d("probe", "events_total", "Events the kernel probe wrote to its ring buffer."),
		probeLost:     d("probe", "lost_events_total", "Events the kernel probe could not write because its ring buffer was full (counters stay exact)."),
		trackFull:     d("probe", "untracked_connections_total", "Server connections not tracked because the probe's connection table was full."),
		retransFailed: d("probe", "failed_retransmissions_total", "Retransmission attempts that failed (not counted as retransmissions)."),

		events:      d("agent", "events_total", "Events the agent read from the probe."),
		tracked:     d("agent", "tracked_connections", "Server connections in the agent's connection table."),
		seeded:      d("agent", "seeded_connections_total", "Connections that existed before the agent or a listener registration, found through sock_diag."),
		subscribers: d("agent", "subscribers", "Connected subscribers."),
		listeners:   d("agent", "listeners", "Listening sockets registered by subscribers."),
		dropped:     d("agent", "dropped_events_total", "Events dropped because a subscriber read too slowly, over all subscribers past and present."),

		subDelivered: d("subscriber", "delivered_events_total", "Events delivered to a connected subscriber.", "subscriber", "name"),
		subDropped:   d("subscriber", "dropped_events_total", "Events dropped because a connected subscriber read too slowly.", "subscriber", "name"),
		subQueued:    d("subscriber", "queued_events", "Events waiting in a connected subscriber's queue.", "subscriber", "name"),
		buildInfo:    d("", "build_info", "Build information of hangupd; the value is 1.", "version", "revision", "goversion"),
		folded:       d("agent", "folded_label_values", `Distinct label values of per-port metrics summed under "other" because of a cap: label="netns" counts namespaces beyond the namespace cap, label="port" ports beyond the per-namespace port cap.`, "label"),
		labelLimit:   d("agent", "label_limit", `The caps on per-port metric label values: label="netns" namespaces, label="port" ports per namespace.`, "label"),
		netnsInfo:    d("netns", "info", "What runs in a network namespace that has per-port series: the listening process's name and, where its cgroup shows them, the container id and Kubernetes pod UID; the value is 1.", "netns", "process", "container_id", "pod_uid"),

		progRuns:    d("probe", "program_runs_total", "Runs of the probe's BPF programs on each hook (tracepoint), counted by the kernel while its BPF statistics are on (hangupd --probe.stats).", "hook"),
		progRunTime: d("probe", "program_run_seconds_total", "Time spent in the probe's BPF programs on each hook (tracepoint), counted by the kernel while its BPF statistics are on (hangupd --probe.stats).", "hook"),

		labels: labeller{maxNS: a.cfg.MaxNamespaces, maxPorts: a.cfg.MaxPorts, ns: make(map[uint32]map[uint16]bool)},
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.opened, c.closed, c.peerFIN, c.peerReset, c.localReset, c.retrans, c.sockErrors,
		c.probeEvents, c.probeLost, c.trackFull, c.retransFailed, c.folded, c.labelLimit, c.netnsInfo,
		c.events, c.tracked, c.seeded, c.subscribers, c.listeners, c.dropped,
		c.subDelivered, c.subDropped, c.subQueued, c.buildInfo, c.progRuns, c.progRunTime,
	} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}

	if ports, err := c.a.src.PortCounters(); err != nil {
		c.log.Error("reading per-port counters", "err", err)
		ch <- prometheus.NewInvalidMetric(c.opened, err)
	} else {
		groups, foldedNS, foldedPorts := c.labels.group(ports)
		for k, pc := range groups {
			counter(c.opened, pc.Opened, k.netns, k.port)
			for _, cause := range bpf.Causes() {
				counter(c.closed, pc.Closed[cause], k.netns, k.port, cause.String())
			}
			counter(c.peerFIN, pc.PeerFIN, k.netns, k.port)
			counter(c.peerReset, pc.PeerReset, k.netns, k.port)
			counter(c.localReset, pc.LocalReset, k.netns, k.port)
			counter(c.retrans, pc.RetransmittedSegments, k.netns, k.port)
			counter(c.sockErrors, pc.Errors, k.netns, k.port)
		}
		gauge(c.folded, float64(foldedNS), "netns")
		gauge(c.folded, float64(foldedPorts), "port")
		for _, ns := range c.labels.namespaces() {
			in := c.a.netnsInfo(ns)
			gauge(c.netnsInfo, 1, strconv.FormatUint(uint64(ns), 10), in.process, in.containerID, in.podUID)
		}
	}
	gauge(c.labelLimit, float64(c.a.cfg.MaxNamespaces), "netns")
	gauge(c.labelLimit, float64(c.a.cfg.MaxPorts), "port")
	if st, err := c.a.src.Stats(); err != nil {
		c.log.Error("reading probe stats", "err", err)
		ch <- prometheus.NewInvalidMetric(c.probeEvents, err)
	} else {
		counter(c.probeEvents, st.Events)
		counter(c.probeLost, st.Lost)
		counter(c.trackFull, st.TrackFull)
		counter(c.retransFailed, st.RetransmitFailed)
	}

	if ps, ok := c.a.src.(ProgramStatsSource); ok && c.a.cfg.ProgramStats {
		if hooks, err := ps.HookStats(); err != nil {
			c.log.Error("reading program statistics", "err", err)
			ch <- prometheus.NewInvalidMetric(c.progRuns, err)
		} else {
			// Summed per hook: a tracepoint may have more than one program.
			runs, secs := map[string]uint64{}, map[string]float64{}
			for _, h := range hooks {
				runs[h.Hook] += h.RunCount
				secs[h.Hook] += h.RunTime.Seconds()
			}
			for hook, n := range runs {
				counter(c.progRuns, n, hook)
				ch <- prometheus.MustNewConstMetric(c.progRunTime, prometheus.CounterValue, secs[hook], hook)
			}
		}
	}
	counter(c.events, c.a.events.Load())
	gauge(c.tracked, float64(c.a.table.len()))
	counter(c.seeded, c.a.seeded.Load())
	counter(c.dropped, c.a.dropped.Load())
	subs := c.a.subscribers()
	gauge(c.subscribers, float64(len(subs)))
	nl := 0
	for _, s := range subs {
		s.mu.Lock()
		nl += len(s.listeners)
		name := s.name
		s.mu.Unlock()
		id := strconv.FormatUint(uint64(s.id), 10)
		counter(c.subDelivered, s.delivered.Load(), id, name)
		counter(c.subDropped, s.dropped.Load(), id, name)
		gauge(c.subQueued, float64(s.queued()), id, name)
	}
	gauge(c.listeners, float64(nl))
	version, revision := buildVersion()
	gauge(c.buildInfo, 1, version, revision, goVersion())
}

// sumNamespaces adds up each port's counters over network namespaces.
// TODO(agent): a namespace label instead (issue 8).
func sumNamespaces(keyed map[bpf.PortKey]bpf.PortCounters) map[uint16]bpf.PortCounters {
	ports := make(map[uint16]bpf.PortCounters, len(keyed))
	for k, pc := range keyed {
		sum := ports[k.Port]
		sum.Add(&pc)
		ports[k.Port] = sum
	}
	return ports
}

// labelKey is the label values of one group of per-port series.
type labelKey struct{ netns, port string }

// labeller maps the kernel's (namespace, port) keys to label values under
// the caps: namespaces seen first (the busiest first among those seen at
// once) keep their own netns label, up to maxNS, and within each, ports up
// to maxPorts; the rest are summed under "other" (netns="other" has only
// port="other"). What has a label keeps it, so that a series never moves
// into "other" and counters stay monotonic.
type labeller struct {
	maxNS, maxPorts int

	mu sync.Mutex
	ns map[uint32]map[uint16]bool // labelled namespaces and their labelled ports
}

// group sums ports by label values, and counts the namespaces and ports
// folded into "other".
func (l *labeller) group(ports map[bpf.PortKey]bpf.PortCounters) (_ map[labelKey]*bpf.PortCounters, foldedNS, foldedPorts int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var fresh []bpf.PortKey
	for k := range ports {
		if lp, ok := l.ns[k.NetNS]; !ok || !lp[k.Port] {
			fresh = append(fresh, k)
		}
	}
	slices.SortFunc(fresh, func(x, y bpf.PortKey) int {
		px, py := ports[x], ports[y]
		return cmp.Or(cmp.Compare(py.Opened, px.Opened), cmp.Compare(x.NetNS, y.NetNS), cmp.Compare(x.Port, y.Port))
	})
	for _, k := range fresh {
		lp, ok := l.ns[k.NetNS]
		if !ok {
			if len(l.ns) >= l.maxNS {
				continue
			}
			lp = make(map[uint16]bool)
			l.ns[k.NetNS] = lp
		}
		if len(lp) < l.maxPorts {
			lp[k.Port] = true
		}
	}
	out := make(map[labelKey]*bpf.PortCounters, len(ports))
	otherNS := make(map[uint32]bool)
	for k, pc := range ports {
		lk := labelKey{netns: other, port: other}
		switch lp, ok := l.ns[k.NetNS]; {
		case !ok:
			otherNS[k.NetNS] = true
		case lp[k.Port]:
			lk = labelKey{netns: strconv.FormatUint(uint64(k.NetNS), 10), port: strconv.Itoa(int(k.Port))}
		default:
			lk.netns = strconv.FormatUint(uint64(k.NetNS), 10)
			foldedPorts++
		}
		sum, ok := out[lk]
		if !ok {
			sum = new(bpf.PortCounters)
			out[lk] = sum
		}
		sum.Add(&pc)
	}
	return out, len(otherNS), foldedPorts
}

// namespaces returns the labelled namespaces.
func (l *labeller) namespaces() []uint32 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Sorted(maps.Keys(l.ns))
}

// Version is hangupd's version, set at build time with
// -ldflags "-X github.com/hangup-io/hangup/agent.Version=v1.2.3". Empty
// means the module version from the build info.
var Version string

// BuildVersion describes the running binary: version and VCS revision.
func BuildVersion() string {
	v, r := buildVersion()
	return v + " (revision " + r + ", " + goVersion() + ")"
}

func buildVersion() (version, revision string) {
	version = Version
	info, ok := debug.ReadBuildInfo()
	if ok {
		if version == "" {
			version = info.Main.Version
		}
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" {
				revision = s.Value
			}
		}
	}
	return cmp.Or(version, "unknown"), cmp.Or(revision, "unknown")
}

func goVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		return info.GoVersion
	}
	return "unknown"
}
