package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
	"github.com/hangup-io/hangup/internal/wire"
)

// requireTool returns the path of a tool the deploy checks need: a missing
// one skips the test, or fails it when HANGUP_REQUIRE_BPF=1 (CI, where
// `make deps` installs it).
func requireTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		testnet.SkipOrFail(t, "%s not installed (Debian package %s): %v", name, pkg, err)
	}
	return p
}

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Errorf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestPromtoolCheckRules: the rules file is valid for Prometheus.
func TestPromtoolCheckRules(t *testing.T) {
	promtool := requireTool(t, "promtool", "prometheus")
	out := runTool(t, promtool, "check", "rules", rulesFile)
	if !strings.Contains(out, "SUCCESS") {
		t.Errorf("promtool check rules: %s", out)
	}
}

// TestPromtoolTestRules runs the rules' unit tests: every alert firing and
// not firing, the minimum-traffic guards included.
func TestPromtoolTestRules(t *testing.T) {
	promtool := requireTool(t, "promtool", "prometheus")
	out := runTool(t, promtool, "test", "rules", "prometheus/tests/hangup.test.yml")
	if !strings.Contains(out, "SUCCESS") {
		t.Errorf("promtool test rules: %s", out)
	}
	// Every alert of the rules has a test that expects it to fire.
	tests, err := os.ReadFile("prometheus/tests/hangup.test.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range loadRules(t) {
		if r.Alert != "" && !bytes.Contains(tests, []byte("alertname: "+r.Alert+"\n")) {
			t.Errorf("alert %s has no promtool test", r.Alert)
		}
	}
}

const unitFile = "systemd/hangupd.service"

// unitValues returns every Key=value of a unit file (continued lines
// joined), by key.
func unitValues(t *testing.T, b []byte) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	text := strings.ReplaceAll(string(b), "\\\n", " ")
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Errorf("%s: %q is no Key=value", unitFile, line)
			continue
		}
		out[k] = append(out[k], v)
	}
	return out
}

// TestSystemdUnit checks the unit against the agent's defaults and the
// DaemonSet's capabilities, and verifies it with systemd-analyze verify
// (with ExecStart pointing at a freshly built hangupd, since verify wants
// the binary to exist).
func TestSystemdUnit(t *testing.T) {
	bin := testutil.BuildHangupd(t)
	defaults := flagDefaults(t, bin)
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	u := unitValues(t, b)
	execStart := strings.Fields(strings.Join(u["ExecStart"], " "))
	if len(execStart) == 0 || execStart[0] != "/usr/local/bin/hangupd" {
		t.Fatalf("ExecStart %v, want /usr/local/bin/hangupd ...", execStart)
	}
	flag := withDefaults(parseArgs(t, "ExecStart", execStart[1:], defaults), defaults)
	if flag("socket.path") != wire.DefaultSocketPath {
		t.Errorf("socket %s, want the default %s that servers dial", flag("socket.path"), wire.DefaultSocketPath)
	}
	if rd := "/run/" + strings.Join(u["RuntimeDirectory"], ""); rd != path.Dir(wire.DefaultSocketPath) {
		t.Errorf("RuntimeDirectory gives %s, the socket lives in %s", rd, path.Dir(wire.DefaultSocketPath))
	}
	if flag("web.listen-address") != defaults["web.listen-address"] {
		t.Errorf("metrics on %s, the default (and the DaemonSet's) is %s", flag("web.listen-address"), defaults["web.listen-address"])
	}
	var want []string
	for _, c := range agentCaps {
		want = append(want, "CAP_"+c)
	}
	for _, k := range []string{"AmbientCapabilities", "CapabilityBoundingSet"} {
		if got := slices.Sorted(slices.Values(strings.Fields(strings.Join(u[k], " ")))); !slices.Equal(got, want) {
			t.Errorf("%s %v, want %v (as the DaemonSet)", k, got, want)
		}
	}
	for _, k := range []string{"DynamicUser", "NoNewPrivileges", "ProtectHome", "PrivateTmp"} {
		if strings.Join(u[k], "") != "yes" {
			t.Errorf("%s=%v, want yes", k, u[k])
		}
	}
	if strings.Join(u["ProtectSystem"], "") != "strict" {
		t.Errorf("ProtectSystem=%v, want strict", u["ProtectSystem"])
	}

	// Optional: systemd-analyze is not on every machine that runs the tests.
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skipf("systemd-analyze not installed, unit not verified: %v", err)
	}
	unit := filepath.Join(t.TempDir(), "hangupd.service")
	if err := os.WriteFile(unit, bytes.ReplaceAll(b, []byte("/usr/local/bin/hangupd"), []byte(bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := runTool(t, analyze, "verify", unit); strings.TrimSpace(out) != "" {
		t.Errorf("systemd-analyze verify: %s", out)
	}
	if out, err := execOut(analyze, "security", "--offline=true", unit); err == nil {
		lines := strings.Split(strings.TrimSpace(out), "\n")
		t.Logf("systemd-analyze security: %s", lines[len(lines)-1])
	}
}

func execOut(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}
