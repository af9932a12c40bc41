package deploy

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"go.yaml.in/yaml/v3"
)

const (
	rulesFile     = "prometheus/hangup.rules.yml"
	dashboardFile = "grafana/hangup.json"
	docsFile      = "../docs/operations.md"
)

// query is one PromQL expression of a rule or the dashboard.
type query struct {
	where  string // for messages: file and rule, panel or variable
	expr   string
	record string // the series a recording rule writes, if it is one
	label  string // the label a label_values() variable lists, if it is one
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []rule `yaml:"rules"`
	} `yaml:"groups"`
}

type rule struct {
	Record      string            `yaml:"record"`
	Alert       string            `yaml:"alert"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

func loadRules(t *testing.T) []rule {
	t.Helper()
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(b, &rf); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	var out []rule
	for _, g := range rf.Groups {
		out = append(out, g.Rules...)
	}
	if len(out) == 0 {
		t.Fatalf("%s: no rules", rulesFile)
	}
	return out
}

// dashboard is the part of Grafana's dashboard model the tests read.
type dashboard struct {
	Title      string  `json:"title"`
	UID        string  `json:"uid"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []variable `json:"list"`
	} `json:"templating"`
}

type panel struct {
	Title      string      `json:"title"`
	Type       string      `json:"type"`
	Datasource *datasource `json:"datasource"`
	GridPos    struct {
		X, Y, W, H int
	} `json:"gridPos"`
	Targets []struct {
		Expr       string      `json:"expr"`
		RefID      string      `json:"refId"`
		Datasource *datasource `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // of a collapsed row
}

type datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type variable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Query      json.RawMessage `json:"query"`
	Datasource *datasource     `json:"datasource"`
}

// queryString returns a query variable's query, which Grafana stores either
// as a string or as {"query": "..."}.
func (v variable) queryString() string {
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var o struct {
		Query string `json:"query"`
	}
	json.Unmarshal(v.Query, &o)
	return o.Query
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return d
}

func allPanels(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, allPanels(p.Panels)...)
	}
	return out
}

var labelValuesRE = regexp.MustCompile(`^\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$`)

// loadQueries returns every query of the rules and the dashboard, recording
// rules first and in file order (later ones may use earlier ones).
func loadQueries(t *testing.T) []query {
	t.Helper()
	var qs []query
	for _, r := range loadRules(t) {
		name := cmpOr(r.Record, r.Alert)
		qs = append(qs, query{where: rulesFile + ": " + name, expr: r.Expr, record: r.Record})
	}
	d := loadDashboard(t)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q := v.queryString()
		m := labelValuesRE.FindStringSubmatch(q)
		if m == nil {
			t.Errorf("%s: variable %s: want label_values(selector, label), got %q", dashboardFile, v.Name, q)
			continue
		}
		qs = append(qs, query{where: dashboardFile + ": variable " + v.Name, expr: grafanaToPromQL(m[1]), label: m[2]})
	}
	for _, p := range allPanels(d.Panels) {
		for _, tg := range p.Targets {
			qs = append(qs, query{where: fmt.Sprintf("%s: panel %q query %s", dashboardFile, p.Title, tg.RefID), expr: grafanaToPromQL(tg.Expr)})
		}
	}
	return qs
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

var grafanaVarRE = regexp.MustCompile(`\$\{?([a-zA-Z_][a-zA-Z0-9_]*)\}?`)

// grafanaToPromQL replaces Grafana's variables: intervals by 5m, template
// variables (used only inside =~ matchers here) by ".*".
func grafanaToPromQL(s string) string {
	return grafanaVarRE.ReplaceAllStringFunc(s, func(v string) string {
		name := strings.Trim(v, "${}")
		if strings.HasPrefix(name, "__") {
			return "5m"
		}
		return ".*"
	})
}

var promql = parser.NewParser(parser.Options{})

// TestQueriesParse checks the rules and the dashboard without a scrape:
// every query parses, names only hangup's metrics, up or recorded series
// defined by the rules, and never a status code label (aborts are their own
// outcome, not 4xx/5xx) nor "namespace" (Kubernetes' target label); every
// alert has a summary, a description and a runbook that exists in
// docs/operations.md; every panel and variable uses the datasource
// variable, and panels fit the grid without overlapping.
func TestQueriesParse(t *testing.T) {
	recorded := map[string]bool{}
	for _, q := range loadQueries(t) {
		e, err := promql.ParseExpr(q.expr)
		if err != nil {
			t.Errorf("%s: %v\n%s", q.where, err, q.expr)
			continue
		}
		parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
			switch n := n.(type) {
			case *parser.VectorSelector:
				name := selectorName(n)
				switch {
				case strings.Contains(name, ":"):
					if !recorded[name] {
						t.Errorf("%s: uses %s, which no earlier recording rule defines", q.where, name)
					}
				case name != "up" && !strings.HasPrefix(name, "hangup_"):
					t.Errorf("%s: uses %q, not a hangup metric", q.where, name)
				}
				for _, m := range n.LabelMatchers {
					checkNoStatusCode(t, q.where, m.Name)
				}
			case *parser.AggregateExpr:
				for _, l := range n.Grouping {
					checkNoStatusCode(t, q.where, l)
				}
			}
			return nil
		})
		if q.record != "" {
			recorded[q.record] = true
		}
	}

	anchors := docAnchors(t)
	alerts := 0
	for _, r := range loadRules(t) {
		if r.Alert == "" {
			continue
		}
		alerts++
		for _, k := range []string{"summary", "description", "runbook_url"} {
			if r.Annotations[k] == "" {
				t.Errorf("alert %s: no %s annotation", r.Alert, k)
			}
		}
		if r.Labels["severity"] == "" {
			t.Errorf("alert %s: no severity label", r.Alert)
		}
		u := r.Annotations["runbook_url"]
		_, frag, ok := strings.Cut(u, "/docs/operations.md#")
		if !ok || !anchors[frag] {
			t.Errorf("alert %s: runbook_url %q is not a section of docs/operations.md (sections: %v)", r.Alert, u, slices.Sorted(maps.Keys(anchors)))
		}
	}
	if alerts < 8 {
		t.Errorf("%d alerts, want the 8 or more of issue 10", alerts)
	}

	d := loadDashboard(t)
	vars := map[string]bool{}
	for _, v := range d.Templating.List {
		vars[v.Name] = true
		if v.Type == "query" && (v.Datasource == nil || v.Datasource.UID != "${datasource}") {
			t.Errorf("variable %s: datasource %+v, want uid ${datasource}", v.Name, v.Datasource)
		}
	}
	for _, v := range []string{"datasource", "job", "netns", "port"} {
		if !vars[v] {
			t.Errorf("dashboard: no variable %q", v)
		}
	}
	type cell struct{ x, y int }
	taken := map[cell]string{}
	for _, p := range allPanels(d.Panels) {
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
			t.Errorf("panel %q: gridPos %+v outside the 24 columns", p.Title, g)
		}
		overlaps := map[string]bool{}
		for x := g.X; x < g.X+g.W; x++ {
			for y := g.Y; y < g.Y+g.H; y++ {
				if other, ok := taken[cell{x, y}]; ok && !overlaps[other] {
					overlaps[other] = true
					t.Errorf("panel %q overlaps panel %q at %d,%d", p.Title, other, x, y)
				}
				taken[cell{x, y}] = p.Title
			}
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q: datasource %+v, want uid ${datasource}", p.Title, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q: no query", p.Title)
		}
	}
}

func checkNoStatusCode(t *testing.T, where, label string) {
	t.Helper()
	switch label {
	case "code", "status", "status_code", "http_status":
		t.Errorf("%s: uses label %q: aborts are an outcome of their own, never part of status code ratios", where, label)
	case "namespace":
		t.Errorf("%s: uses label \"namespace\", Kubernetes' target label: hangup's network namespace label is netns", where)
	}
}

func selectorName(vs *parser.VectorSelector) string {
	if vs.Name != "" {
		return vs.Name
	}
	for _, m := range vs.LabelMatchers {
		if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
			return m.Value
		}
	}
	return ""
}

// docAnchors returns the GitHub anchors of docs/operations.md's headings.
func docAnchors(t *testing.T) map[string]bool {
	t.Helper()
	b, err := os.ReadFile(docsFile)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.ToLower(strings.TrimSpace(strings.TrimLeft(line, "#")))
		var s strings.Builder
		for _, r := range h {
			switch {
			case r == ' ':
				s.WriteByte('-')
			case r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9':
				s.WriteRune(r)
			}
		}
		out[s.String()] = true
	}
	return out
}

// schema is what a set of scrapes exports: for each metric name (a
// histogram's _bucket, _sum and _count separately), its label names and
// their values. Prometheus adds job and instance to every series.
type schema map[string]map[string]map[string]bool

var targetLabels = []string{"job", "instance"}

func (s schema) add(name string, lbls map[string]string) {
	m := s[name]
	if m == nil {
		m = map[string]map[string]bool{}
		s[name] = m
	}
	for _, l := range targetLabels {
		if m[l] == nil {
			m[l] = map[string]bool{}
		}
	}
	for k, v := range lbls {
		if m[k] == nil {
			m[k] = map[string]bool{}
		}
		m[k][v] = true
	}
}

func (s schema) labelNames(name string) map[string]bool {
	out := map[string]bool{}
	for l := range s[name] {
		out[l] = true
	}
	return out
}

// checker checks queries against a schema, recording rules adding the
// series they write.
type checker struct {
	s     schema
	where string
	errs  []string
}

func (c *checker) errorf(format string, args ...any) {
	c.errs = append(c.errs, c.where+": "+fmt.Sprintf(format, args...))
}

// check checks one query and, for a recording rule, adds its output to the
// schema.
func (c *checker) check(q query) {
	c.where = q.where
	e, err := promql.ParseExpr(q.expr)
	if err != nil {
		c.errorf("%v", err)
		return
	}
	out := c.labelsOf(e)
	if q.label != "" && out != nil && !out[q.label] {
		c.errorf("label_values lists %q, which %s does not have (it has %v)", q.label, q.expr, slices.Sorted(maps.Keys(out)))
	}
	if q.record != "" {
		c.s.add(q.record, nil)
		for l := range out {
			if c.s[q.record][l] == nil {
				c.s[q.record][l] = map[string]bool{}
			}
		}
	}
}

// labelsOf returns the label names the series of e can carry, reporting
// every metric, label or label value that the schema does not have. Nil
// means unknown (a missing metric, already reported): nothing built on it
// is checked, so that one missing metric is one error.
func (c *checker) labelsOf(e parser.Expr) map[string]bool {
	switch e := e.(type) {
	case *parser.VectorSelector:
		return c.selector(e)
	case *parser.MatrixSelector:
		return c.labelsOf(e.VectorSelector)
	case *parser.ParenExpr:
		return c.labelsOf(e.Expr)
	case *parser.UnaryExpr:
		return c.labelsOf(e.Expr)
	case *parser.SubqueryExpr:
		return c.labelsOf(e.Expr)
	case *parser.StepInvariantExpr:
		return c.labelsOf(e.Expr)
	case *parser.NumberLiteral, *parser.StringLiteral:
		return map[string]bool{}
	case *parser.Call:
		return c.call(e)
	case *parser.AggregateExpr:
		in := c.labelsOf(e.Expr)
		if e.Param != nil {
			c.labelsOf(e.Param)
		}
		for _, l := range e.Grouping {
			if in != nil && !in[l] {
				c.errorf("%s by/without label %q, which its input does not have (it has %v)", e.Op, l, slices.Sorted(maps.Keys(in)))
			}
		}
		switch {
		case e.Op == parser.TOPK || e.Op == parser.BOTTOMK || e.Op == parser.LIMITK || e.Op == parser.LIMIT_RATIO:
			return in
		case e.Without:
			out := maps.Clone(in)
			for _, l := range e.Grouping {
				delete(out, l)
			}
			return out
		}
		out := map[string]bool{}
		for _, l := range e.Grouping {
			out[l] = true
		}
		if e.Op == parser.COUNT_VALUES {
			if s, ok := e.Param.(*parser.StringLiteral); ok {
				out[s.Val] = true
			}
		}
		return out
	case *parser.BinaryExpr:
		return c.binary(e)
	}
	c.errorf("unexpected expression %T", e)
	return map[string]bool{}
}

func (c *checker) selector(vs *parser.VectorSelector) map[string]bool {
	name := selectorName(vs)
	if name == "" {
		c.errorf("selector %s has no metric name", vs)
		return map[string]bool{}
	}
	if _, ok := c.s[name]; !ok {
		c.errorf("metric %s is not exported (not in the scrapes, nor written by an earlier recording rule)", name)
		return nil // unknown: not checked further
	}
	have := c.s.labelNames(name)
	for _, m := range vs.LabelMatchers {
		if m.Name == labels.MetricName {
			continue
		}
		if !have[m.Name] {
			c.errorf("%s has no label %q (it has %v)", name, m.Name, slices.Sorted(maps.Keys(have)))
			have[m.Name] = true // reported once, not again by what uses it
			continue
		}
		c.values(name, m)
	}
	return have
}

var literalAlternation = regexp.MustCompile(`^[a-zA-Z0-9_]+(\|[a-zA-Z0-9_]+)*$`)

// values checks that a matcher's literal values occur in the scrapes (for
// the scraped metrics' own labels; target labels and recorded series are
// not known in advance).
func (c *checker) values(name string, m *labels.Matcher) {
	seen := c.s[name][m.Name]
	if len(seen) == 0 || slices.Contains(targetLabels, m.Name) {
		return
	}
	var want []string
	switch {
	case (m.Type == labels.MatchEqual || m.Type == labels.MatchNotEqual) && m.Value != "":
		want = []string{m.Value}
	case (m.Type == labels.MatchRegexp || m.Type == labels.MatchNotRegexp) && literalAlternation.MatchString(m.Value):
		want = strings.Split(m.Value, "|")
	}
	for _, v := range want {
		if !seen[v] {
			c.errorf("%s{%s} matches value %q, which the scrapes never show (they show %v)", name, m.Name, v, slices.Sorted(maps.Keys(seen)))
		}
	}
}

func (c *checker) call(e *parser.Call) map[string]bool {
	var args []map[string]bool
	for _, a := range e.Args {
		args = append(args, c.labelsOf(a))
	}
	out := map[string]bool{}
	switch e.Func.Name {
	case "label_replace":
		if args[0] == nil {
			return nil
		}
		out = maps.Clone(args[0])
		if s, ok := e.Args[1].(*parser.StringLiteral); ok {
			out[s.Val] = true
		}
		return out
	case "histogram_quantile":
		if args[1] != nil && !args[1]["le"] {
			c.errorf("histogram_quantile over series without le")
		}
		out = maps.Clone(args[1])
		delete(out, "le")
		return out
	case "absent", "absent_over_time":
		parser.Inspect(e.Args[0], func(n parser.Node, _ []parser.Node) error {
			if vs, ok := n.(*parser.VectorSelector); ok {
				for _, m := range vs.LabelMatchers {
					if m.Type == labels.MatchEqual && m.Name != labels.MetricName {
						out[m.Name] = true
					}
				}
			}
			return nil
		})
		return out
	}
	for i, a := range args {
		if t := e.Args[i].Type(); t == parser.ValueTypeVector || t == parser.ValueTypeMatrix {
			if a == nil {
				return nil
			}
			maps.Copy(out, a)
		}
	}
	return out
}

func (c *checker) binary(e *parser.BinaryExpr) map[string]bool {
	l, r := c.labelsOf(e.LHS), c.labelsOf(e.RHS)
	lv := e.LHS.Type() == parser.ValueTypeVector
	rv := e.RHS.Type() == parser.ValueTypeVector
	switch {
	case !lv:
		return r
	case !rv:
		return l
	}
	vm := e.VectorMatching
	if vm == nil {
		return l
	}
	if vm.On && l != nil && r != nil {
		for _, m := range vm.MatchingLabels {
			if !l[m] || !r[m] {
				c.errorf("%s on (%s): both sides need label %q (left %v, right %v)", e.Op, strings.Join(vm.MatchingLabels, ", "), m, slices.Sorted(maps.Keys(l)), slices.Sorted(maps.Keys(r)))
			}
		}
	}
	switch {
	case e.Op == parser.LAND || e.Op == parser.LUNLESS:
		return l
	case e.Op == parser.LOR:
		if l == nil || r == nil {
			return nil
		}
		out := maps.Clone(l)
		maps.Copy(out, r)
		return out
	case vm.Card == parser.CardManyToOne, vm.Card == parser.CardOneToMany:
		many, one := l, r
		if vm.Card == parser.CardOneToMany {
			many, one = r, l
		}
		if many == nil {
			return nil
		}
		out := maps.Clone(many)
		for _, inc := range vm.Include {
			if one != nil && !one[inc] {
				c.errorf("group_left/right (%s): the other side has no label %q", strings.Join(vm.Include, ", "), inc)
			}
			out[inc] = true
		}
		return out
	case e.Op.IsComparisonOperator() && !e.ReturnBool:
		return l
	case vm.On:
		out := map[string]bool{}
		for _, m := range vm.MatchingLabels {
			out[m] = true
		}
		return out
	}
	out := maps.Clone(l)
	for _, m := range vm.MatchingLabels {
		delete(out, m)
	}
	return out
}

// checkQueries checks every query against s and returns the problems.
func checkQueries(t *testing.T, s schema) []string {
	c := &checker{s: s}
	for _, q := range loadQueries(t) {
		c.check(q)
	}
	return c.errs
}

// TestCheckerFindsMistakes shows that the query checker reports what it
// should: a wrong metric, label, label value or grouping label, and only
// once for a missing metric.
func TestCheckerFindsMistakes(t *testing.T) {
	s := schema{}
	s.addScrape(scrapeCollector(t, prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "hangup_demo_total", Help: "demo", ConstLabels: prometheus.Labels{"port": "80"},
	}, func() float64 { return 1 })))
	for _, tc := range []struct {
		expr string
		want string // in the only error; empty: no error
	}{
		{`sum by (job, port) (rate(hangup_demo_total{port="80"}[5m]))`, ""},
		{`hangup_demo_total{port=~"80|443"}`, `value "443"`},
		{`hangup_demo_total{port="8080"}`, `value "8080"`},
		{`hangup_demo_total{netns=~".*"}`, `no label "netns"`},
		{`sum by (netns) (hangup_demo_total)`, `label "netns"`},
		{`sum by (job) (rate(hangup_missing_total[5m])) / on (job) group_left (port) hangup_demo_total`, "hangup_missing_total is not exported"},
		{`hangup_demo_total / on (port) group_left (cause) hangup_demo_total`, `no label "cause"`},
		{`histogram_quantile(0.9, hangup_demo_total)`, "without le"},
	} {
		c := &checker{s: maps.Clone(s), where: "q"}
		c.check(query{where: "q", expr: tc.expr})
		switch {
		case tc.want == "" && len(c.errs) > 0:
			t.Errorf("%s: unexpected %v", tc.expr, c.errs)
		case tc.want != "" && (len(c.errs) != 1 || !strings.Contains(c.errs[0], tc.want)):
			t.Errorf("%s: got %q, want one error with %q", tc.expr, c.errs, tc.want)
		}
	}
}
