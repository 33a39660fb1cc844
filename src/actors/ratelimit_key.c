/*
 * ratelimit_key: the pure parts of the rate limiter (see ratelimit.h): identity, key names,
 * the Lua script and its arguments, and the reading of its reply. No I/O, no state.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/evp.h>

#include "actors/ratelimit.h"

/*
 * Sliding window with unique members, decided atomically in Redis:
 * drop the members older than the window, count the rest; under the limit the request is
 * added (score = Redis TIME in µs, member unique per request) and the key's TTL renewed;
 * at the limit nothing is written (a rejected request costs nothing) and the wait until
 * the oldest member leaves the window is returned. Numbers are passed to Redis with
 * string.format('%d') so µs timestamps (~1.7e15) never go through Lua's %.14g.
 */
const char ratelimit_lua[] =
    "local limit = tonumber(ARGV[1])\n"
    "local window = tonumber(ARGV[2])\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - window))\n"
    "local count = redis.call('ZCARD', KEYS[1])\n"
    "if count < limit then\n"
    "  redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[3])\n"
    "  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))\n"
    "  return {1, limit - count - 1, 0}\n"
    "end\n"
    "local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')\n"
    "local wait = window\n"
    "if oldest[2] then wait = tonumber(oldest[2]) + window - now end\n"
    "if wait < 1 then wait = 1 end\n"
    "return {0, 0, wait}\n";

const char *ratelimit_id_type_name(ratelimit_id_type_t t)
{
    switch (t) {
    case RATELIMIT_ID_CLIENT:
        return "client";
    case RATELIMIT_ID_IP:
        return "ip";
    case RATELIMIT_ID_PEER:
        return "peer";
    }
    return "unknown";
}

int ratelimit_ip_parse(int *family, uint8_t addr[16], const char *s, size_t len)
{
    char buf[INET6_ADDRSTRLEN + 1];
    if (!s || len == 0 || len >= sizeof(buf))
        return -EINVAL;
    memcpy(buf, s, len);
    buf[len] = '\0';
    if (memchr(buf, '\0', len))
        return -EINVAL;
    struct in_addr a4;
    struct in6_addr a6;
    if (inet_pton(AF_INET, buf, &a4) == 1) {
        *family = AF_INET;
        memset(addr, 0, 16);
        memcpy(addr, &a4, 4);
        return 0;
    }
    if (inet_pton(AF_INET6, buf, &a6) == 1) {
        if (IN6_IS_ADDR_V4MAPPED(&a6)) {
            *family = AF_INET;
            memset(addr, 0, 16);
            memcpy(addr, &a6.s6_addr[12], 4);
        } else {
            *family = AF_INET6;
            memcpy(addr, &a6, 16);
        }
        return 0;
    }
    return -EINVAL;
}

bool ratelimit_ip_in(const ratelimit_net_t *nets, size_t n, int family, const uint8_t *addr)
{
    for (size_t i = 0; i < n; i++) {
        const ratelimit_net_t *net = &nets[i];
        int bits = net->prefix_len, max = family == AF_INET ? 32 : 128;
        if (net->family != family || bits < 0 || bits > max)
            continue;
        int full = bits / 8, rest = bits % 8;
        if (memcmp(net->addr, addr, (size_t)full) != 0)
            continue;
        if (rest) {
            uint8_t mask = (uint8_t)(0xffu << (8 - rest));
            if ((net->addr[full] & mask) != (addr[full] & mask))
                continue;
        }
        return true;
    }
    return false;
}

static void trim(const char **s, size_t *len)
{
    while (*len && (**s == ' ' || **s == '\t')) {
        (*s)++;
        (*len)--;
    }
    while (*len && ((*s)[*len - 1] == ' ' || (*s)[*len - 1] == '\t'))
        (*len)--;
}

/* Canonical text of a parsed address into id->buf. */
static void set_addr(ratelimit_identity_t *id, ratelimit_id_type_t type, int family,
                     const uint8_t *addr)
{
    id->type = type;
    if (!inet_ntop(family, addr, id->buf, sizeof(id->buf)))
        snprintf(id->buf, sizeof(id->buf), "unknown");
    id->value = id->buf;
    id->len = strlen(id->buf);
}

void ratelimit_identity_resolve(ratelimit_identity_t *out, const char *client_id,
                                size_t client_id_len, const char *xff, size_t xff_len,
                                const char *peer_ip, const ratelimit_net_t *trusted,
                                size_t ntrusted)
{
    memset(out, 0, sizeof(*out));
    if (client_id && client_id_len > 0) {
        out->type = RATELIMIT_ID_CLIENT;
        out->value = client_id;
        out->len = client_id_len;
        return;
    }
    int pfam = 0;
    uint8_t paddr[16];
    bool peer_ok = peer_ip && ratelimit_ip_parse(&pfam, paddr, peer_ip, strlen(peer_ip)) == 0;
    if (peer_ok && xff && xff_len > 0 && ratelimit_ip_in(trusted, ntrusted, pfam, paddr)) {
        const char *comma = memchr(xff, ',', xff_len);
        const char *first = xff;
        size_t flen = comma ? (size_t)(comma - xff) : xff_len;
        trim(&first, &flen);
        int fam;
        uint8_t addr[16];
        if (ratelimit_ip_parse(&fam, addr, first, flen) == 0) {
            set_addr(out, RATELIMIT_ID_IP, fam, addr);
            return;
        }
    }
    if (peer_ok) {
        set_addr(out, RATELIMIT_ID_PEER, pfam, paddr);
        return;
    }
    out->type = RATELIMIT_ID_PEER;
    snprintf(out->buf, sizeof(out->buf), "unknown");
    out->value = out->buf;
    out->len = strlen(out->buf);
}

static bool key_safe(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '.' || ch == '_' || ch == ':' || ch == '-';
}

static void hex(char *out, const unsigned char *in, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

size_t ratelimit_key_build(char out[RATELIMIT_KEY_MAX], const char *bucket,
                           const ratelimit_identity_t *id)
{
    int n = snprintf(out, RATELIMIT_KEY_MAX, "ratelimit:%s:%s:", bucket,
                     ratelimit_id_type_name(id->type));
    if (n < 0 || n >= RATELIMIT_KEY_MAX - 2 - RATELIMIT_KEY_ESCAPED_MAX)
        return 0; /* bucket names are ours and short: cannot happen */
    size_t pos = (size_t)n, escaped = 0;
    const unsigned char *v = (const unsigned char *)id->value;
    for (size_t i = 0; i < id->len; i++)
        escaped += key_safe(v[i]) ? 1 : 3;
    if (escaped > RATELIMIT_KEY_ESCAPED_MAX) {
        unsigned char md[32];
        unsigned int mdlen = 0;
        EVP_Digest(v, id->len, md, &mdlen, EVP_sha256(), NULL);
        out[pos++] = '~';
        hex(out + pos, md, 32);
        return pos + 64;
    }
    static const char digits[] = "0123456789ABCDEF";
    for (size_t i = 0; i < id->len; i++) {
        if (key_safe(v[i])) {
            out[pos++] = (char)v[i];
        } else {
            out[pos++] = '%';
            out[pos++] = digits[v[i] >> 4];
            out[pos++] = digits[v[i] & 15];
        }
    }
    out[pos] = '\0';
    return pos;
}

void ratelimit_lua_sha(char out[41])
{
    unsigned char md[20];
    unsigned int mdlen = 0;
    EVP_Digest(ratelimit_lua, strlen(ratelimit_lua), md, &mdlen, EVP_sha1(), NULL);
    hex(out, md, 20);
}

void ratelimit_args_build(ratelimit_args_t *a, const char *sha, const char *key, size_t keylen,
                          int64_t limit, int64_t window_s, const char *member)
{
    snprintf(a->limit, sizeof(a->limit), "%lld", (long long)limit);
    snprintf(a->window_us, sizeof(a->window_us), "%lld", (long long)window_s * 1000000LL);
    a->argc = 7;
    a->argv[0] = sha ? "EVALSHA" : "EVAL";
    a->argv[1] = sha ? sha : ratelimit_lua;
    a->argv[2] = "1";
    a->argv[3] = key;
    a->argv[4] = a->limit;
    a->argv[5] = a->window_us;
    a->argv[6] = member;
    for (int i = 0; i < 7; i++)
        a->argvlen[i] = strlen(a->argv[i]);
    a->argvlen[3] = keylen;
}

int ratelimit_reply_parse(ratelimit_verdict_t *out, const redisReply *r)
{
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 3)
        return -EPROTO;
    for (size_t i = 0; i < 3; i++)
        if (!r->element[i] || r->element[i]->type != REDIS_REPLY_INTEGER)
            return -EPROTO;
    long long allowed = r->element[0]->integer, remaining = r->element[1]->integer,
              wait_us = r->element[2]->integer;
    if ((allowed != 0 && allowed != 1) || remaining < 0 || wait_us < 0)
        return -EPROTO;
    out->allowed = allowed == 1;
    out->remaining = remaining;
    out->retry_after_s = out->allowed ? 0 : (wait_us + 999999) / 1000000;
    if (!out->allowed && out->retry_after_s < 1)
        out->retry_after_s = 1;
    return 0;
}
