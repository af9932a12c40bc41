package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// top shows, like top(1), a table per network namespace and port of
// connections opened, aborted by cause, and retransmissions per second,
// the busiest aborts first, read from the agent's metrics endpoint.
func top(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangup top", flag.ContinueOnError)
	fs.SetOutput(stderr)
	url := fs.String("url", "http://127.0.0.1:9808/metrics", "the agent's metrics endpoint (basic auth: https://user:password@host:port/metrics)")
	interval := fs.Duration("interval", 2*time.Second, "time between two readings; rates are over it")
	once := fs.Bool("once", false, "print one table (two readings an interval apart) and exit, for scripts")
	limit := fs.Int("limit", 0, "rows to show, the most aborts first (0: all)")
	caFile := fs.String("tls.ca-file", "", "PEM certificates that sign the endpoint's (an https --url with hangupd's --web.config.file); empty: the system's")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *interval <= 0 {
		return fmt.Errorf("--interval must be positive, not %s", *interval)
	}
	client, err := metricsClient(*caFile)
	if err != nil {
		return err
	}
	prev, err := scrapeAgent(ctx, client, *url)
	if err != nil {
		return err
	}
	clear := !*once && isTerminal(stdout)
	t := time.NewTicker(*interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		cur, err := scrapeAgent(ctx, client, *url)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		rows := rates(prev, cur)
		if *limit > 0 && len(rows) > *limit {
			rows = rows[:*limit]
		}
		if clear {
			fmt.Fprint(stdout, "\033[H\033[2J")
		}
		if err := render(stdout, cur.at, cur.at.Sub(prev.at), rows); err != nil {
			return err
		}
		if *once {
			return nil
		}
		prev = cur
	}
}

// metricsClient is the HTTP client for the agent's endpoint, trusting the
// certificates in caFile if it is set.
func metricsClient(caFile string) (*http.Client, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	if caFile == "" {
		return c, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--tls.ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--tls.ca-file: no PEM certificate in %s", caFile)
	}
	c.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	return c, nil
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// portKey is one (network namespace inode, port) of the agent's series.
type portKey struct{ netns, port string }

// portCounts are the counters of one portKey at one reading.
type portCounts struct {
	opened, retrans float64
	closed          map[string]float64 // by cause
}

// snapshot is one reading of the agent's per-port counters.
type snapshot struct {
	at      time.Time
	ports   map[portKey]*portCounts
	process map[string]string // netns → process name (hangup_netns_info)
}

func scrapeAgent(ctx context.Context, c *http.Client, url string) (snapshot, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return snapshot{}, fmt.Errorf("--url: %w", err)
	}
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := c.Do(req)
	if err != nil {
		return snapshot{}, fmt.Errorf("reading the agent's metrics (is hangupd running? see --url): %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return snapshot{}, fmt.Errorf("reading the agent's metrics at %s: %s", req.URL.Redacted(), resp.Status)
	}
	s, err := parseSnapshot(io.LimitReader(resp.Body, 64<<20))
	s.at = time.Now()
	return s, err
}

// parseSnapshot reads the per-port counters out of a text-format scrape.
func parseSnapshot(r io.Reader) (snapshot, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return snapshot{}, fmt.Errorf("parsing the agent's metrics: %w", err)
	}
	s := snapshot{ports: map[portKey]*portCounts{}, process: map[string]string{}}
	if fams["hangup_connections_opened_total"] == nil {
		return s, errors.New("the metrics have no hangup_connections_opened_total: is this hangupd's endpoint?")
	}
	get := func(m *dto.Metric) *portCounts {
		k := portKey{label(m, "netns"), label(m, "port")}
		pc := s.ports[k]
		if pc == nil {
			pc = &portCounts{closed: map[string]float64{}}
			s.ports[k] = pc
		}
		return pc
	}
	for _, m := range fams["hangup_connections_opened_total"].GetMetric() {
		get(m).opened = m.GetCounter().GetValue()
	}
	for _, m := range fams["hangup_connections_retransmissions_total"].GetMetric() {
		get(m).retrans = m.GetCounter().GetValue()
	}
	for _, m := range fams["hangup_connections_closed_total"].GetMetric() {
		get(m).closed[label(m, "cause")] = m.GetCounter().GetValue()
	}
	for _, m := range fams["hangup_netns_info"].GetMetric() {
		s.process[label(m, "netns")] = label(m, "process")
	}
	return s, nil
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// row is one line of the table: per-second rates.
type row struct {
	key                             portKey
	process                         string
	opened, aborted, retrans        float64
	peerReset, localReset, timeouts float64
	errors                          float64
}

// timeoutCauses are the closes by a kernel timeout: silent drops.
var timeoutCauses = []string{"timeout", "keepalive_timeout", "probe_timeout"}

// rates turns two readings into rows, the most aborts first (then the most
// connections opened, then by namespace and port). A counter that went
// down (the agent restarted) counts from zero.
func rates(prev, cur snapshot) []row {
	dt := cur.at.Sub(prev.at).Seconds()
	if dt <= 0 {
		dt = 1
	}
	rate := func(a, b float64) float64 {
		if b < a {
			a = 0
		}
		return (b - a) / dt
	}
	var rows []row
	for k, c := range cur.ports {
		p := prev.ports[k]
		if p == nil {
			p = &portCounts{}
		}
		r := row{key: k, process: cur.process[k.netns],
			opened: rate(p.opened, c.opened), retrans: rate(p.retrans, c.retrans)}
		for cause, v := range c.closed {
			d := rate(p.closed[cause], v)
			switch {
			case cause == "normal" || cause == "none":
				continue
			case cause == "peer_reset":
				r.peerReset += d
			case cause == "local_reset":
				r.localReset += d
			case slices.Contains(timeoutCauses, cause):
				r.timeouts += d
			default:
				r.errors += d
			}
			r.aborted += d
		}
		rows = append(rows, r)
	}
	slices.SortFunc(rows, func(a, b row) int {
		switch {
		case a.aborted != b.aborted:
			return cmpDesc(a.aborted, b.aborted)
		case a.opened != b.opened:
			return cmpDesc(a.opened, b.opened)
		case a.key.netns != b.key.netns:
			return strings.Compare(a.key.netns, b.key.netns)
		}
		return strings.Compare(a.key.port, b.key.port)
	})
	return rows
}

func cmpDesc(a, b float64) int {
	if a > b {
		return -1
	}
	return 1
}

func render(w io.Writer, at time.Time, over time.Duration, rows []row) error {
	fmt.Fprintf(w, "hangup top  %s  per second over %s  (aborts: closes other than normal)\n\n",
		at.Format("15:04:05"), over.Round(10*time.Millisecond))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "NETNS\tPORT\tPROCESS\tOPENED\tABORTED\tPEER_RST\tLOCAL_RST\tTIMEOUT\tERROR\tRETRANS\t")
	for _, r := range rows {
		proc := r.process
		if proc == "" {
			proc = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t\n", r.key.netns, r.key.port, proc,
			r.opened, r.aborted, r.peerReset, r.localReset, r.timeouts, r.errors, r.retrans)
	}
	return tw.Flush()
}
