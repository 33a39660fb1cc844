/*
 * kafka-devbroker: a development Kafka broker for the local stack and the tests.
 *
 * DESIGN
 * librdkafka's mock cluster (rdkafka_mock.h, librdkafka 2.0.2) speaks the real Kafka
 * protocol on loopback, so kcat and any Kafka client (our outbox producer included) can
 * produce to it and consume from it. The 2.0.2 mock picks its own listening ports; we
 * publish the bootstrap list ("127.0.0.1:PORT[,127.0.0.1:PORT...]", no newline) through
 * --bootstrap-file, written atomically (temporary file + rename) once the cluster
 * listens, and removed again on a clean exit. Data lives in memory only.
 *
 * Threads: librdkafka runs the cluster on threads of its own. Every signal we react to
 * is blocked before librdkafka starts a thread (threads inherit the mask), and the main
 * thread reads them from a signalfd, so all mock calls happen on the main thread and
 * nothing runs in a signal handler. The main thread sleeps in read(): an idle broker
 * uses ~0 CPU.
 *
 * Drills: SIGUSR1 sets every broker down (connections closed, new ones refused),
 * SIGUSR2 sets them up again. SIGTERM, SIGINT and SIGHUP exit 0 cleanly.
 *
 * Auto-created topics get 4 partitions: 2.0.2 has no public setting for that default.
 * Topics that need another count are created up front with --topic/--partitions.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#define PROG           "kafka-devbroker"
#define MAX_BROKERS    16
#define MAX_PARTITIONS 1024
#define MAX_TOPICS     64
/* What the 2.0.2 mock gives an auto-created topic (rd_kafka_mock_cluster_new). */
#define AUTO_PARTITIONS 4

typedef struct devbroker_opts {
    const char *bootstrap_file; /* NULL: print the address only */
    int brokers;
    int partitions; /* for --topic topics; -1 when not given */
    const char *topics[MAX_TOPICS];
    int ntopics;
} devbroker_opts_t;

static void usage(FILE *out)
{
    fprintf(out,
            "usage: " PROG " [--bootstrap-file FILE] [--brokers N] [--topic NAME]... "
            "[--partitions N]\n"
            "\n"
            "A development Kafka broker: librdkafka's mock cluster on 127.0.0.1, speaking\n"
            "the real Kafka protocol. Data is kept in memory only.\n"
            "\n"
            "  --bootstrap-file FILE  once listening, write the bootstrap address list\n"
            "                         (host:port[,host:port...], no newline) to FILE\n"
            "                         atomically; removed on a clean exit\n"
            "  --brokers N            number of brokers, 1..%d (default 1)\n"
            "  --topic NAME           create topic NAME at start (repeatable); other topics\n"
            "                         are created on first use with %d partitions\n"
            "  --partitions N         partitions of each --topic, 1..%d (default %d)\n"
            "  --help                 show this help\n"
            "\n"
            "Signals: SIGUSR1 sets every broker down, SIGUSR2 up again;\n"
            "SIGTERM/SIGINT/SIGHUP exit 0.\n",
            MAX_BROKERS, AUTO_PARTITIONS, MAX_PARTITIONS, AUTO_PARTITIONS);
}

/* Parses a whole decimal integer in lo..hi; 0 or -EINVAL. */
static int parse_int(int *out, const char *s, int lo, int hi)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
        return -EINVAL;
    *out = (int)v;
    return 0;
}

/* Kafka's legal topic names: 1..249 of [A-Za-z0-9._-], not "." or "..". */
static bool topic_name_valid(const char *t)
{
    size_t n = strlen(t);
    if (n == 0 || n > 249 || strcmp(t, ".") == 0 || strcmp(t, "..") == 0)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = t[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok)
            return false;
    }
    return true;
}

/* 0 to run, 1 after --help, 2 on a usage error (already reported). */
static int parse_args(devbroker_opts_t *opts, int argc, char **argv)
{
    enum { OPT_BOOTSTRAP = 1, OPT_BROKERS, OPT_PARTITIONS, OPT_TOPIC, OPT_HELP };
    static const struct option longopts[] = {
        {"bootstrap-file", required_argument, NULL, OPT_BOOTSTRAP},
        {"brokers", required_argument, NULL, OPT_BROKERS},
        {"partitions", required_argument, NULL, OPT_PARTITIONS},
        {"topic", required_argument, NULL, OPT_TOPIC},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };

    *opts = (devbroker_opts_t){.brokers = 1, .partitions = -1};
    opterr = 0;
    for (;;) {
        int prev = optind;
        int c = getopt_long(argc, argv, "", longopts, NULL);
        if (c == -1)
            break;
        switch (c) {
        case OPT_BOOTSTRAP:
            if (optarg[0] == '\0') {
                fprintf(stderr, PROG ": --bootstrap-file: must not be empty\n");
                return 2;
            }
            opts->bootstrap_file = optarg;
            break;
        case OPT_BROKERS:
            if (parse_int(&opts->brokers, optarg, 1, MAX_BROKERS) != 0) {
                fprintf(stderr, PROG ": --brokers: \"%s\" is not an integer in 1..%d\n", optarg,
                        MAX_BROKERS);
                return 2;
            }
            break;
        case OPT_PARTITIONS:
            if (parse_int(&opts->partitions, optarg, 1, MAX_PARTITIONS) != 0) {
                fprintf(stderr, PROG ": --partitions: \"%s\" is not an integer in 1..%d\n", optarg,
                        MAX_PARTITIONS);
                return 2;
            }
            break;
        case OPT_TOPIC:
            if (!topic_name_valid(optarg)) {
                fprintf(stderr,
                        PROG ": --topic: \"%s\" is not a Kafka topic name "
                             "(1..249 of [A-Za-z0-9._-])\n",
                        optarg);
                return 2;
            }
            if (opts->ntopics == MAX_TOPICS) {
                fprintf(stderr, PROG ": --topic: at most %d topics\n", MAX_TOPICS);
                return 2;
            }
            opts->topics[opts->ntopics++] = optarg;
            break;
        case OPT_HELP:
            usage(stdout);
            return 1;
        default:
            /* optopt is the val of a known long option used wrongly, else unknown; the
             * offending word is argv[prev]. */
            const struct option *known = NULL;
            for (const struct option *o = longopts; o->name && optopt != 0; o++)
                if (o->val == optopt)
                    known = o;
            if (known)
                fprintf(stderr, PROG ": option --%s %s (see --help)\n", known->name,
                        known->has_arg == required_argument ? "needs a value" : "takes no value");
            else
                fprintf(stderr, PROG ": unknown option \"%s\" (see --help)\n",
                        argv[prev < argc ? prev : argc - 1]);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, PROG ": unexpected argument \"%s\" (see --help)\n", argv[optind]);
        return 2;
    }
    if (opts->partitions != -1 && opts->ntopics == 0) {
        fprintf(stderr,
                PROG ": --partitions applies to topics named with --topic; librdkafka 2.0.2's "
                     "mock gives auto-created topics %d partitions and cannot be told otherwise\n",
                AUTO_PARTITIONS);
        return 2;
    }
    if (opts->partitions == -1)
        opts->partitions = AUTO_PARTITIONS;
    return 0;
}

/* Writes text to path through path.tmp.PID + rename, so readers see all or nothing. */
static int write_atomic(const char *path, const char *text)
{
    char tmp[PATH_MAX];
    int n = snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
    if (n < 0 || (size_t)n >= sizeof(tmp))
        return -ENAMETOOLONG;

    int rc = 0;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    size_t len = strlen(text), off = 0;
    while (off < len) {
        ssize_t w = write(fd, text + off, len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            goto fail;
        }
        off += (size_t)w;
    }
    if (fsync(fd) != 0) {
        rc = -errno;
        goto fail;
    }
    if (close(fd) != 0) {
        fd = -1;
        rc = -errno;
        goto fail;
    }
    fd = -1;
    if (rename(tmp, path) != 0) {
        rc = -errno;
        goto fail;
    }
    return 0;

fail:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return rc;
}

/* librdkafka's own log lines, kept to warnings and worse so the start line stands out. */
static void log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    fprintf(stderr, PROG ": librdkafka %d %s: %s\n", level, fac, buf);
}

/* Sets every broker up or down; returns the first error or 0. */
static rd_kafka_resp_err_t set_all_brokers(rd_kafka_mock_cluster_t *mc, int brokers, bool up)
{
    rd_kafka_resp_err_t first = RD_KAFKA_RESP_ERR_NO_ERROR;
    for (int id = 1; id <= brokers; id++) {
        rd_kafka_resp_err_t err =
            up ? rd_kafka_mock_broker_set_up(mc, id) : rd_kafka_mock_broker_set_down(mc, id);
        if (err && !first)
            first = err;
    }
    return first;
}

int main(int argc, char **argv)
{
    devbroker_opts_t opts;
    int prc = parse_args(&opts, argc, argv);
    if (prc == 1)
        return 0;
    if (prc != 0)
        return 2;

    /* Block before librdkafka creates any thread: its threads inherit this mask, so the
     * signals stay pending for our signalfd instead of killing the process. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGUSR1);
    sigaddset(&sigs, SIGUSR2);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    int err = pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    if (err != 0) {
        fprintf(stderr, PROG ": pthread_sigmask: %s\n", strerror(err));
        return 1;
    }
    int sfd = signalfd(-1, &sigs, SFD_CLOEXEC);
    if (sfd < 0) {
        fprintf(stderr, PROG ": signalfd: %s\n", strerror(errno));
        return 1;
    }

    int rc = 1;
    rd_kafka_t *rk = NULL;
    rd_kafka_mock_cluster_t *mc = NULL;
    bool wrote_bootstrap = false;
    char errstr[512];

    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    /* The handle only hosts the cluster; it never connects anywhere itself. */
    if (rd_kafka_conf_set(conf, "client.id", PROG, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
        rd_kafka_conf_set(conf, "log_level", "4", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK) {
        fprintf(stderr, PROG ": librdkafka configuration: %s\n", errstr);
        rd_kafka_conf_destroy(conf);
        goto cleanup;
    }
    rd_kafka_conf_set_log_cb(conf, log_cb);
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk) {
        fprintf(stderr, PROG ": rd_kafka_new: %s\n", errstr);
        rd_kafka_conf_destroy(conf);
        goto cleanup;
    }

    mc = rd_kafka_mock_cluster_new(rk, opts.brokers);
    if (!mc) {
        fprintf(stderr, PROG ": could not create a mock cluster of %d broker(s) on 127.0.0.1\n",
                opts.brokers);
        goto cleanup;
    }
    for (int i = 0; i < opts.ntopics; i++) {
        int replicas = opts.brokers < 3 ? opts.brokers : 3;
        rd_kafka_resp_err_t terr =
            rd_kafka_mock_topic_create(mc, opts.topics[i], opts.partitions, replicas);
        if (terr) {
            fprintf(stderr, PROG ": creating topic \"%s\" (%d partitions): %s\n", opts.topics[i],
                    opts.partitions, rd_kafka_err2str(terr));
            goto cleanup;
        }
    }

    const char *bootstraps = rd_kafka_mock_cluster_bootstraps(mc);
    if (opts.bootstrap_file) {
        int werr = write_atomic(opts.bootstrap_file, bootstraps);
        if (werr != 0) {
            fprintf(stderr, PROG ": writing bootstrap file %s: %s\n", opts.bootstrap_file,
                    strerror(-werr));
            goto cleanup;
        }
        wrote_bootstrap = true;
    }
    fprintf(stderr, PROG ": listening on %s (brokers=%d, pid=%ld)\n", bootstraps, opts.brokers,
            (long)getpid());

    for (;;) {
        struct signalfd_siginfo si;
        ssize_t n = read(sfd, &si, sizeof(si));
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)sizeof(si)) {
            fprintf(stderr, PROG ": reading signalfd: %s\n",
                    n < 0 ? strerror(errno) : "short read");
            goto cleanup;
        }
        if (si.ssi_signo == SIGUSR1 || si.ssi_signo == SIGUSR2) {
            bool up = si.ssi_signo == SIGUSR2;
            rd_kafka_resp_err_t serr = set_all_brokers(mc, opts.brokers, up);
            if (serr)
                fprintf(stderr, PROG ": setting brokers %s: %s\n", up ? "up" : "down",
                        rd_kafka_err2str(serr));
            else
                fprintf(stderr, PROG ": %d broker(s) %s\n", opts.brokers, up ? "up" : "down");
            continue;
        }
        fprintf(stderr, PROG ": %s, exiting\n", strsignal((int)si.ssi_signo));
        rc = 0;
        break;
    }

cleanup:
    if (wrote_bootstrap && unlink(opts.bootstrap_file) != 0 && errno != ENOENT)
        fprintf(stderr, PROG ": removing %s: %s\n", opts.bootstrap_file, strerror(errno));
    if (mc)
        rd_kafka_mock_cluster_destroy(mc);
    if (rk)
        rd_kafka_destroy(rk);
    close(sfd);
    return rc;
}
