/*
 * payment-bench: load generator and latency profiler for paymentd (issue 5).
 *
 * DESIGN
 * One thread drives one completion queue with up to --concurrency unary calls in flight
 * (one slot per call, spread over --connections HTTP/2 connections); no thread per call.
 * Closed loop by default: a slot re-sends as soon as its call ends, and latency is measured
 * from the send. With --rate R the loop is open: request i is due at start + i/R, a due
 * request waits for a free slot if all are busy, and its latency is measured from the time
 * it was DUE, so a stalled server is charged for the requests it kept us from sending
 * (coordinated omission). Latencies go into an HDR-style histogram (payment_bench_hist.c).
 *
 * Requests due during --warmup are sent but not counted. Every AuthorizePayment carries a
 * unique idempotency key, "pb-<run id>-<counter>". A call that ends with an outcome the
 * client cannot know (UNAVAILABLE, DEADLINE_EXCEEDED, ...) is retried after the run with
 * the same key until the server says what happened, so the verification stays exact.
 *
 * Verification (authorize mode): the bench reads the balances of the accounts it pays
 * between before and after the run (GetAccountBalance), and checks them against the
 * AUTHORIZED replies it got (warm-up and resolved retries included): with --payer/--payee,
 * payer delta == -AUTHORIZED x amount and payee delta == +AUTHORIZED x amount; with
 * --accounts, every account's delta equals what the AUTHORIZED replies moved (so debits
 * and credits each sum to AUTHORIZED x amount and the total is unchanged). It assumes no
 * other client moves those accounts meanwhile.
 *
 * Exit status: 0 ok; 1 verification failed; 2 bad flags; 3 RPC errors with --strict;
 * 4 verification could not be performed (balances unreadable); 5 setup failure.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "app/payment_bench_hist.h"
#include "io/grpc_client.h"
#include "grpc/health/v1/health.pb-c.h"
#include "payment/v1/payment.pb-c.h"

#define EXIT_VERIFY   1
#define EXIT_USAGE    2
#define EXIT_STRICT   3
#define EXIT_NOVERIFY 4
#define EXIT_SETUP    5

#define M_AUTHORIZE "/payment.v1.PaymentService/AuthorizePayment"
#define M_GET       "/payment.v1.PaymentService/GetPayment"
#define M_BALANCE   "/payment.v1.PaymentService/GetAccountBalance"
#define M_HEALTH    "/grpc.health.v1.Health/Check"

#define NSTATUS            17
#define NPAYSTATUS         4
#define NDECLINE           7
#define NHEALTH            4
#define MAX_CONNECTIONS    64
#define MAX_RESOLVE_ROUNDS 5

enum mode { MODE_AUTHORIZE, MODE_BALANCE, MODE_GET, MODE_HEALTH };
static const char *const mode_names[] = {"authorize", "balance", "get", "health"};

static const char *const status_names[NSTATUS] = {
    "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"};
static const char *const paystatus_names[NPAYSTATUS] = {"UNSPECIFIED", "AUTHORIZED", "DECLINED",
                                                        "DUPLICATE"};
static const char *const decline_names[NDECLINE] = {
    "UNSPECIFIED",  "INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND", "INVALID_AMOUNT",
    "SAME_ACCOUNT", "CURRENCY_MISMATCH",  "RATE_LIMITED"};
static const char *const health_names[NHEALTH] = {"UNKNOWN", "SERVING", "NOT_SERVING",
                                                  "SERVICE_UNKNOWN"};

typedef struct opts {
    const char *addr;
    enum mode mode;
    const char *payer, *payee;
    long accounts;
    const char *prefix;
    int64_t amount;
    const char *currency;
    int concurrency;
    double duration, warmup, rate;
    const char *json;
    int deadline_ms;
    bool strict;
    const char *payment_id;
    const char *client_id;
    const char *service;
    int connections;
    int seed_payments;
    bool verify;
    uint64_t seed;
} opts_t;

/* One in-flight call. Owned by the completion-queue thread (the only thread). */
typedef struct slot {
    grpc_call *call;
    grpc_byte_buffer *send, *recv;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
    uint64_t due_ns; /* intended send time (open loop) or send time (closed loop) */
    uint64_t seq;    /* request counter: the idempotency key's suffix */
    long payer, payee;
    bool warm;
    int conn;
} slot_t;

/* An authorization whose outcome the client could not know; retried after the run. */
typedef struct pending {
    uint64_t seq;
    long payer, payee;
} pending_t;

typedef struct stats {
    uint64_t requests, bad_responses;
    uint64_t grpc[NSTATUS];
    uint64_t pay[NPAYSTATUS];
    uint64_t decline[NDECLINE];
    uint64_t health[NHEALTH];
    hist_t lat;
} stats_t;

typedef struct bench {
    opts_t o;
    char run_id[32];
    grpc_channel *ch[MAX_CONNECTIONS];
    grpc_completion_queue *cq;      /* the load's calls */
    grpc_completion_queue *sync_cq; /* setup and verification calls, one at a time */
    grpc_metadata md[1];
    size_t nmd;
    /* accounts: ids (authorize/balance); for --payer/--payee, [0]=payer [1]=payee */
    char **acct;
    long nacct;
    bool pairs_random;
    int64_t *before, *expect; /* balances before; expected deltas from AUTHORIZED replies */
    char **pay_ids;           /* get mode */
    size_t npay_ids;
    uint64_t rng;
    uint64_t seq;
    stats_t st;
    uint64_t authorized_all; /* including warm-up and resolved retries */
    uint64_t warm_requests, unsent;
    pending_t *pend;
    size_t npend, cappend;
    uint64_t resolved_authorized, resolved_declined, unresolved;
    char verify_line[512];
    bool verify_done, verify_ok;
    double elapsed_s;
} bench_t;

static volatile sig_atomic_t g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The monotonic instant t (now_ns scale) as a gRPC deadline. */
static gpr_timespec ns_deadline(uint64_t t)
{
    gpr_timespec ts = {.tv_sec = (int64_t)(t / 1000000000u),
                       .tv_nsec = (int32_t)(t % 1000000000u),
                       .clock_type = GPR_CLOCK_MONOTONIC};
    return ts;
}

static gpr_timespec after_ms(int ms)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static uint64_t rng_next(uint64_t *s)
{
    /* xorshift64*: fast and good enough to pick account pairs. */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * UINT64_C(2685821657736338717);
}

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz);
    if (!p) {
        fprintf(stderr, "payment-bench: out of memory\n");
        exit(EXIT_SETUP);
    }
    return p;
}

static char *xstrdup(const char *s)
{
    char *p = strdup(s);
    if (!p) {
        fprintf(stderr, "payment-bench: out of memory\n");
        exit(EXIT_SETUP);
    }
    return p;
}

/* ---- flags -------------------------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: payment-bench [flags]\n"
            "  --addr H:P            paymentd address (default 127.0.0.1:50051)\n"
            "  --mode M              authorize | balance | get | health (default authorize)\n"
            "  --payer A --payee B   one payer/payee pair (authorize; balance reads --payer)\n"
            "  --accounts N          or accounts P0..P{N-1}: random distinct pairs (N >= 2)\n"
            "  --account-prefix P    prefix of those ids (default acct-)\n"
            "  --amount C            cents per payment (default 1)\n"
            "  --currency CUR        (default USD)\n"
            "  --concurrency K       calls in flight (default 16)\n"
            "  --duration S          measured seconds (default 10)\n"
            "  --warmup S            seconds sent first and not counted (default 0)\n"
            "  --rate R              open loop: R requests/s, latency from the intended send time\n"
            "  --deadline-ms D       per-call deadline (default 5000)\n"
            "  --connections C       HTTP/2 connections (default 1)\n"
            "  --json FILE           write the results as JSON\n"
            "  --strict              exit 3 if any call ended with a gRPC error\n"
            "  --no-verify           skip the balance verification (authorize)\n"
            "  --payment-id ID       get mode: read this payment (else --seed-payments are made)\n"
            "  --seed-payments N     get mode: authorizations made first to get ids (default 32)\n"
            "  --service NAME        health mode: service to check (default \"\")\n"
            "  --client-id ID        send x-client-id metadata (rate-limit identity)\n"
            "  --seed N              random seed for account pairs (default: random)\n"
            "Exit: 0 ok, 1 verification failed, 2 bad flags, 3 RPC errors with --strict,\n"
            "      4 verification could not be performed, 5 setup failure.\n");
}

static int bad_flag(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "payment-bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see --help)\n");
    va_end(ap);
    return -1;
}

static int parse_long(const char *flag, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end)
        return bad_flag("%s: \"%s\" is not a whole number", flag, s);
    if (v < lo || v > hi)
        return bad_flag("%s: %ld is not in %ld..%ld", flag, v, lo, hi);
    *out = v;
    return 0;
}

static int parse_double(const char *flag, const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v))
        return bad_flag("%s: \"%s\" is not a number", flag, s);
    if (v < lo || v > hi)
        return bad_flag("%s: %g is not in %g..%g", flag, v, lo, hi);
    *out = v;
    return 0;
}

static bool valid_account_id(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 64)
        return false;
    for (; *s; s++) {
        char c = *s;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == ':' || c == '-'))
            return false;
    }
    return true;
}

static int parse_opts(opts_t *o, int argc, char **argv)
{
    *o = (opts_t){.addr = "127.0.0.1:50051",
                  .mode = MODE_AUTHORIZE,
                  .prefix = "acct-",
                  .amount = 1,
                  .currency = "USD",
                  .concurrency = 16,
                  .duration = 10,
                  .deadline_ms = 5000,
                  .connections = 1,
                  .seed_payments = 32,
                  .verify = true,
                  .service = ""};
    enum {
        O_ADDR = 256,
        O_MODE,
        O_PAYER,
        O_PAYEE,
        O_ACCOUNTS,
        O_PREFIX,
        O_AMOUNT,
        O_CURRENCY,
        O_CONC,
        O_DURATION,
        O_WARMUP,
        O_RATE,
        O_DEADLINE,
        O_CONNS,
        O_JSON,
        O_STRICT,
        O_NOVERIFY,
        O_PAYID,
        O_SEEDPAY,
        O_SERVICE,
        O_CLIENT,
        O_SEED,
        O_HELP
    };
    static const struct option lo[] = {{"addr", required_argument, 0, O_ADDR},
                                       {"mode", required_argument, 0, O_MODE},
                                       {"payer", required_argument, 0, O_PAYER},
                                       {"payee", required_argument, 0, O_PAYEE},
                                       {"accounts", required_argument, 0, O_ACCOUNTS},
                                       {"account-prefix", required_argument, 0, O_PREFIX},
                                       {"amount", required_argument, 0, O_AMOUNT},
                                       {"currency", required_argument, 0, O_CURRENCY},
                                       {"concurrency", required_argument, 0, O_CONC},
                                       {"duration", required_argument, 0, O_DURATION},
                                       {"warmup", required_argument, 0, O_WARMUP},
                                       {"rate", required_argument, 0, O_RATE},
                                       {"deadline-ms", required_argument, 0, O_DEADLINE},
                                       {"connections", required_argument, 0, O_CONNS},
                                       {"json", required_argument, 0, O_JSON},
                                       {"strict", no_argument, 0, O_STRICT},
                                       {"no-verify", no_argument, 0, O_NOVERIFY},
                                       {"payment-id", required_argument, 0, O_PAYID},
                                       {"seed-payments", required_argument, 0, O_SEEDPAY},
                                       {"service", required_argument, 0, O_SERVICE},
                                       {"client-id", required_argument, 0, O_CLIENT},
                                       {"seed", required_argument, 0, O_SEED},
                                       {"help", no_argument, 0, O_HELP},
                                       {0, 0, 0, 0}};
    bool have_seed = false;
    opterr = 0;
    for (;;) {
        int idx = 0;
        int c = getopt_long(argc, argv, "", lo, &idx);
        if (c == -1)
            break;
        long v;
        switch (c) {
        case O_ADDR:
            o->addr = optarg;
            break;
        case O_MODE: {
            int m = -1;
            for (int i = 0; i < 4; i++)
                if (strcmp(optarg, mode_names[i]) == 0)
                    m = i;
            if (m < 0)
                return bad_flag("--mode: \"%s\" is not authorize, balance, get or health", optarg);
            o->mode = (enum mode)m;
            break;
        }
        case O_PAYER:
            o->payer = optarg;
            break;
        case O_PAYEE:
            o->payee = optarg;
            break;
        case O_ACCOUNTS:
            if (parse_long("--accounts", optarg, 2, 10000000, &v))
                return -1;
            o->accounts = v;
            break;
        case O_PREFIX:
            o->prefix = optarg;
            break;
        case O_AMOUNT:
            if (parse_long("--amount", optarg, 1, LONG_MAX, &v))
                return -1;
            o->amount = v;
            break;
        case O_CURRENCY:
            o->currency = optarg;
            break;
        case O_CONC:
            if (parse_long("--concurrency", optarg, 1, 100000, &v))
                return -1;
            o->concurrency = (int)v;
            break;
        case O_DURATION:
            if (parse_double("--duration", optarg, 0.001, 86400, &o->duration))
                return -1;
            break;
        case O_WARMUP:
            if (parse_double("--warmup", optarg, 0, 86400, &o->warmup))
                return -1;
            break;
        case O_RATE:
            if (parse_double("--rate", optarg, 0.001, 1e7, &o->rate))
                return -1;
            break;
        case O_DEADLINE:
            if (parse_long("--deadline-ms", optarg, 1, 3600000, &v))
                return -1;
            o->deadline_ms = (int)v;
            break;
        case O_CONNS:
            if (parse_long("--connections", optarg, 1, MAX_CONNECTIONS, &v))
                return -1;
            o->connections = (int)v;
            break;
        case O_JSON:
            o->json = optarg;
            break;
        case O_STRICT:
            o->strict = true;
            break;
        case O_NOVERIFY:
            o->verify = false;
            break;
        case O_PAYID:
            o->payment_id = optarg;
            break;
        case O_SEEDPAY:
            if (parse_long("--seed-payments", optarg, 1, 100000, &v))
                return -1;
            o->seed_payments = (int)v;
            break;
        case O_SERVICE:
            o->service = optarg;
            break;
        case O_CLIENT:
            o->client_id = optarg;
            break;
        case O_SEED:
            if (parse_long("--seed", optarg, 1, LONG_MAX, &v))
                return -1;
            o->seed = (uint64_t)v;
            have_seed = true;
            break;
        case O_HELP:
            usage(stdout);
            exit(0);
        case ':':
            return bad_flag("%s needs a value", argv[optind - 1]);
        default:
            return bad_flag("unknown flag \"%s\"", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return bad_flag("unexpected argument \"%s\"", argv[optind]);
    if (!have_seed) {
        if (getrandom(&o->seed, sizeof o->seed, 0) != (ssize_t)sizeof o->seed)
            o->seed = (uint64_t)now_ns();
        if (o->seed == 0)
            o->seed = 1;
    }
    if (o->currency[0] == 0 || strlen(o->currency) != 3 || o->currency[0] < 'A' ||
        o->currency[0] > 'Z' || o->currency[1] < 'A' || o->currency[1] > 'Z' ||
        o->currency[2] < 'A' || o->currency[2] > 'Z')
        return bad_flag("--currency: \"%s\" is not three capital letters", o->currency);
    if (o->payer && !valid_account_id(o->payer))
        return bad_flag("--payer: \"%s\" is not an account id (1-64 of A-Za-z0-9_.:-)", o->payer);
    if (o->payee && !valid_account_id(o->payee))
        return bad_flag("--payee: \"%s\" is not an account id (1-64 of A-Za-z0-9_.:-)", o->payee);
    if (o->accounts) {
        char probe[96];
        snprintf(probe, sizeof probe, "%s%ld", o->prefix, o->accounts - 1);
        if (strlen(o->prefix) > 56 || !valid_account_id(probe))
            return bad_flag("--account-prefix: \"%s\" does not make valid account ids", o->prefix);
    }
    if (o->accounts && (o->payer || o->payee))
        return bad_flag("--accounts cannot be combined with --payer/--payee");
    switch (o->mode) {
    case MODE_AUTHORIZE:
        if (!o->accounts && (!o->payer || !o->payee))
            return bad_flag("--mode authorize needs --payer and --payee, or --accounts N");
        if (o->payer && o->payee && strcmp(o->payer, o->payee) == 0)
            return bad_flag("--payer and --payee are the same account \"%s\"", o->payer);
        break;
    case MODE_BALANCE:
        if (!o->accounts && !o->payer)
            return bad_flag("--mode balance needs --payer (the account read) or --accounts N");
        break;
    case MODE_GET:
        if (!o->payment_id && !o->accounts && (!o->payer || !o->payee))
            return bad_flag("--mode get needs --payment-id, or --payer/--payee or --accounts "
                            "to make payments to read");
        break;
    case MODE_HEALTH:
        break;
    }
    if (o->rate > 0 && o->rate * o->duration < 1)
        return bad_flag("--rate %g for --duration %g sends no request", o->rate, o->duration);
    return 0;
}

/* ---- gRPC plumbing ------------------------------------------------------------------- */

/* Starts call on slot with the request bb (ownership moves to the slot). */
static int start_call(bench_t *b, slot_t *s, grpc_completion_queue *cq, const char *method,
                      grpc_byte_buffer *bb, gpr_timespec deadline, void *tag)
{
    grpc_slice m = grpc_slice_from_static_string(method);
    s->call = grpc_channel_create_call(b->ch[s->conn], NULL, GRPC_PROPAGATE_DEFAULTS, cq, m, NULL,
                                       deadline, NULL);
    s->send = bb;
    s->recv = NULL;
    grpc_metadata_array_init(&s->init_md);
    grpc_metadata_array_init(&s->trail_md);
    s->details = grpc_empty_slice();
    s->status = GRPC_STATUS_UNKNOWN;
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = b->nmd;
    ops[0].data.send_initial_metadata.metadata = b->nmd ? b->md : NULL;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &s->init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &s->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &s->trail_md;
    ops[5].data.recv_status_on_client.status = &s->status;
    ops[5].data.recv_status_on_client.status_details = &s->details;
    grpc_call_error e = grpc_call_start_batch(s->call, ops, 6, tag, NULL);
    if (e != GRPC_CALL_OK) {
        fprintf(stderr, "payment-bench: grpc_call_start_batch: error %d\n", (int)e);
        return -EIO;
    }
    return 0;
}

static void end_call(slot_t *s)
{
    if (s->recv)
        grpc_byte_buffer_destroy(s->recv);
    grpc_byte_buffer_destroy(s->send);
    grpc_slice_unref(s->details);
    grpc_metadata_array_destroy(&s->init_md);
    grpc_metadata_array_destroy(&s->trail_md);
    grpc_call_unref(s->call);
    s->call = NULL;
    s->send = s->recv = NULL;
}

/* One blocking call on the sync queue. On return the response message (or NULL) is in
 * *resp (free with protobuf_c_message_free_unpacked), status and details set. 0, or
 * -ETIMEDOUT if the client itself got stuck. */
static int unary(bench_t *b, const char *method, const ProtobufCMessage *req,
                 const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **resp,
                 grpc_status_code *status, char *details, size_t dlen)
{
    slot_t s = {0};
    *resp = NULL;
    /* Setup and verification are not measured: a generous deadline, whatever --deadline-ms. */
    int ms = b->o.deadline_ms > 10000 ? b->o.deadline_ms : 10000;
    if (start_call(b, &s, b->sync_cq, method, gc_buffer_pack(req), after_ms(ms), &s)) {
        end_call(&s);
        return -EIO;
    }
    grpc_event ev = grpc_completion_queue_pluck(b->sync_cq, &s, after_ms(ms + 5000), NULL);
    if (ev.type != GRPC_OP_COMPLETE) {
        grpc_call_cancel(s.call, NULL);
        grpc_completion_queue_pluck(b->sync_cq, &s, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        end_call(&s);
        snprintf(details, dlen, "client stuck for %d ms", ms + 5000);
        *status = GRPC_STATUS_DEADLINE_EXCEEDED;
        return -ETIMEDOUT;
    }
    *status = s.status;
    gc_slice_copy(details, dlen, s.details);
    if (s.status == GRPC_STATUS_OK)
        *resp = gc_buffer_unpack(resp_desc, s.recv);
    end_call(&s);
    return 0;
}

static const char *status_name(grpc_status_code c)
{
    return (unsigned)c < NSTATUS ? status_names[c] : "?";
}

/* Reads one balance. 0, or -1 with why. */
static int read_balance(bench_t *b, const char *id, int64_t *out, char *why, size_t wl)
{
    Payment__V1__GetAccountBalanceRequest req = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
    req.account_id = (char *)id;
    ProtobufCMessage *resp;
    grpc_status_code st;
    char det[256];
    unary(b, M_BALANCE, &req.base, &payment__v1__get_account_balance_response__descriptor, &resp,
          &st, det, sizeof det);
    if (st != GRPC_STATUS_OK) {
        snprintf(why, wl, "GetAccountBalance(%s): %s: %s", id, status_name(st), det);
        return -1;
    }
    if (!resp) {
        snprintf(why, wl, "GetAccountBalance(%s): malformed response", id);
        return -1;
    }
    *out = ((Payment__V1__GetAccountBalanceResponse *)resp)->available_balance_cents;
    protobuf_c_message_free_unpacked(resp, NULL);
    return 0;
}

/* ---- requests ------------------------------------------------------------------------ */

static void pick_pair(bench_t *b, long *payer, long *payee)
{
    if (!b->pairs_random) {
        *payer = 0;
        *payee = 1;
        return;
    }
    long n = b->nacct;
    *payer = (long)(rng_next(&b->rng) % (uint64_t)n);
    long q = (long)(rng_next(&b->rng) % (uint64_t)(n - 1));
    *payee = q >= *payer ? q + 1 : q;
}

static grpc_byte_buffer *authorize_request(bench_t *b, uint64_t seq, long payer, long payee)
{
    char key[64];
    snprintf(key, sizeof key, "pb-%s-%" PRIu64, b->run_id, seq);
    Payment__V1__AuthorizePaymentRequest req = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
    req.idempotency_key = key;
    req.payer_account_id = b->acct[payer];
    req.payee_account_id = b->acct[payee];
    req.amount_cents = b->o.amount;
    req.currency = (char *)b->o.currency;
    req.description = "payment-bench";
    return gc_buffer_pack(&req.base);
}

/* Builds the next request of the load into s; returns its method. */
static const char *next_request(bench_t *b, slot_t *s)
{
    s->seq = b->seq++;
    s->payer = s->payee = -1;
    switch (b->o.mode) {
    case MODE_AUTHORIZE:
        pick_pair(b, &s->payer, &s->payee);
        s->send = authorize_request(b, s->seq, s->payer, s->payee);
        return M_AUTHORIZE;
    case MODE_BALANCE: {
        long a = b->pairs_random ? (long)(rng_next(&b->rng) % (uint64_t)b->nacct) : 0;
        Payment__V1__GetAccountBalanceRequest req = PAYMENT__V1__GET_ACCOUNT_BALANCE_REQUEST__INIT;
        req.account_id = b->acct[a];
        s->send = gc_buffer_pack(&req.base);
        return M_BALANCE;
    }
    case MODE_GET: {
        Payment__V1__GetPaymentRequest req = PAYMENT__V1__GET_PAYMENT_REQUEST__INIT;
        req.payment_id = b->pay_ids[s->seq % b->npay_ids];
        s->send = gc_buffer_pack(&req.base);
        return M_GET;
    }
    case MODE_HEALTH: {
        Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        req.service = (char *)b->o.service;
        s->send = gc_buffer_pack(&req.base);
        return M_HEALTH;
    }
    }
    return NULL;
}

static bool outcome_unknown(grpc_status_code c)
{
    /* A call that may have reached the ledger without its reply reaching us. */
    return c == GRPC_STATUS_UNAVAILABLE || c == GRPC_STATUS_DEADLINE_EXCEEDED ||
           c == GRPC_STATUS_CANCELLED || c == GRPC_STATUS_UNKNOWN || c == GRPC_STATUS_INTERNAL ||
           c == GRPC_STATUS_ABORTED || c == GRPC_STATUS_DATA_LOSS;
}

static void count_authorized(bench_t *b, long payer, long payee)
{
    b->authorized_all++;
    if (b->expect) {
        b->expect[payer] -= b->o.amount;
        b->expect[payee] += b->o.amount;
    }
}

static void add_pending(bench_t *b, const slot_t *s)
{
    if (b->npend == b->cappend) {
        b->cappend = b->cappend ? b->cappend * 2 : 64;
        b->pend = realloc(b->pend, b->cappend * sizeof *b->pend);
        if (!b->pend) {
            fprintf(stderr, "payment-bench: out of memory\n");
            exit(EXIT_SETUP);
        }
    }
    b->pend[b->npend++] = (pending_t){.seq = s->seq, .payer = s->payer, .payee = s->payee};
}

/* Accounts for a finished call of the load. */
static void complete(bench_t *b, slot_t *s, uint64_t t)
{
    stats_t *st = &b->st;
    bool measured = !s->warm;
    if (measured) {
        st->requests++;
        st->grpc[(unsigned)s->status < NSTATUS ? s->status : GRPC_STATUS_UNKNOWN]++;
        hist_record(&st->lat, t > s->due_ns ? (t - s->due_ns + 500) / 1000 : 0);
    } else {
        b->warm_requests++;
    }
    if (s->status != GRPC_STATUS_OK) {
        if (b->o.mode == MODE_AUTHORIZE && outcome_unknown(s->status))
            add_pending(b, s);
        return;
    }
    switch (b->o.mode) {
    case MODE_AUTHORIZE: {
        Payment__V1__AuthorizePaymentResponse *r =
            (Payment__V1__AuthorizePaymentResponse *)gc_buffer_unpack(
                &payment__v1__authorize_payment_response__descriptor, s->recv);
        if (!r) {
            if (measured)
                st->bad_responses++;
            return;
        }
        unsigned ps = (unsigned)r->status < NPAYSTATUS ? (unsigned)r->status : 0;
        unsigned code =
            r->error && (unsigned)r->error->code < NDECLINE ? (unsigned)r->error->code : 0;
        if (measured) {
            st->pay[ps]++;
            if (ps == PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DECLINED)
                st->decline[code]++;
        }
        /* Keys are unique, so DUPLICATE only comes from a retry; count what it replays. */
        if (ps == PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_AUTHORIZED ||
            (ps == PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DUPLICATE && code == 0))
            count_authorized(b, s->payer, s->payee);
        protobuf_c_message_free_unpacked(&r->base, NULL);
        break;
    }
    case MODE_BALANCE:
    case MODE_GET: {
        const ProtobufCMessageDescriptor *d =
            b->o.mode == MODE_BALANCE ? &payment__v1__get_account_balance_response__descriptor
                                      : &payment__v1__get_payment_response__descriptor;
        ProtobufCMessage *r = gc_buffer_unpack(d, s->recv);
        if (!r) {
            if (measured)
                st->bad_responses++;
            return;
        }
        protobuf_c_message_free_unpacked(r, NULL);
        break;
    }
    case MODE_HEALTH: {
        Grpc__Health__V1__HealthCheckResponse *r =
            (Grpc__Health__V1__HealthCheckResponse *)gc_buffer_unpack(
                &grpc__health__v1__health_check_response__descriptor, s->recv);
        if (!r) {
            if (measured)
                st->bad_responses++;
            return;
        }
        if (measured)
            st->health[(unsigned)r->status < NHEALTH ? (unsigned)r->status : 0]++;
        protobuf_c_message_free_unpacked(&r->base, NULL);
        break;
    }
    }
}

/* ---- the load loop ------------------------------------------------------------------- */

static int run_load(bench_t *b)
{
    const opts_t *o = &b->o;
    int k = o->concurrency;
    slot_t *slots = xcalloc((size_t)k, sizeof *slots);
    slot_t **freelist = xcalloc((size_t)k, sizeof *freelist);
    int nfree = 0;
    for (int i = k - 1; i >= 0; i--) {
        slots[i].conn = i % o->connections;
        freelist[nfree++] = &slots[i];
    }
    uint64_t start = now_ns();
    uint64_t warm_end = start + (uint64_t)(o->warmup * 1e9);
    uint64_t end = warm_end + (uint64_t)(o->duration * 1e9);
    double interval = o->rate > 0 ? 1e9 / o->rate : 0;
    uint64_t sent_total =
        0; /* open loop: requests issued so far (request i due at start+i*interval) */
    int inflight = 0;
    int rc = 0;
    uint64_t backlog_grace = (uint64_t)o->deadline_ms * 1000000u;
    for (;;) {
        uint64_t t = now_ns();
        if (g_stop && end > t)
            end = t; /* Ctrl-C: stop sending, finish what is in flight, report */
        /* Open loop: a request due before the end is still sent after it (its latency
         * counts from when it was due), unless the backlog outlives a whole deadline. */
        while (nfree > 0 && (interval > 0 ? t < end + backlog_grace : t < end)) {
            uint64_t due;
            if (interval > 0) {
                due = start + (uint64_t)((double)sent_total * interval);
                if (due > t || due >= end)
                    break;
            } else {
                due = t;
            }
            slot_t *s = freelist[--nfree];
            const char *method = next_request(b, s);
            s->due_ns = due;
            s->warm = due < warm_end;
            if (start_call(b, s, b->cq, method, s->send,
                           ns_deadline(t + (uint64_t)o->deadline_ms * 1000000u), s)) {
                rc = -EIO;
                end = t;
                end_call(s);
                freelist[nfree++] = s;
                break;
            }
            sent_total++;
            inflight++;
        }
        uint64_t next_due = interval > 0 ? start + (uint64_t)((double)sent_total * interval) : 0;
        bool backlog = interval > 0 && next_due < end && t < end + backlog_grace;
        if (t >= end && inflight == 0 && !backlog)
            break;
        uint64_t wake;
        if (t < end) {
            wake = end;
            if (interval > 0 && nfree > 0 && next_due < wake)
                wake = next_due;
            if (wake > t + 100000000u)
                wake = t + 100000000u; /* notice Ctrl-C within 100 ms */
        } else {
            wake = t + 100000000u;
        }
        grpc_event ev = grpc_completion_queue_next(b->cq, ns_deadline(wake), NULL);
        if (ev.type == GRPC_OP_COMPLETE) {
            slot_t *s = ev.tag;
            uint64_t done = now_ns();
            if (!ev.success)
                s->status = GRPC_STATUS_UNKNOWN; /* the batch itself failed */
            complete(b, s, done);
            end_call(s);
            freelist[nfree++] = s;
            inflight--;
        } else if (ev.type == GRPC_QUEUE_SHUTDOWN) {
            fprintf(stderr, "payment-bench: completion queue shut down unexpectedly\n");
            rc = -EIO;
            break;
        }
    }
    /* Open loop: requests that were due before the end but never got a free slot. */
    if (interval > 0) {
        uint64_t due_total = (uint64_t)ceil((double)(end - start) / interval);
        b->unsent = due_total > sent_total ? due_total - sent_total : 0;
    }
    b->elapsed_s = (double)(end > warm_end ? end - warm_end : 0) / 1e9;
    free(freelist);
    free(slots);
    return rc;
}

/* ---- setup and verification ---------------------------------------------------------- */

static int connect_all(bench_t *b)
{
    grpc_arg args[2];
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL; /* one real connection per channel */
    args[0].value.integer = 1;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[1].value.integer = 16 << 20;
    grpc_channel_args ca = {.num_args = 2, .args = args};
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    for (int i = 0; i < b->o.connections; i++)
        b->ch[i] = grpc_channel_create(b->o.addr, creds, &ca);
    grpc_channel_credentials_release(creds);
    /* Wait until every connection is up, so the first measured calls do not pay for it. */
    gpr_timespec deadline = after_ms(10000);
    for (int i = 0; i < b->o.connections; i++) {
        for (;;) {
            grpc_connectivity_state st = grpc_channel_check_connectivity_state(b->ch[i], 1);
            if (st == GRPC_CHANNEL_READY)
                break;
            if (gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), deadline) >= 0) {
                fprintf(stderr, "payment-bench: cannot connect to %s within 10 s\n", b->o.addr);
                return -1;
            }
            grpc_channel_watch_connectivity_state(b->ch[i], st, deadline, b->sync_cq, b);
            grpc_completion_queue_pluck(b->sync_cq, b, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        }
    }
    return 0;
}

static int setup_accounts(bench_t *b)
{
    const opts_t *o = &b->o;
    if (o->accounts) {
        b->nacct = o->accounts;
        b->pairs_random = true;
        b->acct = xcalloc((size_t)b->nacct, sizeof *b->acct);
        for (long i = 0; i < b->nacct; i++) {
            char id[96];
            snprintf(id, sizeof id, "%s%ld", o->prefix, i);
            b->acct[i] = xstrdup(id);
        }
    } else if (o->payer) {
        b->nacct = o->payee ? 2 : 1;
        b->acct = xcalloc(2, sizeof *b->acct);
        b->acct[0] = xstrdup(o->payer);
        b->acct[1] = xstrdup(o->payee ? o->payee : o->payer);
    }
    return 0;
}

/* Get mode: make some payments to read, unless --payment-id names one. */
static int collect_payment_ids(bench_t *b)
{
    if (b->o.payment_id) {
        b->pay_ids = xcalloc(1, sizeof *b->pay_ids);
        b->pay_ids[0] = xstrdup(b->o.payment_id);
        b->npay_ids = 1;
        return 0;
    }
    b->pay_ids = xcalloc((size_t)b->o.seed_payments, sizeof *b->pay_ids);
    char last[512] = "";
    for (int i = 0; i < b->o.seed_payments; i++) {
        long payer, payee;
        pick_pair(b, &payer, &payee);
        char key[64];
        snprintf(key, sizeof key, "pb-%s-seed-%d", b->run_id, i);
        Payment__V1__AuthorizePaymentRequest req = PAYMENT__V1__AUTHORIZE_PAYMENT_REQUEST__INIT;
        req.idempotency_key = key;
        req.payer_account_id = b->acct[payer];
        req.payee_account_id = b->acct[payee];
        req.amount_cents = b->o.amount;
        req.currency = (char *)b->o.currency;
        req.description = "payment-bench seed";
        ProtobufCMessage *resp;
        grpc_status_code st;
        char det[256];
        unary(b, M_AUTHORIZE, &req.base, &payment__v1__authorize_payment_response__descriptor,
              &resp, &st, det, sizeof det);
        if (st != GRPC_STATUS_OK || !resp) {
            snprintf(last, sizeof last, "AuthorizePayment: %s: %s", status_name(st),
                     resp ? det : (st == GRPC_STATUS_OK ? "malformed response" : det));
            if (resp)
                protobuf_c_message_free_unpacked(resp, NULL);
            continue;
        }
        Payment__V1__AuthorizePaymentResponse *r = (Payment__V1__AuthorizePaymentResponse *)resp;
        if (r->payment_id && r->payment_id[0])
            b->pay_ids[b->npay_ids++] = xstrdup(r->payment_id);
        protobuf_c_message_free_unpacked(resp, NULL);
    }
    if (b->npay_ids == 0) {
        fprintf(stderr, "payment-bench: --mode get: none of %d seed payments returned an id (%s)\n",
                b->o.seed_payments, last[0] ? last : "no payment_id in the replies");
        return -1;
    }
    printf("get: reading %zu payment ids\n", b->npay_ids);
    return 0;
}

/* Balances before the run; on failure verification is impossible (reason in verify_line). */
static int balances_before(bench_t *b)
{
    b->before = xcalloc((size_t)b->nacct, sizeof *b->before);
    b->expect = xcalloc((size_t)b->nacct, sizeof *b->expect);
    char why[400];
    for (long i = 0; i < b->nacct; i++) {
        if (read_balance(b, b->acct[i], &b->before[i], why, sizeof why)) {
            snprintf(b->verify_line, sizeof b->verify_line,
                     "verify: cannot check: %s before the run: FAILED", why);
            free(b->before);
            free(b->expect);
            b->before = b->expect = NULL;
            return -1;
        }
    }
    return 0;
}

/* Retries the calls whose outcome was unknown, with their own keys, until the server says
 * what happened (AUTHORIZED / DECLINED / a replayed DUPLICATE). */
static void resolve_pending(bench_t *b)
{
    for (int round = 0; round < MAX_RESOLVE_ROUNDS && b->npend > 0; round++) {
        size_t keep = 0;
        for (size_t i = 0; i < b->npend; i++) {
            pending_t p = b->pend[i];
            slot_t s = {0};
            s.send = authorize_request(b, p.seq, p.payer, p.payee);
            s.payer = p.payer;
            s.payee = p.payee;
            /* A generous deadline: the point is to learn the outcome, not to measure. */
            int ms = b->o.deadline_ms > 10000 ? b->o.deadline_ms : 10000;
            if (start_call(b, &s, b->sync_cq, M_AUTHORIZE, s.send, after_ms(ms), &s)) {
                end_call(&s);
                b->pend[keep++] = p;
                continue;
            }
            grpc_completion_queue_pluck(b->sync_cq, &s, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
            Payment__V1__AuthorizePaymentResponse *r = NULL;
            if (s.status == GRPC_STATUS_OK)
                r = (Payment__V1__AuthorizePaymentResponse *)gc_buffer_unpack(
                    &payment__v1__authorize_payment_response__descriptor, s.recv);
            if (r) {
                unsigned code = r->error ? (unsigned)r->error->code : 0;
                bool auth = r->status == PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_AUTHORIZED ||
                            (r->status == PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_DUPLICATE &&
                             code == 0);
                if (auth) {
                    count_authorized(b, p.payer, p.payee);
                    b->resolved_authorized++;
                } else {
                    b->resolved_declined++;
                }
                protobuf_c_message_free_unpacked(&r->base, NULL);
            } else if (s.status == GRPC_STATUS_OK || !outcome_unknown(s.status)) {
                b->resolved_declined++; /* a definite error: nothing was stored */
            } else {
                b->pend[keep++] = p;
            }
            end_call(&s);
        }
        b->npend = keep;
        if (keep > 0)
            usleep(200000);
    }
    b->unresolved = b->npend;
}

static void verify(bench_t *b)
{
    b->verify_done = true;
    b->verify_ok = false;
    char why[400];
    int64_t *after = xcalloc((size_t)b->nacct, sizeof *after);
    for (long i = 0; i < b->nacct; i++) {
        if (read_balance(b, b->acct[i], &after[i], why, sizeof why)) {
            snprintf(b->verify_line, sizeof b->verify_line,
                     "verify: cannot check: %s after the run: FAILED", why);
            b->verify_done = false;
            free(after);
            return;
        }
    }
    int64_t want = (int64_t)b->authorized_all * b->o.amount;
    char extra[160] = "";
    if (b->unresolved)
        snprintf(extra, sizeof extra, " (%" PRIu64 " calls of unknown outcome unresolved)",
                 b->unresolved);
    if (!b->pairs_random) {
        int64_t dpayer = after[0] - b->before[0], dpayee = after[1] - b->before[1];
        b->verify_ok = dpayer == -want && dpayee == want && b->unresolved == 0;
        snprintf(b->verify_line, sizeof b->verify_line,
                 "verify: payer balance delta %" PRId64 " %s -%" PRIu64 " AUTHORIZED x %" PRId64
                 "; payee delta %+" PRId64 "%s: %s",
                 dpayer, dpayer == -want && dpayee == want ? "==" : "!=", b->authorized_all,
                 b->o.amount, dpayee, extra, b->verify_ok ? "OK" : "FAILED");
    } else {
        int64_t debits = 0, credits = 0, total = 0;
        long mismatched = 0, first = -1;
        for (long i = 0; i < b->nacct; i++) {
            int64_t d = after[i] - b->before[i];
            total += d;
            if (d != b->expect[i] && mismatched++ == 0)
                first = i;
            if (b->expect[i] < 0)
                debits += b->expect[i];
            else
                credits += b->expect[i];
        }
        /* Per account, the net of what the replies moved; netted debits/credits sum to the
         * total moved only when no account both paid and received, so also report total. */
        b->verify_ok = mismatched == 0 && total == 0 && b->unresolved == 0;
        char miss[200] = "";
        if (mismatched)
            snprintf(miss, sizeof miss,
                     "; %ld accounts differ, e.g. %s delta %" PRId64 " expected %" PRId64,
                     mismatched, b->acct[first], after[first] - b->before[first], b->expect[first]);
        snprintf(b->verify_line, sizeof b->verify_line,
                 "verify: %ld account balance deltas %s the %" PRIu64 " AUTHORIZED x %" PRId64
                 " replies (moved %" PRId64 ", net out %" PRId64 ", net in %+" PRId64
                 ", sum %" PRId64 ")%s%s: %s",
                 b->nacct, mismatched ? "!=" : "==", b->authorized_all, b->o.amount, want, debits,
                 credits, total, miss, extra, b->verify_ok ? "OK" : "FAILED");
    }
    free(after);
}

/* ---- report -------------------------------------------------------------------------- */

static void print_report(bench_t *b)
{
    const stats_t *st = &b->st;
    const opts_t *o = &b->o;
    double secs = b->elapsed_s > 0 ? b->elapsed_s : o->duration;
    uint64_t ok = st->grpc[GRPC_STATUS_OK];
    printf("payment-bench: mode %s, %s, concurrency %d, connections %d, %s, duration %.3g s"
           " (+%.3g s warm-up), deadline %d ms\n",
           mode_names[o->mode], o->addr, o->concurrency, o->connections,
           o->rate > 0 ? "open loop" : "closed loop", secs, o->warmup, o->deadline_ms);
    if (o->rate > 0)
        printf("rate: %.1f/s target, %" PRIu64 " due requests never sent (all slots busy)\n",
               o->rate, b->unsent);
    printf("requests: %" PRIu64 "  ok: %" PRIu64 "  errors: %" PRIu64 "  bad responses: %" PRIu64
           "\n",
           st->requests, ok, st->requests - ok, st->bad_responses);
    printf("throughput: %.1f ok/s  (%.1f requests/s)\n", (double)ok / secs,
           (double)st->requests / secs);
    printf("grpc status:");
    for (int i = 0; i < NSTATUS; i++)
        if (st->grpc[i])
            printf(" %s=%" PRIu64, status_names[i], st->grpc[i]);
    printf("\n");
    if (o->mode == MODE_AUTHORIZE) {
        printf("payment status:");
        for (int i = 0; i < NPAYSTATUS; i++)
            printf(" %s=%" PRIu64, paystatus_names[i], st->pay[i]);
        printf("\n");
        printf("decline codes:");
        bool any = false;
        for (int i = 0; i < NDECLINE; i++)
            if (st->decline[i]) {
                printf(" %s=%" PRIu64, decline_names[i], st->decline[i]);
                any = true;
            }
        printf("%s\n", any ? "" : " none");
        printf("authorized/s: %.1f\n",
               (double)st->pay[PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_AUTHORIZED] / secs);
    }
    if (o->mode == MODE_HEALTH) {
        printf("health status:");
        for (int i = 0; i < NHEALTH; i++)
            printf(" %s=%" PRIu64, health_names[i], st->health[i]);
        printf("\n");
    }
    const hist_t *h = &st->lat;
    printf("latency us: p50 %" PRIu64 "  p90 %" PRIu64 "  p99 %" PRIu64 "  p99.9 %" PRIu64
           "  max %" PRIu64 "  mean %.0f  min %" PRIu64 "%s\n",
           hist_percentile(h, 50), hist_percentile(h, 90), hist_percentile(h, 99),
           hist_percentile(h, 99.9), h->max, hist_mean(h), h->total ? h->min : 0,
           o->rate > 0 ? "  (from intended send time)" : "");
    if (o->mode == MODE_AUTHORIZE &&
        (b->warm_requests || b->resolved_authorized || b->resolved_declined || b->unresolved))
        printf("also: %" PRIu64 " warm-up calls; unknown outcomes resolved by retry: %" PRIu64
               " authorized, %" PRIu64 " not; unresolved %" PRIu64 "\n",
               b->warm_requests, b->resolved_authorized, b->resolved_declined, b->unresolved);
    if (b->verify_line[0])
        printf("%s\n", b->verify_line);
}

static void json_counts(FILE *f, const char *name, const char *const *names, const uint64_t *v,
                        int n, bool all)
{
    fprintf(f, "  \"%s\": {", name);
    bool first = true;
    for (int i = 0; i < n; i++) {
        if (!all && !v[i])
            continue;
        fprintf(f, "%s\"%s\": %" PRIu64, first ? "" : ", ", names[i], v[i]);
        first = false;
    }
    fprintf(f, "},\n");
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static int write_json(bench_t *b, const char *path, int exit_code)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "payment-bench: --json %s: %s\n", path, strerror(errno));
        return -1;
    }
    const stats_t *st = &b->st;
    const opts_t *o = &b->o;
    const hist_t *h = &st->lat;
    double secs = b->elapsed_s > 0 ? b->elapsed_s : o->duration;
    uint64_t ok = st->grpc[GRPC_STATUS_OK];
    fprintf(f, "{\n  \"mode\": \"%s\",\n  \"addr\": ", mode_names[o->mode]);
    json_str(f, o->addr);
    fprintf(f, ",\n  \"run_id\": \"%s\",\n  \"concurrency\": %d,\n  \"connections\": %d,\n",
            b->run_id, o->concurrency, o->connections);
    fprintf(f, "  \"open_loop\": %s,\n  \"rate\": %.3f,\n  \"unsent\": %" PRIu64 ",\n",
            o->rate > 0 ? "true" : "false", o->rate, b->unsent);
    fprintf(f, "  \"duration_s\": %.6f,\n  \"warmup_s\": %.6f,\n  \"deadline_ms\": %d,\n", secs,
            o->warmup, o->deadline_ms);
    fprintf(f, "  \"amount_cents\": %" PRId64 ",\n  \"accounts\": %ld,\n", o->amount, b->nacct);
    fprintf(f,
            "  \"requests\": %" PRIu64 ",\n  \"ok\": %" PRIu64 ",\n  \"errors\": %" PRIu64
            ",\n  \"bad_responses\": %" PRIu64 ",\n",
            st->requests, ok, st->requests - ok, st->bad_responses);
    fprintf(f,
            "  \"ok_per_s\": %.3f,\n  \"requests_per_s\": %.3f,\n  \"authorized_per_s\": %.3f,\n",
            (double)ok / secs, (double)st->requests / secs,
            (double)st->pay[PAYMENT__V1__PAYMENT_STATUS__PAYMENT_STATUS_AUTHORIZED] / secs);
    json_counts(f, "grpc_status", status_names, st->grpc, NSTATUS, false);
    json_counts(f, "payment_status", paystatus_names, st->pay, NPAYSTATUS, true);
    json_counts(f, "decline_code", decline_names, st->decline, NDECLINE, false);
    json_counts(f, "health_status", health_names, st->health, NHEALTH, true);
    fprintf(f,
            "  \"latency_us\": {\"count\": %" PRIu64 ", \"min\": %" PRIu64 ", \"mean\": %.1f, "
            "\"p50\": %" PRIu64 ", \"p90\": %" PRIu64 ", \"p99\": %" PRIu64 ", \"p99_9\": %" PRIu64
            ", \"max\": %" PRIu64 "},\n",
            h->total, h->total ? h->min : 0, hist_mean(h), hist_percentile(h, 50),
            hist_percentile(h, 90), hist_percentile(h, 99), hist_percentile(h, 99.9), h->max);
    fprintf(f, "  \"warmup_requests\": %" PRIu64 ",\n", b->warm_requests);
    fprintf(f,
            "  \"unknown_outcomes\": {\"resolved_authorized\": %" PRIu64
            ", \"resolved_not_authorized\": %" PRIu64 ", \"unresolved\": %" PRIu64 "},\n",
            b->resolved_authorized, b->resolved_declined, b->unresolved);
    fprintf(f,
            "  \"verify\": {\"performed\": %s, \"ok\": %s, \"authorized_total\": %" PRIu64
            ", \"line\": ",
            b->verify_done ? "true" : "false", b->verify_ok ? "true" : "false", b->authorized_all);
    json_str(f, b->verify_line);
    fprintf(f, "},\n  \"exit_code\": %d\n}\n", exit_code);
    if (fclose(f) != 0) {
        fprintf(stderr, "payment-bench: --json %s: %s\n", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- main ---------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    bench_t *b = xcalloc(1, sizeof *b);
    if (parse_opts(&b->o, argc, argv))
        return EXIT_USAGE;
    hist_reset(&b->st.lat);
    b->rng = b->o.seed;
    uint8_t rnd[6];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        memset(rnd, 0, sizeof rnd);
    snprintf(b->run_id, sizeof b->run_id, "%02x%02x%02x%02x%02x%02x%d", rnd[0], rnd[1], rnd[2],
             rnd[3], rnd[4], rnd[5], (int)getpid());
    if (b->o.client_id) {
        b->md[0].key = grpc_slice_from_static_string("x-client-id");
        b->md[0].value = grpc_slice_from_static_string(b->o.client_id);
        b->nmd = 1;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    grpc_init();
    b->cq = grpc_completion_queue_create_for_next(NULL);
    b->sync_cq = grpc_completion_queue_create_for_pluck(NULL);
    int code = 0;
    setup_accounts(b);
    if (connect_all(b)) {
        code = EXIT_SETUP;
        goto out;
    }
    if (b->o.mode == MODE_GET && collect_payment_ids(b)) {
        code = EXIT_SETUP;
        goto out;
    }
    bool want_verify = b->o.mode == MODE_AUTHORIZE && b->o.verify;
    bool can_verify = want_verify && balances_before(b) == 0;
    if (run_load(b)) {
        code = EXIT_SETUP;
        goto out;
    }
    if (b->o.mode == MODE_AUTHORIZE)
        resolve_pending(b);
    if (can_verify)
        verify(b);
    print_report(b);
    if (want_verify && !b->verify_done)
        code = EXIT_NOVERIFY;
    else if (want_verify && !b->verify_ok)
        code = EXIT_VERIFY;
    else if (b->o.strict && (b->st.requests != b->st.grpc[GRPC_STATUS_OK] || b->st.bad_responses))
        code = EXIT_STRICT;
    if (b->o.json && write_json(b, b->o.json, code) && code == 0)
        code = EXIT_SETUP;
out:
    for (int i = 0; i < b->o.connections; i++)
        if (b->ch[i])
            grpc_channel_destroy(b->ch[i]);
    grpc_completion_queue_shutdown(b->cq);
    while (grpc_completion_queue_next(b->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(b->cq);
    grpc_completion_queue_shutdown(b->sync_cq);
    while (grpc_completion_queue_pluck(b->sync_cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
               .type != GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(b->sync_cq);
    grpc_shutdown_blocking();
    for (long i = 0; b->acct && i < b->nacct; i++)
        free(b->acct[i]);
    free(b->acct);
    for (size_t i = 0; i < b->npay_ids; i++)
        free(b->pay_ids[i]);
    free(b->pay_ids);
    free(b->before);
    free(b->expect);
    free(b->pend);
    free(b);
    fflush(stdout);
    return code;
}
