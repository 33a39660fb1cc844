/*
 * ratelimit: the rate-limiting actor, first hop of every valid payment request
 * (DESIGN.md §3 "Rate limiting", §5). It owns one Redis connection (io/redis.h) and decides
 * each request with one Lua script run atomically in Redis: a sliding window of unique
 * members per bucket, Redis TIME as the only clock, rejected requests never counted, keys
 * expiring after the window. Every check of a mailbox batch goes out in one pipelined write
 * (one round trip). Allowed requests carry their x-ratelimit-* values in the payment_msg_t
 * and go on through the forward hook (the ledger router); rejected ones end
 * RESOURCE_EXHAUSTED with x-ratelimit-limit, x-ratelimit-remaining and retry-after.
 *
 * Identity (who a bucket belongs to): the x-client-id metadata (type "client"), else the
 * first x-forwarded-for address when the peer is a trusted proxy (type "ip"), else the
 * peer's IP address (type "peer"). Untrusted values never reach a key name raw: they are
 * percent-escaped and bounded, and replaced by their SHA-256 when too long. The three
 * payment methods share one bucket per identity; a method with its own limit
 * (RATE_LIMIT_METHOD_LIMITS) has a bucket of its own instead.
 *
 * Redis down, or slower than the timeout (our own timer; the connection is then dropped and
 * re-established with backoff): fail open (forward, counted) or fail closed (UNAVAILABLE).
 * One WARNING line per outage and one INFO line when it ends, never one per request.
 * Failed-open responses carry x-ratelimit-remaining = the limit (nothing was counted);
 * failed-closed ones 0. A check our timer gave up on may still run in Redis later (e.g. after
 * a CLIENT PAUSE): it is then counted although its request was failed open or closed. A
 * request Redis allowed is always counted, so no more than the limit pass while it answers.
 *
 * ratelimit_actor_add and ratelimit_destroy from the main thread; ratelimit_stats from any
 * thread; the pure helpers below from any thread.
 */
#ifndef PAY_ACTORS_RATELIMIT_H
#define PAY_ACTORS_RATELIMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>

#include "actors/payment_api.h"
#include "runtime/actor.h"
#include "runtime/supervisor.h"

typedef struct ratelimit ratelimit_t;

/** A trusted proxy: an address or a network (prefix_len < 32/128). */
typedef struct ratelimit_net {
    int family;       /* AF_INET or AF_INET6 */
    uint8_t addr[16]; /* network byte order; 4 bytes used for AF_INET */
    int prefix_len;
} ratelimit_net_t;

#define RATELIMIT_MAX_TRUSTED 64

/** Hands an allowed request on (the ledger). 0: m is the receiver's. < 0 (-EAGAIN full,
 *  -ESHUTDOWN): m is still the caller's, which ends its call UNAVAILABLE. */
typedef int (*ratelimit_forward_fn)(void *arg, payment_msg_t *m);

typedef struct ratelimit_config {
    const char *redis_host; /* copied */
    int redis_port;
    const char *redis_user;     /* NULL or "" */
    const char *redis_password; /* NULL or "" */
    int redis_db;
    int64_t max_requests;           /* RATE_LIMIT_MAX_REQUESTS, > 0 */
    int64_t window_seconds;         /* RATE_LIMIT_WINDOW_SECONDS, > 0 */
    bool fail_open;                 /* RATE_LIMIT_FAIL_OPEN */
    int64_t timeout_ms;             /* RATE_LIMIT_TIMEOUT_MS, > 0 */
    const ratelimit_net_t *trusted; /* RATE_LIMIT_TRUSTED_PROXIES; copied */
    size_t ntrusted;                /* <= RATELIMIT_MAX_TRUSTED */
    /* Per-method limits indexed by payment_method_t (1..3); 0 = the shared bucket. */
    int64_t method_limit[4];
    size_t mailbox_capacity; /* 0 = 4096 */
    size_t batch_max;        /* 0 = 256 */
    ratelimit_forward_fn forward;
    void *forward_arg;
} ratelimit_config_t;

typedef struct ratelimit_stats {
    uint64_t checks;              /* requests handled */
    uint64_t allowed;             /* allowed by Redis */
    uint64_t rejected;            /* RESOURCE_EXHAUSTED */
    uint64_t rejected_by_type[3]; /* by identity type: client, ip, peer */
    uint64_t failed_open;         /* Redis unavailable: let through */
    uint64_t failed_closed;       /* Redis unavailable: UNAVAILABLE */
    uint64_t outages;             /* Redis outages seen (each logged once) */
    uint64_t forward_refused;     /* allowed but the next hop refused (UNAVAILABLE) */
    bool redis_up;                /* last check answered, connection not lost since */
} ratelimit_stats_t;

/** Adds the actor to the supervisor (before supervisor_start). cfg is copied. 0 or -errno
 *  (-EINVAL for an invalid configuration). */
int ratelimit_actor_add(ratelimit_t **out, supervisor_t *s, const ratelimit_config_t *cfg);
/** The actor (payment_api's target). */
actor_t *ratelimit_actor(const ratelimit_t *rl);
/** Any thread: a snapshot of the counters (metrics read these). */
void ratelimit_stats(const ratelimit_t *rl, ratelimit_stats_t *out);
/** After supervisor_destroy. NULL allowed. */
void ratelimit_destroy(ratelimit_t *rl);

/* ---- pure helpers (ratelimit_key.c), exposed for tests ---- */

typedef enum ratelimit_id_type {
    RATELIMIT_ID_CLIENT = 0, /* x-client-id */
    RATELIMIT_ID_IP = 1,     /* x-forwarded-for via a trusted proxy */
    RATELIMIT_ID_PEER = 2,   /* the connection's peer address */
} ratelimit_id_type_t;

/** "client", "ip", "peer" (the identifier_type metric label). */
const char *ratelimit_id_type_name(ratelimit_id_type_t t);

/** An IP address in text ("10.0.0.1", "::1", "::ffff:10.0.0.1" → AF_INET). 0 or -EINVAL. */
int ratelimit_ip_parse(int *family, uint8_t addr[16], const char *s, size_t len);
/** True when family/addr lies in one of the networks. */
bool ratelimit_ip_in(const ratelimit_net_t *nets, size_t n, int family, const uint8_t *addr);

#define RATELIMIT_ID_MAX 64 /* an address in canonical text, or a bounded client id */

typedef struct ratelimit_identity {
    ratelimit_id_type_t type;
    const char *value; /* not NUL-terminated for clients (points into the metadata) */
    size_t len;
    char buf[RATELIMIT_ID_MAX]; /* canonical text of an address */
} ratelimit_identity_t;

/**
 * Resolves who a request belongs to. client_id/xff: the metadata values (NULL = absent;
 * an empty x-client-id counts as absent); peer_ip: the peer's address text (NULL or
 * unparsable = "unknown"). The first x-forwarded-for entry is used only when the peer is
 * in trusted and that entry is a valid IP address.
 */
void ratelimit_identity_resolve(ratelimit_identity_t *out, const char *client_id,
                                size_t client_id_len, const char *xff, size_t xff_len,
                                const char *peer_ip, const ratelimit_net_t *trusted,
                                size_t ntrusted);

#define RATELIMIT_KEY_ESCAPED_MAX 128 /* longer escaped identities are hashed */
#define RATELIMIT_KEY_MAX         200

/**
 * The bucket's key: "ratelimit:<bucket>:<type>:<id>", bucket = "all" or the method name
 * (own limit). id keeps [A-Za-z0-9._:-] and percent-escapes every other byte; when that is
 * longer than RATELIMIT_KEY_ESCAPED_MAX it is "~" + the SHA-256 of the raw value in hex
 * ('~' is always escaped otherwise, so the two forms never collide). Returns the length.
 */
size_t ratelimit_key_build(char out[RATELIMIT_KEY_MAX], const char *bucket,
                           const ratelimit_identity_t *id);

/** The Lua script (KEYS[1] bucket; ARGV limit, window in µs, unique member). */
extern const char ratelimit_lua[];
/** SHA-1 of ratelimit_lua in hex (what EVALSHA takes). */
void ratelimit_lua_sha(char out[41]);

typedef struct ratelimit_args {
    int argc;
    const char *argv[7];
    size_t argvlen[7];
    char limit[24];
    char window_us[24];
} ratelimit_args_t;

/** EVALSHA sha 1 key limit window_us member (or EVAL script … when sha is NULL). The
 *  strings passed must outlive the use of a. */
void ratelimit_args_build(ratelimit_args_t *a, const char *sha, const char *key, size_t keylen,
                          int64_t limit, int64_t window_s, const char *member);

typedef struct ratelimit_verdict {
    bool allowed;
    int64_t remaining;     /* slots left in the window after this request */
    int64_t retry_after_s; /* rejected: whole seconds until a slot frees (>= 1) */
} ratelimit_verdict_t;

/** Reads the script's reply {allowed, remaining, wait µs}. 0, or -EPROTO if malformed. */
int ratelimit_reply_parse(ratelimit_verdict_t *out, const redisReply *r);

#endif
