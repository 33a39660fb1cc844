/*
 * test_ratelimit_key: the pure parts of the rate limiter (actors/ratelimit_key.c):
 * address parsing and trusted networks, identity resolution (x-client-id → x-forwarded-for
 * from a trusted peer → peer), key names (escaping, bounding, hashing), the Lua script's
 * arguments and SHA-1, and the reading of its reply (retry-after rounding).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <cmocka.h>

#include <openssl/evp.h>

#include "actors/ratelimit.h"

static ratelimit_net_t net(const char *addr, int prefix)
{
    ratelimit_net_t n = {.prefix_len = prefix};
    assert_int_equal(ratelimit_ip_parse(&n.family, n.addr, addr, strlen(addr)), 0);
    return n;
}

static void test_ip_parse(void **state)
{
    (void)state;
    int fam;
    uint8_t a[16];
    assert_int_equal(ratelimit_ip_parse(&fam, a, "10.1.2.3", 8), 0);
    assert_int_equal(fam, AF_INET);
    assert_memory_equal(a, "\x0a\x01\x02\x03", 4);
    assert_int_equal(ratelimit_ip_parse(&fam, a, "::ffff:10.1.2.3", 15), 0);
    assert_int_equal(fam, AF_INET);
    assert_memory_equal(a, "\x0a\x01\x02\x03", 4);
    assert_int_equal(ratelimit_ip_parse(&fam, a, "2001:db8::1", 11), 0);
    assert_int_equal(fam, AF_INET6);
    assert_int_equal(a[0], 0x20);
    assert_int_equal(a[15], 1);
    /* Only the given length counts. */
    assert_int_equal(ratelimit_ip_parse(&fam, a, "10.1.2.3, 9.9.9.9", 8), 0);
    assert_int_equal(ratelimit_ip_parse(&fam, a, "10.1.2", 6), -EINVAL);
    assert_int_equal(ratelimit_ip_parse(&fam, a, "10.1.2.3:80", 11), -EINVAL);
    assert_int_equal(ratelimit_ip_parse(&fam, a, "[::1]", 5), -EINVAL);
    assert_int_equal(ratelimit_ip_parse(&fam, a, "", 0), -EINVAL);
    assert_int_equal(ratelimit_ip_parse(&fam, a, "1.2.3.4\0", 8), -EINVAL);
    char longs[200];
    memset(longs, '1', sizeof longs);
    assert_int_equal(ratelimit_ip_parse(&fam, a, longs, sizeof longs), -EINVAL);
}

static void test_ip_in(void **state)
{
    (void)state;
    ratelimit_net_t nets[] = {net("10.0.0.0", 8), net("192.168.1.7", 32), net("fd00::", 8),
                              net("172.16.0.0", 12)};
    int fam;
    uint8_t a[16];
    struct {
        const char *ip;
        bool in;
    } cases[] = {
        {"10.255.1.1", true},     {"11.0.0.1", false},   {"192.168.1.7", true},
        {"192.168.1.8", false},   {"fd12::1", true},     {"fe80::1", false},
        {"172.31.255.255", true}, {"172.32.0.0", false}, {"::ffff:10.0.0.1", true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(ratelimit_ip_parse(&fam, a, cases[i].ip, strlen(cases[i].ip)), 0);
        assert_int_equal(ratelimit_ip_in(nets, 4, fam, a), cases[i].in);
    }
    assert_false(ratelimit_ip_in(NULL, 0, fam, a));
}

static void resolve(ratelimit_identity_t *id, const char *cid, const char *xff, const char *peer,
                    const ratelimit_net_t *trusted, size_t n)
{
    ratelimit_identity_resolve(id, cid, cid ? strlen(cid) : 0, xff, xff ? strlen(xff) : 0, peer,
                               trusted, n);
}

static void assert_id(const ratelimit_identity_t *id, ratelimit_id_type_t type, const char *v)
{
    assert_int_equal(id->type, type);
    assert_int_equal(id->len, strlen(v));
    assert_memory_equal(id->value, v, id->len);
}

static void test_identity(void **state)
{
    (void)state;
    ratelimit_net_t trusted[] = {net("127.0.0.1", 32), net("10.0.0.0", 8)};
    ratelimit_identity_t id;
    /* The client id wins over everything. */
    resolve(&id, "acme", "1.2.3.4", "127.0.0.1", trusted, 2);
    assert_id(&id, RATELIMIT_ID_CLIENT, "acme");
    /* Empty client id = absent. */
    resolve(&id, "", NULL, "203.0.113.9", trusted, 2);
    assert_id(&id, RATELIMIT_ID_PEER, "203.0.113.9");
    /* Trusted peer: the first forwarded address, trimmed and canonical. */
    resolve(&id, NULL, " 1.2.3.4 , 5.6.7.8", "10.3.3.3", trusted, 2);
    assert_id(&id, RATELIMIT_ID_IP, "1.2.3.4");
    resolve(&id, NULL, "2001:DB8:0::1", "127.0.0.1", trusted, 2);
    assert_id(&id, RATELIMIT_ID_IP, "2001:db8::1");
    resolve(&id, NULL, "::ffff:1.2.3.4", "127.0.0.1", trusted, 2);
    assert_id(&id, RATELIMIT_ID_IP, "1.2.3.4");
    /* Untrusted peer: x-forwarded-for ignored. */
    resolve(&id, NULL, "1.2.3.4", "203.0.113.9", trusted, 2);
    assert_id(&id, RATELIMIT_ID_PEER, "203.0.113.9");
    resolve(&id, NULL, "1.2.3.4", "127.0.0.1", NULL, 0);
    assert_id(&id, RATELIMIT_ID_PEER, "127.0.0.1");
    /* Trusted peer but garbage first entry: the peer. */
    resolve(&id, NULL, "unknown, 1.2.3.4", "127.0.0.1", trusted, 2);
    assert_id(&id, RATELIMIT_ID_PEER, "127.0.0.1");
    resolve(&id, NULL, "", "127.0.0.1", trusted, 2);
    assert_id(&id, RATELIMIT_ID_PEER, "127.0.0.1");
    /* IPv6 peers are canonicalised; no peer at all is "unknown". */
    resolve(&id, NULL, NULL, "0:0:0:0:0:0:0:1", trusted, 2);
    assert_id(&id, RATELIMIT_ID_PEER, "::1");
    resolve(&id, NULL, "1.2.3.4", NULL, trusted, 2);
    assert_id(&id, RATELIMIT_ID_PEER, "unknown");
    assert_string_equal(ratelimit_id_type_name(RATELIMIT_ID_CLIENT), "client");
    assert_string_equal(ratelimit_id_type_name(RATELIMIT_ID_IP), "ip");
    assert_string_equal(ratelimit_id_type_name(RATELIMIT_ID_PEER), "peer");
}

static size_t key_of(char *out, const char *bucket, ratelimit_id_type_t t, const char *v,
                     size_t len)
{
    ratelimit_identity_t id = {.type = t, .value = v, .len = len};
    return ratelimit_key_build(out, bucket, &id);
}

static void test_key(void **state)
{
    (void)state;
    char k[RATELIMIT_KEY_MAX];
    assert_int_equal(key_of(k, "all", RATELIMIT_ID_CLIENT, "acme-1_x.y", 10),
                     strlen("ratelimit:all:client:acme-1_x.y"));
    assert_string_equal(k, "ratelimit:all:client:acme-1_x.y");
    key_of(k, "GetPayment", RATELIMIT_ID_PEER, "::1", 3);
    assert_string_equal(k, "ratelimit:GetPayment:peer:::1");
    /* Everything else is escaped: spaces, %, ~, braces, newlines, NUL, high bytes. */
    size_t n = key_of(k, "all", RATELIMIT_ID_CLIENT, "a b%~{}\n\0\xff", 10);
    assert_string_equal(k, "ratelimit:all:client:a%20b%25%7E%7B%7D%0A%00%FF");
    assert_int_equal(n, strlen(k));
    /* Escaped up to the bound: kept; beyond: "~" + SHA-256 hex of the raw value. */
    char v[200];
    memset(v, 'a', sizeof v);
    key_of(k, "all", RATELIMIT_ID_CLIENT, v, RATELIMIT_KEY_ESCAPED_MAX);
    assert_int_equal(strlen(k), strlen("ratelimit:all:client:") + RATELIMIT_KEY_ESCAPED_MAX);
    n = key_of(k, "all", RATELIMIT_ID_CLIENT, v, RATELIMIT_KEY_ESCAPED_MAX + 1);
    unsigned char md[32];
    unsigned mdlen;
    EVP_Digest(v, RATELIMIT_KEY_ESCAPED_MAX + 1, md, &mdlen, EVP_sha256(), NULL);
    char want[RATELIMIT_KEY_MAX] = "ratelimit:all:client:~";
    for (int i = 0; i < 32; i++)
        snprintf(want + strlen(want), 3, "%02x", md[i]);
    assert_string_equal(k, want);
    assert_int_equal(n, strlen(want));
    /* 43 escaped bytes = 129 characters: hashed too; two long values differ. */
    memset(v, ' ', 43);
    key_of(k, "all", RATELIMIT_ID_CLIENT, v, 43);
    assert_int_equal(k[strlen("ratelimit:all:client:")], '~');
    char k2[RATELIMIT_KEY_MAX];
    v[42] = '!';
    key_of(k2, "all", RATELIMIT_ID_CLIENT, v, 43);
    assert_string_not_equal(k, k2);
    /* The longest bucket with the longest form fits. */
    memset(v, '\x01', sizeof v);
    n = key_of(k, "GetAccountBalance", RATELIMIT_ID_CLIENT, v, 42);
    assert_true(n < RATELIMIT_KEY_MAX);
    assert_int_equal(n, strlen("ratelimit:GetAccountBalance:client:") + 126);
}

static void test_args(void **state)
{
    (void)state;
    char sha[41];
    ratelimit_lua_sha(sha);
    unsigned char md[20];
    unsigned mdlen;
    EVP_Digest(ratelimit_lua, strlen(ratelimit_lua), md, &mdlen, EVP_sha1(), NULL);
    char want[41];
    for (int i = 0; i < 20; i++)
        snprintf(want + 2 * i, 3, "%02x", md[i]);
    assert_string_equal(sha, want);

    ratelimit_args_t a;
    ratelimit_args_build(&a, sha, "ratelimit:all:peer:::1", 22, 100, 60, "abc:7");
    assert_int_equal(a.argc, 7);
    const char *exp[] = {"EVALSHA", sha, "1", "ratelimit:all:peer:::1", "100", "60000000", "abc:7"};
    for (int i = 0; i < 7; i++) {
        assert_int_equal(a.argvlen[i], strlen(exp[i]));
        assert_memory_equal(a.argv[i], exp[i], a.argvlen[i]);
    }
    /* A key with a NUL byte is passed by length. */
    ratelimit_args_build(&a, NULL, "k\0x", 3, 1, 1, "m");
    assert_string_equal(a.argv[0], "EVAL");
    assert_ptr_equal(a.argv[1], ratelimit_lua);
    assert_int_equal(a.argvlen[3], 3);
    assert_string_equal(a.argv[5], "1000000");
}

static void reply3(redisReply *arr, redisReply *el, redisReply **els, long long x, long long y,
                   long long z)
{
    long long v[3] = {x, y, z};
    for (int i = 0; i < 3; i++) {
        el[i] = (redisReply){.type = REDIS_REPLY_INTEGER, .integer = v[i]};
        els[i] = &el[i];
    }
    *arr = (redisReply){.type = REDIS_REPLY_ARRAY, .elements = 3, .element = els};
}

static void test_reply(void **state)
{
    (void)state;
    redisReply arr, el[3], *els[3];
    ratelimit_verdict_t v;
    reply3(&arr, el, els, 1, 4, 0);
    assert_int_equal(ratelimit_reply_parse(&v, &arr), 0);
    assert_true(v.allowed);
    assert_int_equal(v.remaining, 4);
    assert_int_equal(v.retry_after_s, 0);
    /* Rejected: the wait in µs, rounded up to whole seconds, at least 1. */
    long long waits[][2] = {{1, 1}, {999999, 1}, {1000000, 1}, {1000001, 2}, {59999999, 60}};
    for (size_t i = 0; i < 5; i++) {
        reply3(&arr, el, els, 0, 0, waits[i][0]);
        assert_int_equal(ratelimit_reply_parse(&v, &arr), 0);
        assert_false(v.allowed);
        assert_int_equal(v.remaining, 0);
        assert_int_equal(v.retry_after_s, waits[i][1]);
    }
    reply3(&arr, el, els, 0, 0, 0);
    assert_int_equal(ratelimit_reply_parse(&v, &arr), 0);
    assert_int_equal(v.retry_after_s, 1);
    /* Malformed. */
    reply3(&arr, el, els, 2, 0, 0);
    assert_int_equal(ratelimit_reply_parse(&v, &arr), -EPROTO);
    reply3(&arr, el, els, 1, -1, 0);
    assert_int_equal(ratelimit_reply_parse(&v, &arr), -EPROTO);
    reply3(&arr, el, els, 1, 1, 0);
    el[2].type = REDIS_REPLY_STRING;
    assert_int_equal(ratelimit_reply_parse(&v, &arr), -EPROTO);
    reply3(&arr, el, els, 1, 1, 0);
    arr.elements = 2;
    assert_int_equal(ratelimit_reply_parse(&v, &arr), -EPROTO);
    redisReply err = {.type = REDIS_REPLY_ERROR, .str = "NOSCRIPT", .len = 8};
    assert_int_equal(ratelimit_reply_parse(&v, &err), -EPROTO);
    assert_int_equal(ratelimit_reply_parse(&v, NULL), -EPROTO);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ip_parse), cmocka_unit_test(test_ip_in),
        cmocka_unit_test(test_identity), cmocka_unit_test(test_key),
        cmocka_unit_test(test_args),     cmocka_unit_test(test_reply),
    };
    return cmocka_run_group_tests_name("unit_ratelimit_key", tests, NULL, NULL);
}
