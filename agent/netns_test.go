package agent

import (
	"testing"

	"github.com/hangup-io/hangup/bpf"
)

func TestParseCgroup(t *testing.T) {
	const id = "3f4c1d2e5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d"
	cases := []struct {
		name, content, id, pod string
	}{
		{"docker v1", "12:pids:/docker/" + id + "\n11:memory:/docker/" + id + "\n", id, ""},
		{"docker systemd v2", "0::/system.slice/docker-" + id + ".scope\n", id, ""},
		{"containerd kubepods cgroupfs", "0::/kubepods/burstable/pod0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b/" + id + "\n",
			id, "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"},
		{"containerd kubepods systemd", "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8a9b_0c1d2e3f4a5b.slice/cri-containerd-" + id + ".scope\n",
			id, "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"},
		{"cri-o", "0::/kubepods.slice/kubepods-pod0f1e2d3c_4b5a_6978_8a9b_0c1d2e3f4a5b.slice/crio-" + id + ".scope\n",
			id, "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"},
		{"podman", "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-" + id + ".scope/container\n", id, ""},
		{"host process", "0::/system.slice/sshd.service\n", "", ""},
		{"user session", "0::/user.slice/user-1000.slice/session-3.scope\n", "", ""},
		{"not hex", "0::/docker/" + "z" + id[1:] + "\n", "", ""},
		{"garbage", "no colons here\n::\n", "", ""},
		{"empty", "", "", ""},
	}
	for _, c := range cases {
		gotID, gotPod := parseCgroup(c.content)
		if gotID != c.id || gotPod != c.pod {
			t.Errorf("%s: container %q pod %q, want %q %q", c.name, gotID, gotPod, c.id, c.pod)
		}
	}
}

func TestParseListeningInodes(t *testing.T) {
	const table = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A2B4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 51234 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0
   3: short line
`
	got := parseListeningInodes(table)
	if len(got) != 2 || got[0] != 41234 || got[1] != 999 {
		t.Errorf("listening inodes %v, want [41234 999]", got)
	}
	for link, want := range map[string]uint64{"socket:[41234]": 41234, "pipe:[5]": 0, "socket:[x]": 0, "/dev/null": 0} {
		if got, ok := socketInode(link); got != want || ok != (want != 0) {
			t.Errorf("socketInode(%q) = %d %v", link, got, ok)
		}
	}
}

// The caps: namespaces beyond maxNS fold into netns="other", ports beyond
// maxPorts into port="other" of their namespace; what has a label keeps it,
// and the folds are counted.
func TestLabellerCaps(t *testing.T) {
	l := labeller{maxNS: 2, maxPorts: 2, ns: map[uint32]map[uint16]bool{}}
	pc := func(opened uint64) bpf.PortCounters { return bpf.PortCounters{Opened: opened} }
	first := map[bpf.PortKey]bpf.PortCounters{
		{NetNS: 1, Port: 80}: pc(10), {NetNS: 1, Port: 81}: pc(9), {NetNS: 1, Port: 82}: pc(1),
		{NetNS: 2, Port: 80}: pc(5),
		{NetNS: 3, Port: 80}: pc(1), {NetNS: 3, Port: 90}: pc(2),
	}
	g, ns, ports := l.group(first)
	want := map[labelKey]uint64{
		{"1", "80"}: 10, {"1", "81"}: 9, {"1", other}: 1,
		{"2", "80"}:    5,
		{other, other}: 3,
	}
	check := func(g map[labelKey]*bpf.PortCounters) {
		t.Helper()
		if len(g) != len(want) {
			t.Errorf("%d groups, want %d: %v", len(g), len(want), g)
		}
		for k, v := range want {
			if g[k] == nil || g[k].Opened != v {
				t.Errorf("group %v = %+v, want opened %d", k, g[k], v)
			}
		}
	}
	check(g)
	if ns != 1 || ports != 1 {
		t.Errorf("folded: %d namespaces, %d ports; want 1 and 1", ns, ports)
	}
	// Later, namespace 3 is the busiest: it stays folded, labels do not move.
	first[bpf.PortKey{NetNS: 3, Port: 80}] = pc(1000)
	want[labelKey{other, other}] = 1002
	g, _, _ = l.group(first)
	check(g)
	if got := l.namespaces(); len(got) != 2 || got[0] != 1 || got[1] != 2 {
		t.Errorf("labelled namespaces %v", got)
	}
}
