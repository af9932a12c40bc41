/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Compact CO-RE declarations for the kernel types the probe touches.
 *
 * This is not vmlinux.h: it redeclares only the members probe.c reads. Every
 * struct carries preserve_access_index, so clang records field relocations and
 * the loader (cilium/ebpf) resolves the real offsets against the running
 * kernel's BTF at load time. Member order and padding here do not matter.
 */
#ifndef __HANGUP_CORE_H__
#define __HANGUP_CORE_H__

typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef short __s16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
#define true 1
#define false 0

/* Map types and flags from include/uapi/linux/bpf.h (stable UAPI values). */
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_RINGBUF = 27,
};
enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
};
enum {
	BPF_F_NO_PREALLOC = 1,
	BPF_F_MMAPABLE = 1024, /* 1U << 10 */
};
/* bpf_ringbuf_submit flags and bpf_ringbuf_query selectors */
enum {
	BPF_RB_NO_WAKEUP = 1,
	BPF_RB_FORCE_WAKEUP = 2,
};
enum {
	BPF_RB_AVAIL_DATA = 0,
};

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_MPTCP 262

#define ECONNRESET 104
#define ETIMEDOUT 110
#define EPIPE 32

/* include/net/tcp_states.h */
enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT = 2,
	TCP_SYN_RECV = 3,
	TCP_FIN_WAIT1 = 4,
	TCP_FIN_WAIT2 = 5,
	TCP_TIME_WAIT = 6,
	TCP_CLOSE = 7,
	TCP_CLOSE_WAIT = 8,
	TCP_LAST_ACK = 9,
	TCP_LISTEN = 10,
	TCP_CLOSING = 11,
	TCP_NEW_SYN_RECV = 12,
};

/*
 * The value of SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT is read through a CO-RE
 * enum relocation, so only the enumerator name has to match the kernel.
 */
enum sk_rst_reason {
	SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT = 15,
};

struct in6_addr {
	union {
		__u8 u6_addr8[16];
		__be32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct ns_common {
	unsigned int inum; /* the namespace's inode number, as lsns shows */
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
	__u64 net_cookie;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

typedef struct {
	__s64 counter;
} atomic64_t;

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	atomic64_t skc_cookie;
} __attribute__((preserve_access_index));

struct socket;

struct sock {
	struct sock_common __sk_common;
	int sk_err;
	struct socket *sk_socket;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

struct sk_buff {
	char cb[48];
} __attribute__((preserve_access_index));

/* What TCP keeps in skb->cb (TCP_SKB_CB). */
struct tcp_skb_cb {
	__u32 seq;
	__u32 end_seq;
	union {
		struct {
			__u16 tcp_gso_segs; /* tcp_skb_pcount() */
			__u16 tcp_gso_size;
		};
		__u32 tcp_tw_isn;
	};
} __attribute__((preserve_access_index));

struct inet_sock {
	struct sock sk;
} __attribute__((preserve_access_index));

struct inet_connection_sock {
	struct inet_sock icsk_inet;
	__u8 icsk_probes_out;
	void *icsk_ulp_data;
} __attribute__((preserve_access_index));

struct mptcp_subflow_context {
	struct sock *conn; /* the MPTCP socket owning this subflow */
} __attribute__((preserve_access_index));

struct tcp_sock {
	struct inet_connection_sock inet_conn;
	__u32 total_retrans;
	__u32 snd_una;   /* first byte the peer has not acknowledged */
	__u32 snd_nxt;   /* next byte to send */
	__u32 write_seq; /* end of the data the application queued */
} __attribute__((preserve_access_index));

#endif /* __HANGUP_CORE_H__ */
