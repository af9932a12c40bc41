//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * hangup kernel probe: TCP abort events for server (passively opened) sockets.
 *
 * A socket is tracked from SYN_RECV -> ESTABLISHED (or from userspace seeding
 * through the conns map) until the kernel destroys it. Each client-side ending
 * (peer FIN, peer RST, local RST, sk_err, retransmission, close) becomes an
 * event in the ring buffer, and is counted exactly in per-port counters, so a
 * full ring buffer loses events but never falsifies a count.
 *
 * All hooks are tp_btf (raw BTF tracepoints): fentry and kprobes are not
 * assumed to be available.
 */
#include "hangup_core.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Event kinds. Keep in sync with Kind in event.go (checked by a test). */
enum kind {
	KIND_OPENED = 1,
	KIND_PEER_FIN = 2,
	KIND_PEER_RESET = 3,
	KIND_LOCAL_RESET = 4,
	KIND_ERROR = 5,
	KIND_RETRANSMIT = 6,
	KIND_CLOSED = 7,
	KIND_LISTENER_CLOSED = 8, /* a listening socket closed (not a connection) */
};

/* Close causes. Keep in sync with Cause in event.go (checked by a test). */
enum cause {
	CAUSE_NONE = 0,
	CAUSE_NORMAL = 1,
	CAUSE_PEER_RESET = 2,
	CAUSE_LOCAL_RESET = 3,
	CAUSE_TIMEOUT = 4,           /* retransmission limit or TCP_USER_TIMEOUT */
	CAUSE_KEEPALIVE_TIMEOUT = 5, /* keepalive probes unanswered */
	CAUSE_PROBE_TIMEOUT = 6,     /* zero-window probes unanswered */
	CAUSE_ERROR = 7,             /* any other sk_err */
	CAUSE_MAX = 8,
};

/* Global counters (index into the stats array). Keep in sync with stats.go. */
enum stat {
	STAT_EVENTS = 0,      /* events submitted to the ring buffer */
	STAT_LOST = 1,        /* ring buffer reserve failures */
	STAT_TRACK_FULL = 2,  /* passive sockets not tracked: conns map full */
	STAT_PORTS_FULL = 3,  /* counter updates lost: port_stats map full */
	STAT_RETRANS_FAILED = 4, /* retransmission attempts that failed (not counted as retransmissions) */
	STAT_MAX = 5,
};

/* Per-connection flags. */
enum {
	F_PEER_FIN = 1 << 0,
	F_PEER_RST = 1 << 1,
	F_LOCAL_RST = 1 << 2,
	F_KEEPALIVE_RST = 1 << 3,
	F_ERR_REPORTED = 1 << 4,
	F_FINAL = 1 << 5,   /* closed event emitted and counted */
	F_SEEDED = 1 << 6,  /* inserted by userspace (sock_diag), not seen opening */
	F_ACTIVE = 1 << 7,  /* a simultaneous open: remembered only to be ignored */
};

struct conn {
	__u64 opened_ns;
	__u32 netns; /* network namespace inode; 0 until known for seeded entries */
	__u16 lport;
	__u16 flags;
	__s32 err;
	__u32 _pad;
};

/* Counters are kept per (network namespace, local port). */
struct port_key {
	__u32 netns; /* namespace inode (lsns, /proc/PID/ns/net) */
	__u16 port;
	__u16 _pad;
};

struct event {
	__u64 ts_ns; /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
	__u64 cookie;
	__u64 netns_cookie;
	__u8 saddr[16]; /* local address; IPv4 uses the first 4 bytes */
	__u8 daddr[16]; /* remote address */
	__u16 sport;    /* local port, host order */
	__u16 dport;    /* remote port, host order */
	__u16 family;
	__u8 kind;
	__u8 state; /* TCP state at the time of the event */
	__s32 err;  /* errno (positive) for KIND_ERROR and KIND_CLOSED */
	__u32 retrans; /* tcp_sock.total_retrans */
	__u8 cause;    /* for KIND_CLOSED */
	__u8 old_state;
	__u16 reason;  /* enum sk_rst_reason for KIND_LOCAL_RESET */
	__u32 _pad;
};

/* A (network namespace, local port) whose events a WatchedOnly probe writes. */
struct watch_key {
	__u64 netns_cookie;
	__u16 port;
	__u16 _pad[3];
};

struct counters {
	__u64 opened;
	__u64 peer_fin;
	__u64 peer_reset;
	__u64 local_reset;
	__u64 retransmits;     /* retransmitted skbs: one event each */
	__u64 retrans_segs;    /* retransmitted segments, as TcpRetransSegs counts them */
	__u64 errors;
	__u64 closed[CAUSE_MAX];
};

/* Force BTF emission for bpf2go -type. */
const struct event *unused_event __attribute__((unused));
const struct counters *unused_counters __attribute__((unused));
const struct conn *unused_conn __attribute__((unused));
const struct port_key *unused_port_key __attribute__((unused));
const struct watch_key *unused_watch_key __attribute__((unused));
const enum kind *unused_kind __attribute__((unused));
const enum cause *unused_cause __attribute__((unused));
const enum stat *unused_stat __attribute__((unused));

/*
 * Routine events (opened, retransmit, normal close) do not wake the reader:
 * a wakeup is an irq_work self-IPI, which costs a VM exit on virtual
 * machines and dominated the probe's cost when the reader kept up. The
 * reader polls for them every few milliseconds instead, and a routine event
 * forces a wakeup once wakeup_bytes are waiting. Events that say a client
 * is gone always wake the reader at once. Set by the loader.
 */
volatile const __u64 wakeup_bytes = 64 << 10;

/*
 * With watched_only, the ring buffer gets only client-gone events of
 * connections whose (netns cookie, local port) is in the watched map: a
 * server that loads its own probe hears of its own clients and nothing
 * else. Counters count everything regardless. Set by the loader.
 */
volatile const __u8 watched_only = 0;

/*
 * With wake_watched_only, every record is written, but only the client-gone
 * events of watched connections wake the reader at once; the rest wait for
 * its poll. A wakeup is a self-IPI, costly on virtual machines, and only
 * subscribers' connections need one (the agent watches their listeners).
 */
volatile const __u8 wake_watched_only = 0;

/*
 * With wake_busy_only, a client-gone event wakes the reader at once only
 * while its connection has a request in flight, as the process that loaded
 * the probe counts in the busy map; the rest wait for the reader's poll. A
 * client that closes an idle keep-alive connection, or closes right after
 * reading its last response, so costs no wakeup (a self-IPI and the
 * reader's run). Set by the loader.
 */
volatile const __u8 wake_busy_only = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* resized by the loader */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 262144); /* resized by the loader */
	__type(key, __u64);          /* socket cookie */
	__type(value, struct conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, struct port_key);
	__type(value, struct counters);
} port_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__type(key, struct watch_key);
	__type(value, __u8);
} watched SEC(".maps");

/*
 * reader holds one word the reader sets while it waits with no deadline
 * (an idle ring: its last poll found nothing). Routine records then wake
 * it, so that an idle reader needs no timer and a busy one keeps batching.
 * Memory-mapped: the reader sets and clears it with a plain atomic store.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} reader SEC(".maps");

/*
 * busy holds, per slot (a connection's cookie modulo BUSY_SLOTS), the
 * number of requests in flight on the slot's connections (BUSY_COUNT bits)
 * and BUSY_PENDING: an event for one of them went out without a wakeup
 * while the count was zero. Memory-mapped: the process adds and removes
 * requests with atomic adds, and a request that starts on a slot with
 * BUSY_PENDING clears it and asks its socket. An atomic read-modify-write
 * on either side orders the two: an event either sees the request (and
 * wakes the reader) or leaves BUSY_PENDING for it to see.
 */
#define BUSY_SLOTS 16384
#define BUSY_PENDING 0x8000000000000000ull

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, BUSY_SLOTS);
	__type(key, __u32);
	__type(value, __u64); /* an array map's values are 8-byte aligned anyway */
} busy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

/*
 * counters_for returns this CPU's counters for a connection's (namespace,
 * port), creating them on first use. Per-CPU values with atomic adds: exact
 * even when a softirq interrupts a process-context hook on the same CPU.
 */
static __always_inline struct counters *counters_for(const struct conn *c)
{
	struct port_key k = { .netns = c->netns, .port = c->lport };
	struct counters *ps = bpf_map_lookup_elem(&port_stats, &k);
	if (ps)
		return ps;
	struct counters zero = {};
	bpf_map_update_elem(&port_stats, &k, &zero, BPF_NOEXIST);
	ps = bpf_map_lookup_elem(&port_stats, &k);
	if (!ps)
		stat_inc(STAT_PORTS_FULL);
	return ps;
}

#define COUNT(c, field)                                      \
	do {                                                     \
		struct counters *__ps = counters_for(c);             \
		if (__ps)                                            \
			__sync_fetch_and_add(&__ps->field, 1);           \
	} while (0)

/* netns_inum is the inode number of the socket's network namespace. */
static __always_inline __u32 netns_inum(const struct sock *sk)
{
	return sk->__sk_common.skc_net.net->ns.inum;
}

static __always_inline bool is_tcp(const struct sock *sk)
{
	__u16 family = sk->__sk_common.skc_family;
	return sk->sk_protocol == IPPROTO_TCP && (family == AF_INET || family == AF_INET6);
}

/*
 * routine events (opened, retransmit, normal close) may wait for the reader's
 * poll; every other event says a client is gone (or a listener closed) and
 * wakes the reader at once.
 */
static __always_inline bool routine(__u8 kind, __u8 cause)
{
	return kind == KIND_OPENED || kind == KIND_RETRANSMIT ||
	       (kind == KIND_CLOSED && cause == CAUSE_NORMAL);
}

/*
 * reader_parked reports whether the reader waits with no deadline. Called
 * after the record's reservation: the atomic read is a full barrier, so
 * either this sees the reader's store or the reader, which stores first and
 * then looks at the ring, sees the reserved record (and does not park).
 */
static __always_inline bool reader_parked(void)
{
	__u32 k = 0;
	__u32 *v = bpf_map_lookup_elem(&reader, &k);
	return v && __sync_fetch_and_or(v, 0) != 0;
}

/*
 * conn_busy reports whether the connection with this cookie may have a
 * request in flight; when not, it marks its slot BUSY_PENDING, in the same
 * compare-and-swap that saw the count zero.
 */
static __always_inline bool conn_busy(__u64 cookie)
{
	__u32 k = (__u32)cookie & (BUSY_SLOTS - 1);
	__u64 *v = bpf_map_lookup_elem(&busy, &k);
	if (!v)
		return true;
	__u64 old = *(volatile __u64 *)v;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (old & ~BUSY_PENDING)
			return true; /* a request is in flight: wake, leave no mark */
		__u64 prev = __sync_val_compare_and_swap(v, old, old | BUSY_PENDING);
		if (prev == old)
			return false;
		old = prev; /* a request started or ended meanwhile: look again */
	}
	return true; /* contended: waking is always safe */
}

/*
 * emit writes one event. lport comes from the tracking entry: the kernel
 * zeroes skc_num when a closing socket releases its port, before the
 * TCP_CLOSE tracepoint fires.
 */
static __always_inline void emit(const struct sock *sk, __u64 cookie, __u16 lport, __u8 kind,
				 __u8 cause, __s32 err, __u16 reason, __u8 old_state, __u8 state)
{
	__u64 netns_cookie = sk->__sk_common.skc_net.net->net_cookie;
	bool urgent = !routine(kind, cause);
	if (watched_only) {
		bool gone = kind == KIND_PEER_FIN || kind == KIND_PEER_RESET || kind == KIND_ERROR ||
			    (kind == KIND_CLOSED && cause != CAUSE_NORMAL);
		struct watch_key wk = { .netns_cookie = netns_cookie, .port = lport };
		if (!gone || !bpf_map_lookup_elem(&watched, &wk))
			return;
	} else if (wake_watched_only && urgent) {
		struct watch_key wk = { .netns_cookie = netns_cookie, .port = lport };
		urgent = bpf_map_lookup_elem(&watched, &wk) != NULL;
	}
	if (wake_busy_only && urgent && kind != KIND_LISTENER_CLOSED)
		urgent = conn_busy(cookie);
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		stat_inc(STAT_LOST);
		return;
	}

	e->ts_ns = bpf_ktime_get_ns();
	e->cookie = cookie;
	e->netns_cookie = netns_cookie;
	e->family = sk->__sk_common.skc_family;
	if (e->family == AF_INET6) {
		__builtin_memcpy(e->saddr, sk->__sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8, 16);
		__builtin_memcpy(e->daddr, sk->__sk_common.skc_v6_daddr.in6_u.u6_addr8, 16);
	} else {
		__builtin_memset(e->saddr, 0, sizeof(e->saddr));
		__builtin_memset(e->daddr, 0, sizeof(e->daddr));
		*(__be32 *)e->saddr = sk->__sk_common.skc_rcv_saddr;
		*(__be32 *)e->daddr = sk->__sk_common.skc_daddr;
	}
	e->sport = lport;
	e->dport = bpf_ntohs(sk->__sk_common.skc_dport);
	e->kind = kind;
	e->state = state;
	e->old_state = old_state;
	e->err = err;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);
	e->retrans = tp ? tp->total_retrans : 0;
	e->cause = cause;
	e->reason = reason;
	e->_pad = 0;

	/*
	 * Not the adaptive default (flags 0): that wakes the reader only when
	 * this record is the first unread one, and the routine record before
	 * it (the connection's own "opened", submitted without a wakeup) is
	 * nearly always still unread, so a client-gone event would wait for
	 * the reader's next poll.
	 */
	__u64 flags = BPF_RB_FORCE_WAKEUP;
	if (!urgent && bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) < wakeup_bytes && !reader_parked())
		flags = BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, flags);
	stat_inc(STAT_EVENTS);
}

/*
 * timeout_cause tells apart the ways the kernel gives up with ETIMEDOUT, from
 * what is outstanding when the connection dies (the write queue purge before
 * the move to TCP_CLOSE leaves the sequence numbers alone):
 *   - data sent and not acknowledged: the retransmission limit or
 *     TCP_USER_TIMEOUT (tcp_write_timeout);
 *   - everything sent is acknowledged but queued data waits for the peer's
 *     window, with probes out: zero-window probes (tcp_probe_timer, which
 *     runs only then);
 *   - nothing sent or queued, with probes out: keepalive probes
 *     (tcp_keepalive_timer, which runs only then). Linux 6.10+ also names
 *     the keepalive reset's reason; older kernels are decided the same way.
 * Not the lifetime retransmission count: one early tail-loss probe would
 * turn every later zero-window death into a retransmission timeout.
 */
static __always_inline __u8 timeout_cause(const struct sock *sk, const struct conn *c)
{
	if (c->flags & F_KEEPALIVE_RST)
		return CAUSE_KEEPALIVE_TIMEOUT;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock((void *)sk);
	if (!tp || tp->snd_nxt != tp->snd_una || tp->inet_conn.icsk_probes_out == 0)
		return CAUSE_TIMEOUT;
	if (tp->write_seq != tp->snd_nxt)
		return CAUSE_PROBE_TIMEOUT;
	return CAUSE_KEEPALIVE_TIMEOUT;
}

/*
 * classify decides why a tracked connection ended, from what the probe saw
 * and the socket's pending error. CAUSE_NONE means "not known yet": the
 * kernel sends the RST of an abortive close (unread data, SO_LINGER 0) only
 * after the move to TCP_CLOSE, so such closes are settled at destroy time.
 * A local RST comes before any other error: a SO_LINGER 0 close sets
 * ECONNRESET on the socket after sending its RST.
 */
static __always_inline __u8 classify(const struct sock *sk, const struct conn *c, __s32 err)
{
	if (c->flags & F_PEER_RST)
		return CAUSE_PEER_RESET;
	if (err == ETIMEDOUT)
		return timeout_cause(sk, c);
	if (c->flags & F_LOCAL_RST)
		return CAUSE_LOCAL_RESET;
	if (err != 0)
		return CAUSE_ERROR;
	return CAUSE_NONE;
}

static __always_inline void finalize(const struct sock *sk, __u64 cookie, struct conn *c,
				     __u8 cause, __s32 err, __u8 old_state, __u8 state)
{
	c->flags |= F_FINAL;
	if (cause >= CAUSE_MAX || cause == CAUSE_NONE)
		cause = CAUSE_NORMAL;
	struct counters *ps = counters_for(c);
	if (ps) {
		/* cause is bounded above; the mask keeps the verifier sure of it */
		__sync_fetch_and_add(&ps->closed[cause & (CAUSE_MAX - 1)], 1);
	}
	emit(sk, cookie, c->lport, KIND_CLOSED, cause, err, 0, old_state, state);
}

/* report_error emits one KIND_ERROR per distinct sk_err value. */
static __always_inline void report_error(const struct sock *sk, __u64 cookie, struct conn *c,
					 __s32 err, __u8 state)
{
	if ((c->flags & F_ERR_REPORTED) && c->err == err)
		return;
	/* The ECONNRESET of this host's own abort (SO_LINGER 0) is no error. */
	if (err == ECONNRESET && (c->flags & (F_LOCAL_RST | F_PEER_RST)) == F_LOCAL_RST)
		return;
	c->flags |= F_ERR_REPORTED;
	c->err = err;
	COUNT(c, errors);
	emit(sk, cookie, c->lport, KIND_ERROR, CAUSE_NONE, err, 0, state, state);
}

/*
 * lookup returns the tracking entry of a server connection, or NULL. Every
 * tracked socket has its cookie already (the probe made it at the passive
 * open, or userspace asked for it to seed the entry): a socket without one
 * is not tracked, and most sockets the hooks see are such (clients, and
 * servers' sockets of other kinds), so read it rather than make one.
 */
static __always_inline struct conn *lookup(const struct sock *sk, __u64 *cookie)
{
	*cookie = sk->__sk_common.skc_cookie.counter;
	if (!*cookie)
		return NULL;
	struct conn *c = bpf_map_lookup_elem(&conns, cookie);
	if (!c || (c->flags & F_ACTIVE))
		return NULL;
	if (!c->netns) /* seeded from userspace, which knows the port only */
		c->netns = netns_inum(sk);
	return c;
}

/*
 * mptcp_parent_cookie returns the cookie of the MPTCP socket that owns a
 * listening TCP subflow, or 0. Only MPTCP attaches a ULP to a listener; the
 * parent's cookie is read, not generated: userspace that cares has already
 * asked for it with SO_COOKIE.
 */
static __always_inline __u64 mptcp_parent_cookie(const struct sock *sk)
{
	const struct inet_connection_sock *icsk = (const void *)sk;
	struct mptcp_subflow_context *ctx = BPF_CORE_READ(icsk, icsk_ulp_data);
	if (!ctx)
		return 0;
	struct sock *parent = BPF_CORE_READ(ctx, conn);
	if (!parent || BPF_CORE_READ(parent, sk_protocol) != IPPROTO_MPTCP)
		return 0;
	return BPF_CORE_READ(parent, __sk_common.skc_cookie.counter);
}

/*
 * Opens and the rest are two programs on the same tracepoint. The kernel
 * skips a program's run while that program is already running on the CPU:
 * a passive open (softirq) that interrupts on_set_state in process context
 * (a close() elsewhere) would be lost, and the connection never tracked.
 * on_open runs in process context only for the few instructions that send
 * every other transition away, so it is almost never the one running.
 */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_open, const struct sock *sk, const int oldstate, const int newstate)
{
	if (newstate != TCP_SYN_RECV && newstate != TCP_ESTABLISHED)
		return 0;
	if (!is_tcp(sk))
		return 0;

	__u64 cookie;
	if (newstate == TCP_SYN_RECV) {
		if (oldstate != TCP_SYN_SENT)
			return 0; /* a listener's new child: tracked once established */
		/*
		 * A simultaneous open (or a TCP self-connect): an active socket
		 * that will go SYN_RECV -> ESTABLISHED like a listener's child
		 * (whose SYN_RECV came from LISTEN). Rare: remember it, so that
		 * its ESTABLISHED is not taken for a passive open.
		 */
		cookie = bpf_get_socket_cookie((void *)sk);
		struct conn a = { .flags = F_ACTIVE };
		bpf_map_update_elem(&conns, &cookie, &a, BPF_ANY);
		return 0;
	}
	if (newstate == TCP_ESTABLISHED) {
		if (oldstate != TCP_SYN_RECV)
			return 0; /* an active open */
		/* Passive open: the child socket of a listener completed its handshake. */
		cookie = bpf_get_socket_cookie((void *)sk);
		struct conn c = {
			.opened_ns = bpf_ktime_get_ns(),
			.netns = netns_inum(sk),
			.lport = sk->__sk_common.skc_num,
		};
		if (bpf_map_update_elem(&conns, &cookie, &c, BPF_NOEXIST) != 0) {
			/* Already tracked (seeded) is fine; anything else is a full map. */
			struct conn *old = bpf_map_lookup_elem(&conns, &cookie);
			if (!old) {
				stat_inc(STAT_TRACK_FULL);
				return 0;
			}
			if (old->flags & F_ACTIVE) {
				bpf_map_delete_elem(&conns, &cookie);
				return 0;
			}
		}
		COUNT(&c, opened);
		emit(sk, cookie, c.lport, KIND_OPENED, CAUSE_NONE, 0, 0, oldstate, newstate);
	}
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	/* Most transitions matter to no tracked connection: leave at once. */
	if (newstate != TCP_CLOSE && newstate != TCP_CLOSE_WAIT)
		return 0;
	if (!is_tcp(sk))
		return 0;

	__u64 cookie;
	if (oldstate == TCP_LISTEN) {
		/* A listener closed: whoever routed its connections' events by
		 * its cookie must stop, for its port may be reused by another. */
		cookie = bpf_get_socket_cookie((void *)sk);
		emit(sk, cookie, sk->__sk_common.skc_num, KIND_LISTENER_CLOSED, CAUSE_NONE, 0, 0,
		     oldstate, newstate);
		/* An MPTCP listener (Go's default) is a TCP subflow listener
		 * under an MPTCP socket: userspace holds the MPTCP socket and
		 * knows its cookie, so report that one too. */
		__u64 mcookie = mptcp_parent_cookie(sk);
		if (mcookie)
			emit(sk, mcookie, sk->__sk_common.skc_num, KIND_LISTENER_CLOSED, CAUSE_NONE, 0, 0,
			     oldstate, newstate);
		return 0;
	}

	struct conn *c = lookup(sk, &cookie);
	if (!c)
		return 0;

	if (newstate == TCP_CLOSE_WAIT) {
		c->flags |= F_PEER_FIN;
		COUNT(c, peer_fin);
		emit(sk, cookie, c->lport, KIND_PEER_FIN, CAUSE_NONE, 0, 0, oldstate, newstate);
		return 0;
	}
	if (newstate != TCP_CLOSE || (c->flags & F_FINAL))
		return 0;

	__s32 err = sk->sk_err;
	/* The error report follows the state change; emit it first so that
	 * consumers always see ERROR before CLOSED. */
	if (err != 0)
		report_error(sk, cookie, c, err, newstate);
	__u8 cause = classify(sk, c, err);
	if (cause != CAUSE_NONE)
		finalize(sk, cookie, c, cause, err, oldstate, newstate);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(on_receive_reset, struct sock *sk)
{
	__u64 cookie;
	struct conn *c = lookup(sk, &cookie);
	if (!c || (c->flags & F_PEER_RST))
		return 0;
	c->flags |= F_PEER_RST;
	COUNT(c, peer_reset);
	__u8 state = sk->__sk_common.skc_state;
	emit(sk, cookie, c->lport, KIND_PEER_RESET, CAUSE_NONE, 0, 0, state, state);
	return 0;
}

static __always_inline int local_reset(const struct sock *sk, __u16 reason, bool keepalive)
{
	if (!sk)
		return 0;
	__u8 state = sk->__sk_common.skc_state;
	/* Only full sockets: request and timewait sockets are not tracked. */
	if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV)
		return 0;
	__u64 cookie;
	struct conn *c = lookup(sk, &cookie);
	if (!c)
		return 0;
	c->flags |= F_LOCAL_RST;
	if (keepalive)
		c->flags |= F_KEEPALIVE_RST;
	COUNT(c, local_reset);
	emit(sk, cookie, c->lport, KIND_LOCAL_RESET, CAUSE_NONE, 0, reason, state, state);
	return 0;
}

/* Linux >= 6.10: the tracepoint says why (enum sk_rst_reason). */
SEC("tp_btf/tcp_send_reset")
int BPF_PROG(on_send_reset, const struct sock *sk, const struct sk_buff *skb, const enum sk_rst_reason reason)
{
	return local_reset(sk, (__u16)reason,
			   reason == bpf_core_enum_value(enum sk_rst_reason, SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT));
}

/*
 * Linux < 6.10: no reason; a keepalive timeout is recognised at death from
 * what is outstanding (timeout_cause).
 */
SEC("tp_btf/tcp_send_reset")
int BPF_PROG(on_send_reset_legacy, const struct sock *sk, const struct sk_buff *skb)
{
	return local_reset(sk, 0, false);
}

SEC("tp_btf/inet_sk_error_report")
int BPF_PROG(on_error_report, const struct sock *sk)
{
	if (!is_tcp(sk))
		return 0;
	__u64 cookie;
	struct conn *c = lookup(sk, &cookie);
	if (!c)
		return 0;
	__s32 err = sk->sk_err;
	__u8 state = sk->__sk_common.skc_state;
	if (err != 0)
		report_error(sk, cookie, c, err, state);
	/*
	 * Newer kernels (tcp_done_with_error) report a fatal error after the move to
	 * TCP_CLOSE. Settle the close here too: the kernel skips a program
	 * that is already running on the CPU, so the state change's own run
	 * is lost whenever the death (a timer softirq) interrupted
	 * on_set_state in process context, and only the socket's destruction,
	 * when the application closes it, would tell.
	 */
	if (state == TCP_CLOSE && !(c->flags & F_FINAL)) {
		__u8 cause = classify(sk, c, err);
		if (cause != CAUSE_NONE)
			finalize(sk, cookie, c, cause, err, state, state);
	}
	return 0;
}

static __always_inline int retransmit(const struct sock *sk, const struct sk_buff *skb)
{
	__u64 cookie;
	struct conn *c = lookup(sk, &cookie);
	if (!c)
		return 0;
	struct counters *ps = counters_for(c);
	if (ps) {
		/* One skb carries tcp_skb_pcount() segments (GSO). */
		const struct tcp_skb_cb *tcb = (const void *)skb->cb;
		__u16 segs = BPF_CORE_READ(tcb, tcp_gso_segs);
		__sync_fetch_and_add(&ps->retransmits, 1);
		__sync_fetch_and_add(&ps->retrans_segs, segs ? segs : 1);
	}
	__u8 state = sk->__sk_common.skc_state;
	emit(sk, cookie, c->lport, KIND_RETRANSMIT, CAUSE_NONE, 0, 0, state, state);
	return 0;
}

/* Linux >= 6.17: the tracepoint also fires for failed attempts (err != 0). */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(on_retransmit, const struct sock *sk, const struct sk_buff *skb, int err)
{
	if (err != 0) {
		stat_inc(STAT_RETRANS_FAILED);
		return 0;
	}
	return retransmit(sk, skb);
}

/* Linux < 6.17: the tracepoint fires only for successful retransmissions. */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(on_retransmit_legacy, const struct sock *sk, const struct sk_buff *skb)
{
	return retransmit(sk, skb);
}

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(on_destroy, struct sock *sk)
{
	__u64 cookie = sk->__sk_common.skc_cookie.counter; /* see lookup */
	if (!cookie)
		return 0;
	struct conn *c = bpf_map_lookup_elem(&conns, &cookie);
	if (!c)
		return 0;
	if (!(c->flags & (F_FINAL | F_ACTIVE))) {
		if (!c->netns)
			c->netns = netns_inum(sk);
		/* The application may have read (and so cleared) the error. */
		__s32 err = sk->sk_err;
		if (err == 0 && (c->flags & F_ERR_REPORTED))
			err = c->err;
		__u8 state = sk->__sk_common.skc_state;
		finalize(sk, cookie, c, classify(sk, c, err), err, state, state);
	}
	bpf_map_delete_elem(&conns, &cookie);
	return 0;
}
