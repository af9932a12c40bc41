package deploy

import (
	"bytes"
	"debug/elf"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/hangup-io/hangup/internal/testutil"
	"github.com/hangup-io/hangup/internal/wire"
	"go.yaml.in/yaml/v3"
)

// agentCaps are the capabilities hangupd keeps, without the CAP_ prefix,
// as every deploy target grants them (the reasons are in the unit and the
// DaemonSet).
var agentCaps = []string{"BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"}

// hangupdDefaults builds hangupd and returns its flags with their defaults,
// read from its -h output: the code's own defaults, not a copy here.
func hangupdDefaults(t *testing.T) map[string]string {
	t.Helper()
	return flagDefaults(t, testutil.BuildHangupd(t))
}

// flagDefaults runs bin -h and parses the flag package's usage text.
func flagDefaults(t *testing.T, bin string) map[string]string {
	t.Helper()
	out, _ := exec.Command(bin, "-h").CombinedOutput()
	flags := map[string]string{}
	var cur string
	defRE := regexp.MustCompile(`\(default "?(.*?)"?\)$`)
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "  -") {
			cur = strings.Fields(line)[0][1:]
			flags[cur] = ""
			continue
		}
		if m := defRE.FindStringSubmatch(line); m != nil && cur != "" {
			flags[cur] = m[1]
		}
	}
	if len(flags) == 0 {
		t.Fatalf("%s -h lists no flags:\n%s", bin, out)
	}
	return flags
}

// parseArgs splits --name=value arguments, failing on flags the program
// does not have.
func parseArgs(t *testing.T, where string, args []string, known map[string]string) map[string]string {
	t.Helper()
	got := map[string]string{}
	for _, a := range args {
		name, value, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if _, ok := known[name]; !ok {
			t.Errorf("%s: argument %q: no such flag", where, a)
		}
		got[name] = value
	}
	return got
}

// withDefaults returns the value a flag has: given or default.
func withDefaults(args, defaults map[string]string) func(string) string {
	return func(name string) string {
		if v, ok := args[name]; ok {
			return v
		}
		return defaults[name]
	}
}

func listenPort(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("listen address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("listen address %q: %v", addr, err)
	}
	return n
}

// manifest is one YAML document, decoded twice: as plain values to read
// and as nodes to read comments.
type manifest struct {
	obj  map[string]any
	node *yaml.Node
}

func loadManifests(t *testing.T, file string) map[string]manifest {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]manifest{}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		var obj map[string]any
		if err := n.Decode(&obj); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		key := str(obj, "kind") + "/" + str(obj, "metadata", "name")
		if _, dup := out[key]; dup {
			t.Fatalf("%s: %s twice", file, key)
		}
		out[key] = manifest{obj: obj, node: &n}
	}
	return out
}

// get walks maps by key and lists by index ("0").
func get(v any, keys ...string) any {
	for _, k := range keys {
		switch x := v.(type) {
		case map[string]any:
			v = x[k]
		case []any:
			i, err := strconv.Atoi(k)
			if err != nil || i >= len(x) {
				return nil
			}
			v = x[i]
		default:
			return nil
		}
	}
	return v
}

func str(v any, keys ...string) string {
	s, _ := get(v, keys...).(string)
	return s
}

func strs(v any, keys ...string) []string {
	var out []string
	l, _ := get(v, keys...).([]any)
	for _, x := range l {
		out = append(out, toString(x))
	}
	return out
}

func toString(x any) string {
	switch x := x.(type) {
	case string:
		return x
	case int:
		return strconv.Itoa(x)
	}
	return ""
}

// findNode returns the value node under a path of mapping keys and
// sequence indexes.
func findNode(n *yaml.Node, keys ...string) *yaml.Node {
	if n.Kind == yaml.DocumentNode {
		n = n.Content[0]
	}
	for _, k := range keys {
		switch n.Kind {
		case yaml.MappingNode:
			var next *yaml.Node
			for i := 0; i+1 < len(n.Content); i += 2 {
				if n.Content[i].Value == k {
					next = n.Content[i+1]
				}
			}
			if next == nil {
				return nil
			}
			n = next
		case yaml.SequenceNode:
			i, err := strconv.Atoi(k)
			if err != nil || i >= len(n.Content) {
				return nil
			}
			n = n.Content[i]
		default:
			return nil
		}
	}
	return n
}

// container returns a pod template's container by name, and its path.
func container(t *testing.T, m manifest, name string) (map[string]any, []string) {
	t.Helper()
	cs, _ := get(m.obj, "spec", "template", "spec", "containers").([]any)
	for i, c := range cs {
		if str(c, "name") == name {
			return c.(map[string]any), []string{"spec", "template", "spec", "containers", strconv.Itoa(i)}
		}
	}
	t.Fatalf("no container %q", name)
	return nil, nil
}

// hostPathMount returns the host path behind the container's mount at dir.
func hostPathMount(pod any, c map[string]any, dir string) (hostPath string, readOnly bool) {
	for _, vm := range get(c, "volumeMounts").([]any) {
		if str(vm, "mountPath") != dir {
			continue
		}
		ro, _ := get(vm, "readOnly").(bool)
		for _, v := range get(pod, "volumes").([]any) {
			if str(v, "name") == str(vm, "name") {
				return str(v, "hostPath", "path"), ro
			}
		}
	}
	return "", false
}

// portNumber resolves a probe's or Service's port, by number or by the
// container's port name.
func portNumber(c map[string]any, p any) int {
	switch p := p.(type) {
	case int:
		return p
	case string:
		for _, cp := range get(c, "ports").([]any) {
			if str(cp, "name") == p {
				n, _ := get(cp, "containerPort").(int)
				return n
			}
		}
	}
	return 0
}

// TestKubernetesManifests checks the DaemonSet, its Service and
// ServiceMonitor, and the orders Deployment against the agent's defaults
// (wire.DefaultSocketPath, hangupd's default listen address) and least
// privilege.
func TestKubernetesManifests(t *testing.T) {
	defaults := hangupdDefaults(t)
	ms := loadManifests(t, "kubernetes/hangupd.yaml")
	ds, ok := ms["DaemonSet/hangupd"]
	if !ok {
		t.Fatalf("no DaemonSet/hangupd in %v", ms)
	}
	pod := get(ds.obj, "spec", "template", "spec")
	for _, k := range []string{"hostPID", "hostNetwork", "hostIPC"} {
		if v, _ := get(pod, k).(bool); v {
			t.Errorf("DaemonSet: %s: true", k)
		}
	}
	c, cpath := container(t, ds, "hangupd")
	sc := get(c, "securityContext")
	if v, _ := get(sc, "privileged").(bool); v {
		t.Error("DaemonSet: privileged")
	}
	if got := strs(sc, "capabilities", "drop"); !slices.Equal(got, []string{"ALL"}) {
		t.Errorf("DaemonSet: capabilities drop %v, want [ALL]", got)
	}
	add := strs(sc, "capabilities", "add")
	if got := slices.Sorted(slices.Values(add)); !slices.Equal(got, agentCaps) {
		t.Errorf("DaemonSet: capabilities add %v, want %v", got, agentCaps)
	}
	addNode := findNode(ds.node, append(cpath, "securityContext", "capabilities", "add")...)
	for _, n := range addNode.Content {
		if strings.TrimSpace(n.HeadComment+n.LineComment) == "" {
			t.Errorf("DaemonSet: capability %s added without a comment saying why", n.Value)
		}
	}
	if ro, _ := get(sc, "readOnlyRootFilesystem").(bool); !ro {
		t.Error("DaemonSet: root filesystem writable")
	}

	args := parseArgs(t, "DaemonSet", strs(c, "args"), defaults)
	flag := withDefaults(args, defaults)
	sock := flag("socket.path")
	if sock != wire.DefaultSocketPath {
		t.Errorf("DaemonSet: socket %s, want the default %s that servers dial", sock, wire.DefaultSocketPath)
	}
	if g := flag("socket.group"); g != "" && toString(get(sc, "runAsGroup")) != g {
		t.Errorf("DaemonSet: runAsGroup %v, want the socket's group %s (hangupd has no CAP_CHOWN)", get(sc, "runAsGroup"), g)
	}
	sockDir := path.Dir(sock)
	if hp, ro := hostPathMount(pod, c, sockDir); hp != sockDir || ro {
		t.Errorf("DaemonSet: %s is mounted from hostPath %q (read-only %v), want %s read-write", sockDir, hp, ro, sockDir)
	}
	metricsPort := listenPort(t, flag("web.listen-address"))
	if want := listenPort(t, defaults["web.listen-address"]); metricsPort != want {
		t.Errorf("DaemonSet: metrics on %d, hangupd's default is %d", metricsPort, want)
	}
	if p := portNumber(c, "metrics"); p != metricsPort {
		t.Errorf("DaemonSet: containerPort metrics %d, want %d", p, metricsPort)
	}
	for _, probe := range []string{"readinessProbe", "livenessProbe"} {
		if p := portNumber(c, get(c, probe, "httpGet", "port")); p != metricsPort {
			t.Errorf("DaemonSet: %s on port %d, want %d", probe, p, metricsPort)
		}
	}
	if p := str(c, "readinessProbe", "httpGet", "path"); p != flag("web.telemetry-path") {
		t.Errorf("DaemonSet: readiness on %s, want the telemetry path %s", p, flag("web.telemetry-path"))
	}
	ann := get(ds.obj, "spec", "template", "metadata", "annotations")
	if str(ann, "prometheus.io/port") != strconv.Itoa(metricsPort) || str(ann, "prometheus.io/path") != flag("web.telemetry-path") || str(ann, "prometheus.io/scrape") != "true" {
		t.Errorf("DaemonSet: scrape annotations %v, want port %d, path %s", ann, metricsPort, flag("web.telemetry-path"))
	}
	for _, k := range []string{"requests", "limits"} {
		if get(c, "resources", k, "memory") == nil {
			t.Errorf("DaemonSet: no memory %s", k)
		}
	}

	// Prometheus: the Service's name is the job the rules select.
	svc, ok := ms["Service/hangupd"]
	if !ok {
		t.Fatal("no Service/hangupd")
	}
	rules, _ := os.ReadFile(rulesFile)
	if !bytes.Contains(rules, []byte(`job="hangupd"`)) {
		t.Errorf(`%s does not select job="hangupd", the Service's name`, rulesFile)
	}
	svcPort := get(svc.obj, "spec", "ports", "0")
	if p := portNumber(c, get(svcPort, "targetPort")); p != metricsPort {
		t.Errorf("Service: targetPort is port %d, want %d", p, metricsPort)
	}
	sm, ok := ms["ServiceMonitor/hangupd"]
	if !ok {
		t.Fatal("no ServiceMonitor/hangupd")
	}
	if got, want := str(sm.obj, "spec", "endpoints", "0", "port"), str(svcPort, "name"); got != want {
		t.Errorf("ServiceMonitor: endpoint port %q, Service port %q", got, want)
	}
	if got, want := str(sm.obj, "spec", "selector", "matchLabels", "app.kubernetes.io/name"), str(svc.obj, "metadata", "labels", "app.kubernetes.io/name"); got != want || got == "" {
		t.Errorf("ServiceMonitor selects %q, the Service is labelled %q", got, want)
	}

	// The example server: the agent source, the socket directory mounted
	// where httpx dials by default, and the socket's group.
	om := loadManifests(t, "kubernetes/orders.yaml")
	dep, ok := om["Deployment/orders"]
	if !ok {
		t.Fatal("no Deployment/orders")
	}
	opod := get(dep.obj, "spec", "template", "spec")
	oc, _ := container(t, dep, "orders")
	oargs := parseArgs(t, "orders", strs(oc, "args"), ordersDefaults(t))
	if oargs["httpx.source"] != "agent" {
		t.Errorf("orders: --httpx.source=%q, want agent", oargs["httpx.source"])
	}
	if hp, _ := hostPathMount(opod, oc, sockDir); hp != sockDir {
		t.Errorf("orders: %s is mounted from hostPath %q, want %s", sockDir, hp, sockDir)
	}
	groups := strs(opod, "securityContext", "supplementalGroups")
	if g := flag("socket.group"); g == "" || !slices.Contains(groups, g) {
		t.Errorf("orders: supplementalGroups %v lack the socket's group %q", groups, g)
	}
	osc := get(oc, "securityContext")
	if v, _ := get(osc, "allowPrivilegeEscalation").(bool); v || get(osc, "allowPrivilegeEscalation") == nil {
		t.Error("orders: allowPrivilegeEscalation not false")
	}
	if got := strs(osc, "capabilities", "drop"); !slices.Equal(got, []string{"ALL"}) {
		t.Errorf("orders: capabilities drop %v, want [ALL]", got)
	}
}

// ordersDefaults builds the orders example and returns its flags.
func ordersDefaults(t *testing.T) map[string]string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "orders")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Dir = "../examples/orders"
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building examples/orders: %v\n%s", err, out)
	}
	return flagDefaults(t, bin)
}

// TestDockerfile checks the image: FROM scratch, the static binary as the
// entrypoint, the metrics port and socket directory of the defaults, and a
// binary that really is static when built as the Dockerfile says.
func TestDockerfile(t *testing.T) {
	defaults := hangupdDefaults(t)
	b, err := os.ReadFile("docker/hangupd.Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	inst := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, _ := strings.Cut(line, " ")
		inst[k] = v
	}
	if inst["FROM"] != "scratch" {
		t.Errorf("FROM %q, want scratch", inst["FROM"])
	}
	if inst["ENTRYPOINT"] != `["/hangupd"]` || inst["COPY"] != "hangupd /hangupd" {
		t.Errorf("ENTRYPOINT %s, COPY %s: want hangupd (from the bin/ context) copied to /hangupd and run", inst["ENTRYPOINT"], inst["COPY"])
	}
	var cmdArgs []string
	if err := yaml.Unmarshal([]byte(inst["CMD"]), &cmdArgs); err != nil {
		t.Fatalf("CMD %s: %v", inst["CMD"], err)
	}
	flag := withDefaults(parseArgs(t, "Dockerfile CMD", cmdArgs, defaults), defaults)
	if p := strconv.Itoa(listenPort(t, flag("web.listen-address"))); inst["EXPOSE"] != p {
		t.Errorf("EXPOSE %s, metrics on %s", inst["EXPOSE"], p)
	}
	if flag("socket.path") != wire.DefaultSocketPath || inst["VOLUME"] != `["`+path.Dir(wire.DefaultSocketPath)+`"]` {
		t.Errorf("socket %s, VOLUME %s: want %s in a volume", flag("socket.path"), inst["VOLUME"], wire.DefaultSocketPath)
	}

	// The binary, built as the Dockerfile's comment says, has no
	// interpreter: it runs in an empty image.
	f, err := elf.Open(buildStatic(t))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("hangupd built with CGO_ENABLED=0 is dynamically linked (%v)", p.Type)
		}
	}
}

// buildStatic builds hangupd as the Dockerfile says, into a directory
// removed when the test ends, and returns its path.
func buildStatic(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "hangupd")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "github.com/hangup-io/hangup/cmd/hangupd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building hangupd: %v\n%s", err, out)
	}
	return bin
}

// TestPrometheusRuleMatchesRules: the Prometheus Operator's copy of the
// rules (deploy/kubernetes/prometheusrule.yaml) holds exactly the groups of
// the rules file that promtool tests.
func TestPrometheusRuleMatchesRules(t *testing.T) {
	pr, ok := loadManifests(t, "kubernetes/prometheusrule.yaml")["PrometheusRule/hangup"]
	if !ok {
		t.Fatal("no PrometheusRule/hangup")
	}
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var rules map[string]any
	if err := yaml.Unmarshal(b, &rules); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(get(pr.obj, "spec", "groups"), rules["groups"]) {
		t.Errorf("kubernetes/prometheusrule.yaml differs from %s: regenerate it with the command at its top", rulesFile)
	}
}
