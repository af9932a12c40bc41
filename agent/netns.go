package agent

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Where the host's network namespaces are found: every process's, and
// those that `ip netns` names (bind mounts that no process may be in).
const (
	procRoot  = "/proc"
	runNetns  = "/run/netns"
	infoTTL   = time.Minute // how long hangup_netns_info's answers are kept
	maxInfoNS = 4096        // namespaces whose info is kept at most
)

// netnsRef is one network namespace of the host, found by its inode.
type netnsRef struct {
	inode uint32
	path  string // a file that refers to it: /proc/PID/ns/net or /run/netns/NAME
	pids  []int  // processes in it, ascending
}

// listNamespaces finds the host's network namespaces: those of processes
// (/proc/*/ns/net) and the named ones (/run/netns), deduplicated by inode.
func listNamespaces(proc, named string) (map[uint32]*netnsRef, error) {
	out := make(map[uint32]*netnsRef)
	ents, err := os.ReadDir(proc)
	if err != nil {
		return nil, fmt.Errorf("listing processes: %w", err)
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		path := filepath.Join(proc, e.Name(), "ns", "net")
		ino, err := nsInode(path)
		if err != nil {
			continue // gone, or a kernel thread
		}
		r := out[ino]
		if r == nil {
			r = &netnsRef{inode: ino, path: path}
			out[ino] = r
		}
		r.pids = append(r.pids, pid)
	}
	if ents, err := os.ReadDir(named); err == nil {
		for _, e := range ents {
			path := filepath.Join(named, e.Name())
			ino, err := nsInode(path)
			if err != nil {
				continue
			}
			if out[ino] == nil {
				out[ino] = &netnsRef{inode: ino, path: path}
			}
		}
	}
	for _, r := range out {
		slices.Sort(r.pids)
	}
	return out, nil
}

func nsInode(path string) (uint32, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, errors.New("no inode")
	}
	return uint32(st.Ino), nil
}

// inNetNS runs fn on an OS thread that has entered the namespace path
// refers to. Sockets made in fn stay in that namespace.
func inNetNS(path string, fn func() error) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace %s (setns needs CAP_SYS_ADMIN): %w", path, err)
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread() // else the thread dies with the goroutine
		}
		errc <- err
	}()
	return <-errc
}

// seedAll seeds every network namespace of the host, all ports, and
// returns how many connections it added. A namespace that fails is logged
// and skipped.
func (a *Agent) seedAll() (int, error) {
	spaces, err := listNamespaces(procRoot, runNetns)
	if err != nil {
		return 0, err
	}
	total := 0
	var errs []error
	for _, r := range spaces {
		n, err := a.seedNamespace(r.path)
		total += n
		if err != nil {
			errs = append(errs, fmt.Errorf("netns %d: %w", r.inode, err))
		}
	}
	if len(errs) > 0 {
		a.log.Warn("seeding some network namespaces failed", "namespaces", len(spaces), "failed", len(errs), "err", errors.Join(errs...))
	}
	return total, nil
}

// seedNamespace seeds the namespace path refers to.
func (a *Agent) seedNamespace(path string) (int, error) {
	var (
		h      *netlink.Handle
		cookie uint64
	)
	err := inNetNS(path, func() (err error) {
		if cookie, err = currentNetNSCookie(); err != nil {
			return err
		}
		h, err = netlink.NewHandle(unix.NETLINK_INET_DIAG)
		return err
	})
	if err != nil {
		return 0, err
	}
	defer h.Close()
	return a.seed(h, cookie, 0)
}

// nsInfo is what runs in a network namespace, for hangup_netns_info.
type nsInfo struct {
	process     string // the name (comm) of a process holding a listening socket there
	containerID string
	podUID      string
	at          time.Time
}

// nsInfoCache keeps the namespaces' info for infoTTL.
type nsInfoCache struct {
	mu     sync.Mutex
	byNS   map[uint32]nsInfo
	listed time.Time
	refs   map[uint32]*netnsRef
}

// netnsInfo returns what runs in namespace ns, looked up at most once per
// infoTTL.
func (a *Agent) netnsInfo(ns uint32) nsInfo {
	c := &a.nsInfo
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if in, ok := c.byNS[ns]; ok && now.Sub(in.at) < infoTTL {
		return in
	}
	if c.refs == nil || now.Sub(c.listed) >= infoTTL {
		refs, err := listNamespaces(procRoot, runNetns)
		if err != nil {
			a.log.Warn("listing network namespaces", "err", err)
		}
		c.refs, c.listed = refs, now
	}
	in := lookupInfo(procRoot, c.refs[ns])
	in.at = now
	if c.byNS == nil || len(c.byNS) >= maxInfoNS {
		c.byNS = make(map[uint32]nsInfo)
	}
	c.byNS[ns] = in
	return in
}

// lookupInfo finds the first process of r (lowest PID) that holds a
// listening TCP socket of the namespace, and reads its name and cgroup.
// Without one, the namespace's first process stands in; a namespace
// without processes has no info.
func lookupInfo(proc string, r *netnsRef) nsInfo {
	if r == nil || len(r.pids) == 0 {
		return nsInfo{}
	}
	listening := make(map[uint64]bool)
	for _, f := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(filepath.Join(proc, strconv.Itoa(r.pids[0]), "net", f))
		if err == nil {
			for _, ino := range parseListeningInodes(string(b)) {
				listening[ino] = true
			}
		}
	}
	pick := r.pids[0]
	for _, pid := range r.pids {
		if holdsSocket(proc, pid, listening) {
			pick = pid
			break
		}
	}
	var in nsInfo
	if b, err := os.ReadFile(filepath.Join(proc, strconv.Itoa(pick), "comm")); err == nil {
		in.process = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile(filepath.Join(proc, strconv.Itoa(pick), "cgroup")); err == nil {
		in.containerID, in.podUID = parseCgroup(string(b))
	}
	return in
}

// holdsSocket reports whether process pid has one of the sockets open.
func holdsSocket(proc string, pid int, inodes map[uint64]bool) bool {
	if len(inodes) == 0 {
		return false
	}
	dir := filepath.Join(proc, strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		if ino, ok := socketInode(link); ok && inodes[ino] {
			return true
		}
	}
	return false
}

// socketInode parses a descriptor link of the form "socket:[12345]".
func socketInode(link string) (uint64, bool) {
	s, ok := strings.CutPrefix(link, "socket:[")
	if !ok {
		return 0, false
	}
	s, ok = strings.CutSuffix(s, "]")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil
}

// parseListeningInodes returns the socket inodes of the listening sockets
// in a /proc/net/tcp or tcp6 table (state 0A).
func parseListeningInodes(table string) []uint64 {
	var out []uint64
	sc := bufio.NewScanner(strings.NewReader(table))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		// sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
		if len(f) < 10 || f[3] != "0A" {
			continue
		}
		if ino, err := strconv.ParseUint(f[9], 10, 64); err == nil && ino != 0 {
			out = append(out, ino)
		}
	}
	return out
}

// parseCgroup finds a container id and a Kubernetes pod UID in the
// contents of /proc/PID/cgroup (v1 or v2), from the path shapes of the
// common runtimes:
//
//	docker:     /docker/<id>, /system.slice/docker-<id>.scope
//	containerd: /kubepods/burstable/pod<uid>/<id>,
//	            /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
//	cri-o:      .../crio-<id>.scope
//	podman:     .../libpod-<id>.scope
//
// An id is 64 hexadecimal digits. Either result is empty when the path
// does not show it.
func parseCgroup(content string) (containerID, podUID string) {
	for _, line := range strings.Split(content, "\n") {
		// hierarchy-ID:controllers:path
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, seg := range strings.Split(parts[2], "/") {
			if uid := podUIDOf(seg); uid != "" && podUID == "" {
				podUID = uid
			}
			if id := containerIDOf(seg); id != "" {
				containerID = id // the innermost wins
			}
		}
		if containerID != "" {
			break
		}
	}
	return containerID, podUID
}

// containerIDOf returns the container id a cgroup path segment names.
func containerIDOf(seg string) string {
	seg = strings.TrimSuffix(seg, ".scope")
	if i := strings.LastIndexAny(seg, "-:"); i >= 0 {
		seg = seg[i+1:]
	}
	if len(seg) != 64 {
		return ""
	}
	for _, c := range seg {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return ""
		}
	}
	return seg
}

// podUIDOf returns the pod UID a cgroup path segment names ("pod<uid>", or
// systemd's "kubepods-<qos>-pod<uid_with_underscores>.slice").
func podUIDOf(seg string) string {
	seg = strings.TrimSuffix(seg, ".slice")
	i := strings.LastIndex(seg, "pod")
	if i < 0 {
		return ""
	}
	uid := strings.ReplaceAll(seg[i+3:], "_", "-")
	if len(uid) != 36 || strings.Count(uid, "-") != 4 {
		return ""
	}
	for _, c := range uid {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || c == '-') {
			return ""
		}
	}
	return uid
}
