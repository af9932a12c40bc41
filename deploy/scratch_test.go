package deploy

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
	"github.com/hangup-io/hangup/internal/wire"
	"golang.org/x/sys/unix"
)

// The test binary re-executed as the container runtime of TestScratchImage
// reads these.
const (
	scratchRootEnv = "HANGUP_DEPLOY_SCRATCH_ROOT"
	scratchArgsEnv = "HANGUP_DEPLOY_SCRATCH_ARGS" // hangupd's arguments, one a line
	scratchCapsEnv = "HANGUP_DEPLOY_SCRATCH_CAPS" // capabilities kept, comma-separated numbers
	scratchGIDEnv  = "HANGUP_DEPLOY_SCRATCH_GID"  // the container's group (runAsGroup)
)

func TestMain(m *testing.M) {
	if root := os.Getenv(scratchRootEnv); root != "" {
		if err := scratchRuntime(root); err != nil {
			fmt.Fprintln(os.Stderr, "scratch runtime:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// scratchRuntime does, in a private mount namespace (unshare --mount), what
// a container runtime does for the DaemonSet's container: a read-only root
// that holds only /hangupd, the socket directory writable, /proc and /sys, a capability bounding set of only the
// added capabilities, then /hangupd run as uid 0 and the container's group
// (runAsGroup), chrooted there. Its
// effective capabilities are then exactly those. SIGTERM is passed on.
func scratchRuntime(root string) error {
	// The root read-only (readOnlyRootFilesystem), but for the socket's
	// directory (the hostPath volume); the host's /proc and /sys.
	sockDir := filepath.Join(root, path.Dir(wire.DefaultSocketPath))
	for _, m := range []struct {
		from, to string
		flags    uintptr
	}{
		{root, root, unix.MS_BIND | unix.MS_REC},
		{sockDir, sockDir, unix.MS_BIND},
		{"/proc", filepath.Join(root, "proc"), unix.MS_BIND | unix.MS_REC},
		{"/sys", filepath.Join(root, "sys"), unix.MS_BIND | unix.MS_REC},
		{"", root, unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY},
	} {
		if err := unix.Mount(m.from, m.to, "", m.flags, ""); err != nil {
			return fmt.Errorf("mounting %s on %s: %w", m.from, m.to, err)
		}
	}
	keep := map[int]bool{}
	for _, c := range strings.Split(os.Getenv(scratchCapsEnv), ",") {
		n, err := strconv.Atoi(c)
		if err != nil {
			return fmt.Errorf("capability %q: %w", c, err)
		}
		keep[n] = true
	}
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return err
	}
	last, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return err
	}
	// The bounding set is per thread: drop it on the thread that forks.
	runtime.LockOSThread()
	for c := 0; c <= last; c++ {
		if !keep[c] {
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
				return fmt.Errorf("dropping capability %d: %w", c, err)
			}
		}
	}
	gid, err := strconv.Atoi(os.Getenv(scratchGIDEnv))
	if err != nil {
		return fmt.Errorf("group: %w", err)
	}
	cmd := &exec.Cmd{
		Path:   "/hangupd",
		Args:   append([]string{"/hangupd"}, strings.Split(os.Getenv(scratchArgsEnv), "\n")...),
		Dir:    "/",
		Env:    []string{},
		Stdout: os.Stdout,
		Stderr: os.Stderr,
		SysProcAttr: &syscall.SysProcAttr{
			Chroot:     root,
			Credential: &syscall.Credential{Uid: 0, Gid: uint32(gid), Groups: []uint32{}},
			Pdeathsig:  syscall.SIGKILL,
		},
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	if err := cmd.Start(); err != nil {
		return err
	}
	go func() {
		for s := range sigs {
			cmd.Process.Signal(s)
		}
	}()
	return cmd.Wait()
}

// capNames maps the manifests' capability names to numbers.
var capNames = map[string]int{
	"BPF": unix.CAP_BPF, "PERFMON": unix.CAP_PERFMON,
	"NET_ADMIN": unix.CAP_NET_ADMIN, "SYS_ADMIN": unix.CAP_SYS_ADMIN,
}

// TestScratchImage runs the image the way the DaemonSet does, without a
// container engine: the static binary alone in an empty root (as FROM
// scratch: no /etc, no libc) with the host's /proc and /sys, as uid 0 and
// the DaemonSet's group with only its added capabilities, and its own
// arguments. It must load the probe, serve metrics, create its socket with
// the numeric group, and seed a listener registered from another network
// namespace (SIOCGSKNS and setns with those capabilities).
func TestScratchImage(t *testing.T) {
	testnet.RequireRoot(t)
	if _, err := exec.LookPath("unshare"); err != nil {
		testnet.SkipOrFail(t, "needs unshare from util-linux: %v", err)
	}
	ds := loadManifests(t, "kubernetes/hangupd.yaml")["DaemonSet/hangupd"]
	c, _ := container(t, ds, "hangupd")
	var caps []string
	for _, name := range strs(c, "securityContext", "capabilities", "add") {
		n, ok := capNames[name]
		if !ok {
			t.Fatalf("DaemonSet adds capability %s, unknown to this test", name)
		}
		caps = append(caps, strconv.Itoa(n))
	}
	// The DaemonSet's arguments, but metrics on a free loopback port: this
	// runs in the host's network namespace, not a pod's.
	addr := freeAddr(t)
	var args []string
	for _, a := range strs(c, "args") {
		if !strings.HasPrefix(a, "--web.listen-address=") {
			args = append(args, a)
		}
	}
	args = append(args, "--web.listen-address="+addr)

	root := t.TempDir()
	for _, d := range []string{"proc", "sys", strings.TrimPrefix(path.Dir(wire.DefaultSocketPath), "/")} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, buildStatic(t), filepath.Join(root, "hangupd"))

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", self, "-test.run=^$")
	gid := get(c, "securityContext", "runAsGroup")
	if gid == nil {
		gid = get(ds.obj, "spec", "template", "spec", "securityContext", "runAsGroup")
	}
	if gid == nil {
		gid = 0
	}
	cmd.Env = append(os.Environ(), scratchRootEnv+"="+root, scratchArgsEnv+"="+strings.Join(args, "\n"),
		scratchCapsEnv+"="+strings.Join(caps, ","), fmt.Sprintf("%s=%d", scratchGIDEnv, gid))
	sock := filepath.Join(root, wire.DefaultSocketPath)
	logs := &testutil.Buffer{}
	runAgent(t, cmd, agentProcess{url: "http://" + addr + "/metrics", socket: sock}, logs)

	// Effective capabilities: the DaemonSet's, less CAP_BPF and CAP_PERFMON
	// once the probe is attached (--caps.drop=auto): only CAP_NET_ADMIN
	// and CAP_SYS_ADMIN stay, for seeding listeners of other namespaces.
	var want uint64
	for _, c := range caps {
		n, _ := strconv.Atoi(c)
		want |= 1 << n
	}
	waitFor(t, "the capability drop", func() (bool, string) {
		return strings.Contains(logs.String(), `"msg":"capabilities dropped"`), "not in the agent's log"
	})
	want &= 1<<unix.CAP_NET_ADMIN | 1<<unix.CAP_SYS_ADMIN
	if strings.Contains(logs.String(), "needs CAP_BPF on this kernel") {
		want |= 1 << unix.CAP_BPF
	}
	if got := capEff(t, childOf(t, cmd.Process.Pid)); got != want {
		t.Errorf("hangupd's CapEff %#x, want %#x (the DaemonSet's capabilities that it keeps after start)", got, want)
	}
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if group := withDefaults(parseArgs(t, "DaemonSet", args, hangupdDefaults(t)), nil)("socket.group"); strconv.Itoa(int(st.Gid)) != group || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket group %d mode %v, want group %s mode 0660", st.Gid, fi.Mode().Perm(), group)
	}
	if mfs := scrape(t, "http://"+addr+"/metrics"); mfs["hangup_build_info"] == nil {
		t.Error("no hangup_build_info in the scrape")
	}

	// A server in another namespace registers its listener: seeding it
	// enters that namespace.
	agentServer(t, testnet.NewPair(t).Server, sock)
	waitFor(t, "the listener's registration", func() (bool, string) {
		return strings.Contains(logs.String(), `"msg":"listener registered"`), "not in the agent's log"
	})
	if strings.Contains(logs.String(), "seeding the listener's existing connections") {
		t.Errorf("seeding a listener in another namespace failed with the DaemonSet's capabilities:\n%s", logs.String())
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// childOf returns the one child process of pid.
func childOf(t *testing.T, pid int) int {
	t.Helper()
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	if err != nil {
		t.Fatal(err)
	}
	var kids []string
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		kids = append(kids, strings.Fields(string(b))...)
	}
	if len(kids) != 1 {
		t.Fatalf("process %d has children %v, want one (hangupd)", pid, kids)
	}
	n, _ := strconv.Atoi(kids[0])
	return n
}

// capEff reads a process's effective capabilities.
func capEff(t *testing.T, pid int) uint64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no CapEff in /proc/%d/status", pid)
	return 0
}
