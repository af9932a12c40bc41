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

	"strconv"
	"syscall"

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

// TestSystemdCapabilities runs hangupd as the unit does, without systemd: a
// user of its own (DynamicUser), the socket's group as a supplementary
// group, the unit's ambient capabilities and nothing else, and the unit's
// arguments (socket in a runtime directory of the user's, metrics on a free
// port, the group by number). It must load the probe, create its socket and
// seed a listener registered from another network namespace.
func TestSystemdCapabilities(t *testing.T) {
	testnet.RequireRoot(t)
	bin := testutil.BuildHangupd(t)
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	u := unitValues(t, b)
	const uid, gid = 61807, 61808 // a dynamic user's range; the group stands for "hangup"
	var ambient []uintptr
	for _, c := range strings.Fields(strings.Join(u["AmbientCapabilities"], " ")) {
		n, ok := capNames[strings.TrimPrefix(c, "CAP_")]
		if !ok {
			t.Fatalf("AmbientCapabilities: %s unknown to this test", c)
		}
		ambient = append(ambient, uintptr(n))
	}
	// RuntimeDirectory=hangup: /run/hangup, owned by the user. (t.TempDir
	// is not: its parents are closed to other users.)
	top, err := os.MkdirTemp("", "hangup-unit")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(top) })
	runDir := filepath.Join(top, "hangup")
	if err := os.Mkdir(runDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(runDir, uid, uid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(top, 0o755); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	sock := filepath.Join(runDir, "hangup.sock")
	var args []string
	for _, a := range strings.Fields(strings.Join(u["ExecStart"], " "))[1:] {
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		switch name {
		case "socket.path":
			a = "--socket.path=" + sock
		case "socket.group":
			a = "--socket.group=" + strconv.Itoa(gid)
		case "web.listen-address":
			a = "--web.listen-address=" + addr
		}
		args = append(args, a)
	}
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential:  &syscall.Credential{Uid: uid, Gid: uid, Groups: []uint32{gid}},
		AmbientCaps: ambient,
		Pdeathsig:   syscall.SIGKILL,
	}
	logs := &testutil.Buffer{}
	runAgent(t, cmd, agentProcess{url: "http://" + addr + "/metrics", socket: sock}, logs)
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != uid || st.Gid != gid || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket owner %d:%d mode %v, want %d:%d 0660", st.Uid, st.Gid, fi.Mode().Perm(), uid, gid)
	}
	agentServer(t, testnet.NewPair(t).Server, sock)
	waitFor(t, "the listener's registration", func() (bool, string) {
		return strings.Contains(logs.String(), "msg=\"listener registered\""), "not in the agent's log"
	})
	if strings.Contains(logs.String(), "seeding the listener's existing connections") {
		t.Errorf("seeding a listener in another namespace failed with the unit's capabilities:\n%s", logs.String())
	}
}
