#!/usr/bin/env bash
# test-kernels.sh: boots each kernel of a list in QEMU and runs the
# privileged tests inside with HANGUP_REQUIRE_BPF=1, one kernel at a time.
# Prints one result line per kernel and exits non-zero if any kernel fails.
# See docs/kernel-matrix.md.
#
# Kernels come from Debian's archive through apt only, into a cache kept
# between runs. Settings (environment):
#   HANGUP_KERNELS        kernels to boot: apt package specs of a Debian
#                         kernel image or meta-package (pkg, pkg/suite or
#                         pkg=version), or "host" for the running kernel's
#                         Debian package. Default: see default_kernels.
#   HANGUP_KERNEL_TESTS   Go packages whose tests run in each VM (default
#                         "bpf agent httpx internal/e2e").
#   HANGUP_KERNEL_FLAGS   extra flags for every test binary, e.g.
#                         '-test.run=TestLinkCut'.
#   HANGUP_KERNEL_SYSCTLS sysctls the VM sets before the tests, e.g.
#                         'net.core.wmem_max=4194304' (default none: the
#                         tests must pass at a kernel's defaults).
#   HANGUP_KERNEL_BUDGET  seconds one kernel may take, boot to power-off
#                         (default 600); the VM is stopped after that.
#   HANGUP_KERNEL_CACHE   the cache (default /var/cache/hangup-kernels as
#                         root, else $XDG_CACHE_HOME/hangup-kernels).
#   HANGUP_KERNEL_OUT     where each kernel's logs go (default bin/test-kernels).
#   HANGUP_KERNEL_ACCEL   kvm or tcg (default: kvm when it works, else tcg).
#   HANGUP_KERNEL_CPUS, HANGUP_KERNEL_MEM  VM size (default 2 CPUs, 2048 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

default_kernels="linux-image-cloud-amd64 linux-image-cloud-amd64/bookworm-backports host"
read -r -a kernels <<<"${HANGUP_KERNELS:-$default_kernels}"
read -r -a packages <<<"${HANGUP_KERNEL_TESTS:-bpf agent httpx internal/e2e}"
budget=${HANGUP_KERNEL_BUDGET:-600}
cpus=${HANGUP_KERNEL_CPUS:-2}
mem=${HANGUP_KERNEL_MEM:-2048}
if [[ -n ${HANGUP_KERNEL_CACHE:-} ]]; then cache=$HANGUP_KERNEL_CACHE
elif [[ $(id -u) -eq 0 ]]; then cache=/var/cache/hangup-kernels
else cache=${XDG_CACHE_HOME:-$HOME/.cache}/hangup-kernels
fi
out=${HANGUP_KERNEL_OUT:-bin/test-kernels}
[[ $out == /* ]] || out=$repo/$out
# Modules the tests load: veth for testnet's pairs, nf_tables for Pair.Cut
# (nft_numgen for a lossy link: a test using another nft expression adds its
# module here; the guest loads nothing on demand), inet_diag/tcp_diag for the agent's sock_diag seeding. Dependencies are
# resolved from each kernel's own modules.dep.
modules=(veth nf_tables nft_numgen inet_diag tcp_diag)

log() { echo "test-kernels: $*" >&2; }
die() { log "$*"; exit 2; }

./scripts/ensure-debs.sh qemu-system-x86_64:qemu-system-x86 /bin/busybox:busybox-static cpio:cpio \
	depmod:kmod ip:iproute2 nft:nftables nstat:iproute2 promtool:prometheus setpriv:util-linux

# A private apt configuration over Debian's archive: bookworm with its
# security updates and backports (6.12). The machine's own sources are
# left alone; the lists and downloaded .debs stay in the cache.
aptdir=$cache/apt
mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$cache/debs" "$cache/kernels" "$out"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
{
	for suite in bookworm bookworm-updates bookworm-backports; do
		echo "deb [signed-by=$keyring] http://deb.debian.org/debian $suite main"
	done
	echo "deb [signed-by=$keyring] http://deb.debian.org/debian-security bookworm-security main"
} >"$aptdir/sources.list"
apt_opts=(-o "APT::Sandbox::User=root" -o "Dir::Etc::SourceList=$aptdir/sources.list"
	-o "Dir::Etc::SourceParts=/nonexistent" -o "Dir::State::Lists=$aptdir/lists"
	-o "Dir::Cache=$aptdir/cache")
# Refresh the package lists once a day; a failed refresh keeps the old ones.
if [[ -z $(find "$aptdir/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit) ]]; then
	log "refreshing Debian package lists in $aptdir"
	apt-get "${apt_opts[@]}" -qq update >&2 || log "apt-get update failed; using the cached lists"
fi

# resolve SPEC prints "package version" of the kernel image SPEC names,
# following a meta-package (linux-image-cloud-amd64) to the image it
# depends on.
resolve() {
	local spec=$1 uri file pkg ver dep
	uri=$(apt-get "${apt_opts[@]}" download --print-uris "$spec" 2>/dev/null | tail -n1) || return 1
	[[ -n $uri ]] || return 1
	file=$(awk '{print $2}' <<<"$uri")
	pkg=${file%%_*} ver=${file#*_} ver=${ver%_*}
	dep=$(apt-cache "${apt_opts[@]}" show "$pkg=$ver" | awk -F': ' '/^Depends:/ {print $2; exit}')
	if [[ $dep =~ ^(linux-image-[^ ,]+)\ \(=\ ([^\)]+)\) ]]; then
		pkg=${BASH_REMATCH[1]} ver=${BASH_REMATCH[2]}
	fi
	echo "$pkg $ver"
}

# fetch PKG VER prints the directory holding the kernel PKG=VER unpacked
# (boot/vmlinuz-*, lib/modules/*, with modules.dep), downloading the .deb
# through apt when it is not cached yet.
fetch() {
	local pkg=$1 ver=$2 dir=$cache/kernels/${1}_${2} deb=$cache/debs/${1}_${2}_amd64.deb
	if [[ ! -e $dir/.complete ]]; then
		if [[ ! -e $deb ]]; then
			log "downloading $pkg $ver"
			(cd "$cache/debs" && apt-get "${apt_opts[@]}" -qq download "$pkg=$ver" >&2) || return 1
			[[ -e $deb ]] || { log "apt did not write $deb"; return 1; }
		fi
		rm -rf "$dir" && mkdir -p "$dir"
		dpkg-deb -x "$deb" "$dir"
		local kver
		kver=$(basename "$(ls -d "$dir"/lib/modules/*)")
		depmod -b "$dir" "$kver"
		touch "$dir/.complete"
	fi
	echo "$dir"
}

# The part of the initramfs every kernel shares: busybox, ip/nft/nstat/
# promtool/setpriv with their libraries, the test binaries and a static hangupd.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
common=$work/common
mkdir -p "$common"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,tests,lib/modules,var}
ln -s ../run "$common/var/run"
cp /bin/busybox "$common/bin/"
for app in $(/bin/busybox --list); do
	[[ -e $common/bin/$app ]] || ln -s busybox "$common/bin/$app"
done
copy_tool() { # copy_tool PATH: a host program and its shared libraries
	local bin dst lib
	bin=$(command -v "$1") || die "$1 not found"
	dst=$common/usr/sbin/$(basename "$bin")
	rm -f "$common/bin/$(basename "$bin")" # busybox's own applet, if any
	cp -L "$bin" "$dst"
	for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*'); do
		mkdir -p "$common$(dirname "$lib")"
		cp -Ln "$lib" "$common$lib"
	done
}
for tool in ip nft nstat promtool setpriv; do copy_tool "$tool"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$common/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$common/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$common/etc/hosts"
cp scripts/kernel-vm-init.sh "$common/init"

log "building static test binaries for: ${packages[*]}"
export CGO_ENABLED=0
go build -o "$common/usr/sbin/hangupd" ./cmd/hangupd
: >"$common/tests/list"
for pkg in "${packages[@]}"; do
	name=$(basename "$pkg")
	go test -c -o "$common/tests/$name.test" "./$pkg"
	echo "$name /repo/$pkg -test.v -test.count=1 -test.timeout=$((budget - 30))s ${HANGUP_KERNEL_FLAGS:-}" >>"$common/tests/list"
done
# The repository's files, for tests that read them (testdata, ../docs):
# each test binary runs in its package's directory under /repo.
mkdir -p "$common/repo"
if git rev-parse --git-dir >/dev/null 2>&1; then
	git ls-files -z --cached --others --exclude-standard | cpio -0pdm --quiet "$common/repo" 2>/dev/null || true
else
	tar --exclude=./bin -cf - . | tar -xf - -C "$common/repo"
fi
printf 'export HANGUP_REQUIRE_BPF=1\nexport HANGUP_HANGUPD=/usr/sbin/hangupd\nHANGUP_VM_SYSCTLS="%s"\n' \
	"${HANGUP_KERNEL_SYSCTLS:-}" >"$common/tests/env"
(cd "$common" && find . | cpio -o -H newc --quiet) >"$work/common.cpio"

# Acceleration: KVM when it runs a guest here, else TCG (slower, always
# works). /dev/kvm may open and still run nothing (as on this project's
# machines): the probe boots the first kernel without a root file system
# and looks for the kernel's banner on the console.
accel=${HANGUP_KERNEL_ACCEL:-}
pick_accel() { # pick_accel VMLINUZ
	[[ -z $accel ]] || return 0
	accel=tcg
	[[ -w /dev/kvm ]] || return 0
	timeout 15 qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults -display none -no-reboot \
		-kernel "$1" -append "console=ttyS0 panic=-1" -serial "file:$work/kvm-probe.log" \
		</dev/null >/dev/null 2>&1 || true
	if grep -q 'Linux version' "$work/kvm-probe.log" 2>/dev/null; then accel=kvm
	else log "/dev/kvm does not run a guest here; using TCG"
	fi
}

# boot KVER DIR: runs the tests in a VM on that kernel; prints its result line.
failed=0
boot() {
	local label=$1 dir=$2 kver logs start secs
	kver=$(basename "$(ls -d "$dir"/lib/modules/*)")
	logs=$out/$kver
	rm -rf "$logs" && mkdir -p "$logs"
	# This kernel's modules, uncompressed, in load order.
	local mods=$work/mods-$kver m
	rm -rf "$mods" && mkdir -p "$mods/lib/modules"
	: >"$mods/modules.list"
	for m in $(modprobe -d "$dir" -S "$kver" --show-depends -a "${modules[@]}" 2>"$logs/modprobe.err" |
		awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++'); do
		local rel=${m#"$dir"/lib/modules/} name
		name=$(basename "$rel")
		case $name in
		*.ko.xz) xz -dc "$m" >"$mods/lib/modules/${name%.xz}" ;;
		*.ko.zst) zstd -qdc "$m" >"$mods/lib/modules/${name%.zst}" ;;
		*.ko.gz) gzip -dc "$m" >"$mods/lib/modules/${name%.gz}" ;;
		*) cp "$m" "$mods/lib/modules/" ;;
		esac
		echo "${name%.ko*}.ko" >>"$mods/modules.list"
	done
	(cd "$mods" && find . | cpio -o -H newc --quiet) >"$work/mods.cpio"
	cat "$work/common.cpio" "$work/mods.cpio" >"$work/initramfs.cpio"

	local vmlinuz qemu_accel
	vmlinuz=$(ls "$dir"/boot/vmlinuz-*)
	pick_accel "$vmlinuz"
	case $accel in
	kvm) qemu_accel=(-accel kvm -cpu "${HANGUP_KERNEL_CPU:-host}") ;;
	tcg) qemu_accel=(-accel "tcg,thread=${HANGUP_KERNEL_TCG_THREAD:-single}" -cpu "${HANGUP_KERNEL_CPU:-max,-cx16}") ;;
	*) die "HANGUP_KERNEL_ACCEL must be kvm or tcg, not $accel" ;;
	esac
	start=$(date +%s)
	local rc=0
	timeout --kill-after=10 "$budget" qemu-system-x86_64 "${qemu_accel[@]}" -smp "$cpus" -m "$mem" \
		-nodefaults -display none -no-reboot -nic none \
		-kernel "$vmlinuz" -initrd "$work/initramfs.cpio" \
		-append "console=ttyS0 panic=-1 oops=panic quiet" \
		-serial "file:$logs/console.log" -serial "file:$logs/tests.log" \
		</dev/null >"$logs/qemu.log" 2>&1 || rc=$?
	secs=$(($(date +%s) - start))
	tr -d '\r' <"$logs/tests.log" >"$logs/tests.txt"
	summarize "$label" "$kver" "$logs" "$rc" "$secs"
}

# summarize LABEL KVER LOGS QEMU_RC SECONDS: the kernel's result line.
summarize() {
	local label=$1 kver=$2 logs=$3 rc=$4 secs=$5 txt=$3/tests.txt verdict=PASS
	local pass fail skip detail="" pkgline code
	pass=$(grep -c '^--- PASS' "$txt" || true)
	fail=$(grep -c '^--- FAIL' "$txt" || true)
	skip=$(grep -c '^--- SKIP' "$txt" || true)
	for pkg in "${packages[@]}"; do
		pkg=$(basename "$pkg")
		pkgline=$(grep "^HANGUP-END $pkg " "$txt" || true)
		if [[ -z $pkgline ]]; then
			verdict=FAIL detail+=" $pkg:unfinished"
		elif [[ $pkgline != *" rc=0 "* ]]; then
			code=${pkgline#* rc=} code=${code%% *}
			verdict=FAIL detail+=" $pkg:rc=$code"
		fi
	done
	((fail == 0)) || verdict=FAIL
	grep -q '^HANGUP-ERROR' "$txt" && verdict=FAIL detail+=" $(grep '^HANGUP-ERROR' "$txt" | head -n1 | cut -c14-)"
	((rc != 124 && rc != 137)) || detail+=" budget of ${budget}s exceeded"
	grep -q '^HANGUP-DONE' "$txt" || verdict=FAIL
	printf '%s (%s): %s %d passed, %d failed, %d skipped; %ds %s%s\n' "$kver" "$label" "$verdict" \
		"$pass" "$fail" "$skip" "$secs" "$accel" "${detail:+;$detail}"
	if [[ $verdict != PASS ]]; then
		failed=1
		log "$kver: failed tests and their messages (logs in $logs):"
		awk -v keep=25 -f scripts/failed-tests.awk "$txt" >&2 || true
	fi
}

for spec in "${kernels[@]}"; do
	if [[ $spec == host ]]; then
		hver=$(uname -r)
		if apt-cache "${apt_opts[@]}" show "linux-image-$hver" >/dev/null 2>&1; then
			spec=linux-image-$hver
		elif [[ -e /boot/vmlinuz-$hver && -d /lib/modules/$hver ]]; then
			log "host kernel $hver: booting /boot/vmlinuz-$hver (no Debian package)"
			hdir=$work/host && mkdir -p "$hdir/boot" "$hdir/lib/modules"
			cp "/boot/vmlinuz-$hver" "$hdir/boot/" && cp -r "/lib/modules/$hver" "$hdir/lib/modules/"
			boot host "$hdir"
			continue
		else
			echo "$hver (host): SKIP no Debian package linux-image-$hver and no /boot/vmlinuz-$hver to boot"
			continue
		fi
	fi
	read -r pkg ver < <(resolve "$spec") || { echo "$spec: FAIL apt cannot find it"; failed=1; continue; }
	dir=$(fetch "$pkg" "$ver") || { echo "$spec: FAIL downloading $pkg $ver"; failed=1; continue; }
	boot "$pkg $ver" "$dir"
done
exit "$failed"
