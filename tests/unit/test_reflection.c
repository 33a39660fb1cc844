/*
 * Unit tests of io/reflection against the build's embedded descriptor set (the files the
 * server really serves) and against descriptor sets protoc builds here from small protos
 * with imports and extensions. protoc (package protobuf-compiler) is required: a test
 * that needs it fails, naming it, when it is missing.
 */
#include <errno.h>
#include <ftw.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "google/protobuf/descriptor.pb-c.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "grpc/reflection/v1alpha/reflection.pb-c.h"
#include "io/reflection.h"

typedef Grpc__Reflection__V1__ServerReflectionRequest req_t;
typedef Grpc__Reflection__V1__ServerReflectionResponse resp_t;

#define HOST "localhost:50051"

#define Q_FILE GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME
#define Q_SYMBOL                                                                                   \
    GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL
#define Q_EXT                                                                                      \
    GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION
#define Q_EXTNUM                                                                                   \
    GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE
#define Q_LIST GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES

#define R_FILES                                                                                    \
    GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE
#define R_EXTNUM                                                                                   \
    GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE
#define R_LIST                                                                                     \
    GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE
#define R_ERROR GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE

static const char *const SERVED[] = {
    "payment.v1.PaymentService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
};
#define NSERVED (sizeof(SERVED) / sizeof(SERVED[0]))

static reflection_t *served; /* over pay_descriptor_set, made by the group setup */

/* ---- helpers ---- */

/* Packs q, asks r, decodes the answer and checks the echo fields of every response. */
static resp_t *ask(reflection_t *r, const req_t *q)
{
    size_t n = grpc__reflection__v1__server_reflection_request__get_packed_size(q);
    uint8_t *buf = malloc(n ? n : 1);
    assert_non_null(buf);
    grpc__reflection__v1__server_reflection_request__pack(q, buf);
    uint8_t *out = NULL;
    size_t out_len = 0;
    int rc = reflection_respond(r, buf, n, &out, &out_len);
    free(buf);
    assert_int_equal(rc, 0);
    assert_non_null(out);
    resp_t *resp = grpc__reflection__v1__server_reflection_response__unpack(NULL, out_len, out);
    free(out);
    assert_non_null(resp);
    assert_string_equal(resp->valid_host, q->host);
    assert_non_null(resp->original_request);
    assert_string_equal(resp->original_request->host, q->host);
    assert_int_equal(resp->original_request->message_request_case, q->message_request_case);
    return resp;
}

static resp_t *ask_str(reflection_t *r, int which, const char *arg)
{
    req_t q = GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
    q.host = HOST;
    q.message_request_case = which;
    switch (which) {
    case Q_FILE:
        q.file_by_filename = (char *)arg;
        break;
    case Q_SYMBOL:
        q.file_containing_symbol = (char *)arg;
        break;
    case Q_EXTNUM:
        q.all_extension_numbers_of_type = (char *)arg;
        break;
    case Q_LIST:
        q.list_services = (char *)arg;
        break;
    default:
        fail_msg("bad request kind %d", which);
    }
    resp_t *resp = ask(r, &q);
    const req_t *o = resp->original_request;
    assert_string_equal(which == Q_FILE     ? o->file_by_filename
                        : which == Q_SYMBOL ? o->file_containing_symbol
                        : which == Q_EXTNUM ? o->all_extension_numbers_of_type
                                            : o->list_services,
                        arg);
    return resp;
}

static resp_t *ask_ext(reflection_t *r, const char *type, int32_t number)
{
    Grpc__Reflection__V1__ExtensionRequest e = GRPC__REFLECTION__V1__EXTENSION_REQUEST__INIT;
    e.containing_type = (char *)type;
    e.extension_number = number;
    req_t q = GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
    q.host = HOST;
    q.message_request_case = Q_EXT;
    q.file_containing_extension = &e;
    resp_t *resp = ask(r, &q);
    assert_non_null(resp->original_request->file_containing_extension);
    assert_string_equal(resp->original_request->file_containing_extension->containing_type, type);
    assert_int_equal(resp->original_request->file_containing_extension->extension_number, number);
    return resp;
}

static void resp_free(resp_t *resp)
{
    grpc__reflection__v1__server_reflection_response__free_unpacked(resp, NULL);
}

static Google__Protobuf__FileDescriptorProto *decode_file(const ProtobufCBinaryData *b)
{
    Google__Protobuf__FileDescriptorProto *fd =
        google__protobuf__file_descriptor_proto__unpack(NULL, b->len, b->data);
    assert_non_null(fd);
    return fd;
}

/* The response must list exactly these files, in this order. */
static void expect_files(resp_t *resp, const char *const *names, size_t n, const char *what)
{
    if (resp->message_response_case != R_FILES)
        fail_msg("%s: expected file_descriptor_response, got case %d (%s)", what,
                 resp->message_response_case,
                 resp->message_response_case == R_ERROR ? resp->error_response->error_message
                                                        : "-");
    const Grpc__Reflection__V1__FileDescriptorResponse *f = resp->file_descriptor_response;
    char got[1024] = "";
    for (size_t i = 0; i < f->n_file_descriptor_proto; i++) {
        Google__Protobuf__FileDescriptorProto *fd = decode_file(&f->file_descriptor_proto[i]);
        strncat(got, fd->name, sizeof(got) - strlen(got) - 2);
        strcat(got, " ");
        google__protobuf__file_descriptor_proto__free_unpacked(fd, NULL);
    }
    char want[1024] = "";
    for (size_t i = 0; i < n; i++) {
        strncat(want, names[i], sizeof(want) - strlen(want) - 2);
        strcat(want, " ");
    }
    if (strcmp(got, want) != 0)
        fail_msg("%s: expected files [%s], got [%s]", what, want, got);
    assert_int_equal(f->n_file_descriptor_proto, n);
}

static void expect_error(resp_t *resp, int32_t code, const char *message)
{
    if (resp->message_response_case != R_ERROR)
        fail_msg("expected error_response \"%s\", got case %d", message,
                 resp->message_response_case);
    assert_int_equal(resp->error_response->error_code, code);
    assert_string_equal(resp->error_response->error_message, message);
}

static void need_protoc(void)
{
    const char *path = getenv("PATH");
    if (path) {
        char *dirs = strdup(path);
        assert_non_null(dirs);
        char *save = NULL;
        for (char *d = strtok_r(dirs, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
            char p[4096];
            snprintf(p, sizeof(p), "%s/protoc", *d ? d : ".");
            if (access(p, X_OK) == 0) {
                free(dirs);
                return;
            }
        }
        free(dirs);
    }
    fail_msg("protoc not found on PATH: install Debian package protobuf-compiler");
}

static void run_ok(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int st = system(cmd);
    if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail_msg("command failed (status %d): %s", st, cmd);
}

static void write_file(const char *dir, const char *name, const void *data, size_t len)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f)
        fail_msg("cannot create %s: %s", path, strerror(errno));
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* Whole file, malloc'd (one extra NUL byte so text can be searched). */
static uint8_t *read_file(const char *dir, const char *name, size_t *len)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("cannot open %s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    uint8_t *buf = malloc(cap + 1);
    assert_non_null(buf);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
            assert_non_null(buf);
        }
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path);
}

static int tmpdir_setup(void **state)
{
    char *d = strdup("/tmp/test_reflection.XXXXXX");
    if (!d || !mkdtemp(d)) {
        free(d);
        return -1;
    }
    *state = d;
    return 0;
}

static int tmpdir_teardown(void **state)
{
    char *d = *state;
    int rc = nftw(d, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(d);
    return rc;
}

static int served_setup(void **state)
{
    return reflection_create(&served, pay_descriptor_set, pay_descriptor_set_len, SERVED, NSERVED);
}

static int served_teardown(void **state)
{
    reflection_destroy(served);
    served = NULL;
    return 0;
}

/* ---- the served descriptor set ---- */

static void test_list_services(void **state)
{
    resp_t *resp = ask_str(served, Q_LIST, "*");
    assert_int_equal(resp->message_response_case, R_LIST);
    assert_int_equal(resp->list_services_response->n_service, NSERVED);
    for (size_t i = 0; i < NSERVED; i++)
        assert_string_equal(resp->list_services_response->service[i]->name, SERVED[i]);
    resp_free(resp);

    /* the content of list_services is not checked; an empty host is echoed as empty */
    req_t q = GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
    q.message_request_case = Q_LIST;
    q.list_services = "";
    resp = ask(served, &q);
    assert_string_equal(resp->valid_host, "");
    assert_int_equal(resp->message_response_case, R_LIST);
    assert_int_equal(resp->list_services_response->n_service, NSERVED);
    resp_free(resp);
}

static void test_file_by_filename_payment(void **state)
{
    resp_t *resp = ask_str(served, Q_FILE, "payment/v1/payment.proto");
    const char *const want[] = {"payment/v1/payment.proto"};
    expect_files(resp, want, 1, "payment.proto");

    const ProtobufCBinaryData *b = &resp->file_descriptor_response->file_descriptor_proto[0];
    /* served verbatim: the bytes occur as such in the embedded set */
    assert_non_null(memmem(pay_descriptor_set, pay_descriptor_set_len, b->data, b->len));

    Google__Protobuf__FileDescriptorProto *fd = decode_file(b);
    assert_string_equal(fd->package, "payment.v1");
    assert_string_equal(fd->syntax, "proto3");
    assert_int_equal(fd->n_dependency, 0);
    assert_int_equal(fd->n_service, 1);
    const Google__Protobuf__ServiceDescriptorProto *s = fd->service[0];
    assert_string_equal(s->name, "PaymentService");
    assert_int_equal(s->n_method, 3);
    const char *const methods[][3] = {
        {"AuthorizePayment", ".payment.v1.AuthorizePaymentRequest",
         ".payment.v1.AuthorizePaymentResponse"},
        {"GetPayment", ".payment.v1.GetPaymentRequest", ".payment.v1.GetPaymentResponse"},
        {"GetAccountBalance", ".payment.v1.GetAccountBalanceRequest",
         ".payment.v1.GetAccountBalanceResponse"},
    };
    for (size_t i = 0; i < 3; i++) {
        assert_string_equal(s->method[i]->name, methods[i][0]);
        assert_string_equal(s->method[i]->input_type, methods[i][1]);
        assert_string_equal(s->method[i]->output_type, methods[i][2]);
    }
    assert_int_equal(fd->n_message_type, 8);
    assert_int_equal(fd->n_enum_type, 2);
    google__protobuf__file_descriptor_proto__free_unpacked(fd, NULL);
    resp_free(resp);
}

static void test_file_by_filename_grpc_files(void **state)
{
    const struct {
        const char *file, *package, *service;
    } cases[] = {
        {"grpc/reflection/v1alpha/reflection.proto", "grpc.reflection.v1alpha", "ServerReflection"},
        {"grpc/reflection/v1/reflection.proto", "grpc.reflection.v1", "ServerReflection"},
        {"grpc/health/v1/health.proto", "grpc.health.v1", "Health"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        resp_t *resp = ask_str(served, Q_FILE, cases[i].file);
        expect_files(resp, &cases[i].file, 1, cases[i].file);
        Google__Protobuf__FileDescriptorProto *fd =
            decode_file(&resp->file_descriptor_response->file_descriptor_proto[0]);
        assert_string_equal(fd->package, cases[i].package);
        assert_int_equal(fd->n_service, 1);
        assert_string_equal(fd->service[0]->name, cases[i].service);
        google__protobuf__file_descriptor_proto__free_unpacked(fd, NULL);
        resp_free(resp);
    }
}

static void test_file_containing_symbol(void **state)
{
    const struct {
        const char *symbol, *file;
    } cases[] = {
        {"payment.v1.PaymentService", "payment/v1/payment.proto"},
        {"payment.v1.PaymentService.AuthorizePayment", "payment/v1/payment.proto"},
        {"payment.v1.PaymentService.GetAccountBalance", "payment/v1/payment.proto"},
        {"payment.v1.Payment", "payment/v1/payment.proto"},
        {"payment.v1.PaymentStatus", "payment/v1/payment.proto"},
        {"payment.v1.PaymentErrorCode", "payment/v1/payment.proto"},
        {"payment.v1.AuthorizePaymentRequest", "payment/v1/payment.proto"},
        {"payment.v1.AuthorizePaymentRequest.idempotency_key", "payment/v1/payment.proto"},
        /* enum values are siblings of their enum, as in protobuf's DescriptorPool */
        {"payment.v1.PAYMENT_STATUS_DUPLICATE", "payment/v1/payment.proto"},
        {"grpc.health.v1.HealthCheckResponse.ServingStatus", "grpc/health/v1/health.proto"},
        {"grpc.health.v1.HealthCheckResponse.SERVICE_UNKNOWN", "grpc/health/v1/health.proto"},
        {"grpc.health.v1.Health", "grpc/health/v1/health.proto"},
        {"grpc.health.v1.Health.Watch", "grpc/health/v1/health.proto"},
        {"grpc.reflection.v1.ServerReflection", "grpc/reflection/v1/reflection.proto"},
        {"grpc.reflection.v1.ServerReflectionRequest.message_request",
         "grpc/reflection/v1/reflection.proto"},
        {"grpc.reflection.v1alpha.ServerReflection.ServerReflectionInfo",
         "grpc/reflection/v1alpha/reflection.proto"},
        {"grpc.reflection.v1alpha.ErrorResponse", "grpc/reflection/v1alpha/reflection.proto"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        resp_t *resp = ask_str(served, Q_SYMBOL, cases[i].symbol);
        expect_files(resp, &cases[i].file, 1, cases[i].symbol);
        resp_free(resp);
    }
}

static void test_not_found(void **state)
{
    const struct {
        int which;
        const char *arg, *message;
    } cases[] = {
        {Q_SYMBOL, "payment.v1.Nope", "Symbol not found: payment.v1.Nope"},
        {Q_SYMBOL, "PaymentService", "Symbol not found: PaymentService"},
        {Q_SYMBOL, ".payment.v1.Payment", "Symbol not found: .payment.v1.Payment"},
        {Q_SYMBOL, "payment.v1.PaymentService.", "Symbol not found: payment.v1.PaymentService."},
        {Q_SYMBOL, "payment.v1", "Symbol not found: payment.v1"},
        {Q_SYMBOL, "payment.v1.PaymentStatus.PAYMENT_STATUS_DUPLICATE",
         "Symbol not found: payment.v1.PaymentStatus.PAYMENT_STATUS_DUPLICATE"},
        {Q_SYMBOL, "", "Symbol not found."},
        {Q_SYMBOL, "bad\nname", "Symbol not found."},
        {Q_SYMBOL, "caf\xc3\xa9", "Symbol not found."},
        {Q_FILE, "payment/v2/payment.proto", "File not found: payment/v2/payment.proto"},
        {Q_FILE, "payment.proto", "File not found: payment.proto"},
        {Q_FILE, "google/protobuf/descriptor.proto",
         "File not found: google/protobuf/descriptor.proto"},
        {Q_EXTNUM, "payment.v1.Nope", "Type not found: payment.v1.Nope"},
        {Q_EXTNUM, "payment.v1.PaymentStatus", "Type not found: payment.v1.PaymentStatus"},
        {Q_EXTNUM, "payment.v1.PaymentService", "Type not found: payment.v1.PaymentService"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        resp_t *resp = ask_str(served, cases[i].which, cases[i].arg);
        expect_error(resp, 5, cases[i].message);
        resp_free(resp);
    }

    /* an echoed name is at most 256 characters */
    char name[258];
    memset(name, 'a', 257);
    name[257] = '\0';
    resp_t *resp = ask_str(served, Q_SYMBOL, name);
    expect_error(resp, 5, "Symbol not found.");
    resp_free(resp);
    name[256] = '\0';
    resp = ask_str(served, Q_SYMBOL, name);
    char want[300];
    snprintf(want, sizeof(want), "Symbol not found: %s", name);
    expect_error(resp, 5, want);
    resp_free(resp);
}

static void test_extensions_served(void **state)
{
    resp_t *resp = ask_ext(served, "payment.v1.Payment", 100);
    expect_error(resp, 5, "Extension not found: number 100 of payment.v1.Payment");
    resp_free(resp);
    resp = ask_ext(served, "payment.v1.Nope", 100);
    expect_error(resp, 5, "Type not found: payment.v1.Nope");
    resp_free(resp);
    resp = ask_ext(served, "", 1);
    expect_error(resp, 5, "Type not found.");
    resp_free(resp);

    /* a known message has no extensions: an empty list, as grpc C++ answers */
    resp = ask_str(served, Q_EXTNUM, "payment.v1.Payment");
    assert_int_equal(resp->message_response_case, R_EXTNUM);
    assert_string_equal(resp->all_extension_numbers_response->base_type_name, "payment.v1.Payment");
    assert_int_equal(resp->all_extension_numbers_response->n_extension_number, 0);
    resp_free(resp);
}

static void test_no_message_request(void **state)
{
    req_t q = GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
    q.host = HOST;
    resp_t *resp = ask(served, &q);
    expect_error(resp, 3, "ServerReflectionRequest: message_request is not set");
    resp_free(resp);

    /* zero bytes are a valid, empty request */
    uint8_t *out = NULL;
    size_t out_len = 0;
    assert_int_equal(reflection_respond(served, NULL, 0, &out, &out_len), 0);
    resp = grpc__reflection__v1__server_reflection_response__unpack(NULL, out_len, out);
    free(out);
    assert_non_null(resp);
    expect_error(resp, 3, "ServerReflectionRequest: message_request is not set");
    assert_string_equal(resp->valid_host, "");
    resp_free(resp);

    /* an unknown oneof member (field 8) is skipped by the decoder: no request either */
    const uint8_t unknown[] = {0x42, 0x01, 'x'};
    assert_int_equal(reflection_respond(served, unknown, sizeof(unknown), &out, &out_len), 0);
    resp = grpc__reflection__v1__server_reflection_response__unpack(NULL, out_len, out);
    free(out);
    assert_non_null(resp);
    expect_error(resp, 3, "ServerReflectionRequest: message_request is not set");
    resp_free(resp);
}

static void test_malformed_request(void **state)
{
    const struct {
        const char *b;
        size_t n;
    } bad[] = {
        {"\x1a\x05"
         "ab",
         4},                 /* file_by_filename longer than the input */
        {"\xff", 1},         /* unterminated varint */
        {"\x18\x01", 2},     /* file_by_filename (3) sent as a varint */
        {"\x2a\x01\x10", 3}, /* extension request with a truncated varint inside */
        {"\x3a", 1},         /* list_services without its length */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint8_t *out = (uint8_t *)"untouched";
        size_t out_len = 99;
        int rc = reflection_respond(served, (const uint8_t *)bad[i].b, bad[i].n, &out, &out_len);
        if (rc != -EINVAL)
            fail_msg("malformed request %zu: expected -EINVAL, got %d", i, rc);
        assert_null(out);
        assert_int_equal(out_len, 0);
    }
    uint8_t *out;
    size_t out_len;
    assert_int_equal(reflection_respond(served, NULL, 3, &out, &out_len), -EINVAL);
    assert_int_equal(reflection_respond(NULL, (const uint8_t *)"", 0, &out, &out_len), -EINVAL);
}

/* v1alpha messages are wire-identical: a v1alpha client decodes our answers. */
static void test_v1alpha_wire_compatible(void **state)
{
    Grpc__Reflection__V1alpha__ServerReflectionRequest q =
        GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__INIT;
    q.host = "alpha-host";
    q.message_request_case =
        GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL;
    q.file_containing_symbol = "grpc.health.v1.Health";
    size_t n = grpc__reflection__v1alpha__server_reflection_request__get_packed_size(&q);
    uint8_t buf[256];
    assert_true(n <= sizeof(buf));
    grpc__reflection__v1alpha__server_reflection_request__pack(&q, buf);
    uint8_t *out = NULL;
    size_t out_len = 0;
    assert_int_equal(reflection_respond(served, buf, n, &out, &out_len), 0);
    Grpc__Reflection__V1alpha__ServerReflectionResponse *resp =
        grpc__reflection__v1alpha__server_reflection_response__unpack(NULL, out_len, out);
    free(out);
    assert_non_null(resp);
    assert_string_equal(resp->valid_host, "alpha-host");
    assert_string_equal(resp->original_request->file_containing_symbol, "grpc.health.v1.Health");
    assert_int_equal(
        resp->message_response_case,
        GRPC__REFLECTION__V1ALPHA__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE);
    assert_int_equal(resp->file_descriptor_response->n_file_descriptor_proto, 1);
    Google__Protobuf__FileDescriptorProto *fd =
        decode_file(&resp->file_descriptor_response->file_descriptor_proto[0]);
    assert_string_equal(fd->name, "grpc/health/v1/health.proto");
    google__protobuf__file_descriptor_proto__free_unpacked(fd, NULL);
    grpc__reflection__v1alpha__server_reflection_response__free_unpacked(resp, NULL);
}

/* protoc, an independent decoder, reads a served FileDescriptorProto. */
static void test_protoc_decodes_served_file(void **state)
{
    const char *dir = *state;
    need_protoc();
    resp_t *resp = ask_str(served, Q_SYMBOL, "payment.v1.PaymentService.GetPayment");
    const char *const want[] = {"payment/v1/payment.proto"};
    expect_files(resp, want, 1, "payment.v1.PaymentService.GetPayment");
    const ProtobufCBinaryData *b = &resp->file_descriptor_response->file_descriptor_proto[0];
    write_file(dir, "payment.fdp", b->data, b->len);
    resp_free(resp);

    run_ok("protoc --decode=google.protobuf.FileDescriptorProto -I/usr/include "
           "google/protobuf/descriptor.proto < '%s/payment.fdp' > '%s/decoded.txt' 2> '%s/err.txt'",
           dir, dir, dir);
    size_t len;
    char *text = (char *)read_file(dir, "decoded.txt", &len);
    const char *needles[] = {
        "name: \"payment/v1/payment.proto\"",
        "package: \"payment.v1\"",
        "name: \"PaymentService\"",
        "name: \"AuthorizePayment\"",
        "name: \"GetPayment\"",
        "name: \"GetAccountBalance\"",
        "input_type: \".payment.v1.GetAccountBalanceRequest\"",
    };
    for (size_t i = 0; i < sizeof(needles) / sizeof(needles[0]); i++)
        if (!strstr(text, needles[i]))
            fail_msg("protoc's decoding lacks %s:\n%s", needles[i], text);
    free(text);
}

typedef struct worker {
    const uint8_t *req;
    size_t req_len;
    const uint8_t *want;
    size_t want_len;
    int mismatches;
} worker_t;

static void *worker_run(void *arg)
{
    worker_t *w = arg;
    for (int i = 0; i < 300; i++) {
        uint8_t *out = NULL;
        size_t out_len = 0;
        if (reflection_respond(served, w->req, w->req_len, &out, &out_len) != 0 ||
            out_len != w->want_len || memcmp(out, w->want, out_len) != 0)
            w->mismatches++;
        free(out);
    }
    return NULL;
}

/* respond is read-only after create: concurrent callers get the single-threaded answers. */
static void test_concurrent_respond(void **state)
{
    const char *syms[] = {"payment.v1.Payment", "grpc.health.v1.Health.Check",
                          "grpc.reflection.v1.ServerReflection", "payment.v1.Nope"};
    enum { NW = 4 };
    worker_t w[NW];
    uint8_t reqs[NW][128];
    for (int i = 0; i < NW; i++) {
        req_t q = GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
        q.host = HOST;
        q.message_request_case = Q_SYMBOL;
        q.file_containing_symbol = (char *)syms[i];
        w[i] = (worker_t){.req = reqs[i]};
        w[i].req_len = grpc__reflection__v1__server_reflection_request__pack(&q, reqs[i]);
        uint8_t *want = NULL;
        assert_int_equal(reflection_respond(served, w[i].req, w[i].req_len, &want, &w[i].want_len),
                         0);
        w[i].want = want;
    }
    pthread_t t[NW];
    for (int i = 0; i < NW; i++)
        assert_int_equal(pthread_create(&t[i], NULL, worker_run, &w[i]), 0);
    for (int i = 0; i < NW; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        assert_int_equal(w[i].mismatches, 0);
        free((void *)w[i].want);
    }
}

static void test_create_rejects(void **state)
{
    reflection_t *r = (reflection_t *)&r; /* must be reset to NULL on failure */
    const char *not_service[] = {"payment.v1.Payment"};
    assert_int_equal(
        reflection_create(&r, pay_descriptor_set, pay_descriptor_set_len, not_service, 1), -ENOENT);
    assert_null(r);
    const char *unknown[] = {"payment.v1.PaymentService", "payment.v2.PaymentService"};
    assert_int_equal(reflection_create(&r, pay_descriptor_set, pay_descriptor_set_len, unknown, 2),
                     -ENOENT);
    const char *method[] = {"payment.v1.PaymentService.GetPayment"};
    assert_int_equal(reflection_create(&r, pay_descriptor_set, pay_descriptor_set_len, method, 1),
                     -ENOENT);

    /* truncated set: the last file's length runs past the end */
    assert_int_equal(reflection_create(&r, pay_descriptor_set, pay_descriptor_set_len - 1, NULL, 0),
                     -EINVAL);
    /* a file record that is not a FileDescriptorProto */
    const uint8_t garbage[] = {0x0a, 0x02, 0xff, 0xff};
    assert_int_equal(reflection_create(&r, garbage, sizeof(garbage), NULL, 0), -EINVAL);
    /* a file without a name */
    const uint8_t nameless[] = {0x0a, 0x04, 0x12, 0x02, 'p', 'k'};
    assert_int_equal(reflection_create(&r, nameless, sizeof(nameless), NULL, 0), -EINVAL);
    /* the same set twice names every file twice */
    size_t n = pay_descriptor_set_len;
    uint8_t *twice = malloc(2 * n);
    assert_non_null(twice);
    memcpy(twice, pay_descriptor_set, n);
    memcpy(twice + n, pay_descriptor_set, n);
    assert_int_equal(reflection_create(&r, twice, 2 * n, NULL, 0), -EINVAL);
    free(twice);
    assert_int_equal(reflection_create(NULL, pay_descriptor_set, n, NULL, 0), -EINVAL);
    assert_int_equal(reflection_create(&r, NULL, 5, NULL, 0), -EINVAL);
    assert_int_equal(reflection_create(&r, pay_descriptor_set, n, NULL, 1), -EINVAL);
    reflection_destroy(NULL);

    /* an empty set is valid and knows nothing */
    assert_int_equal(reflection_create(&r, NULL, 0, NULL, 0), 0);
    resp_t *resp = ask_str(r, Q_FILE, "payment/v1/payment.proto");
    expect_error(resp, 5, "File not found: payment/v1/payment.proto");
    resp_free(resp);
    resp = ask_str(r, Q_LIST, "");
    assert_int_equal(resp->message_response_case, R_LIST);
    assert_int_equal(resp->list_services_response->n_service, 0);
    resp_free(resp);
    reflection_destroy(r);
}

/* ---- sets built by protoc: imports, a diamond, extensions ---- */

static const char C_PROTO[] = "syntax = \"proto2\";\n"
                              "package t;\n"
                              "message C { optional int32 x = 1; extensions 100 to 199; }\n";
static const char B_PROTO[] = "syntax = \"proto2\";\n"
                              "package t;\n"
                              "import \"c.proto\";\n"
                              "message B { optional C c = 1; }\n"
                              "extend C { optional int32 b_ext = 100; }\n";
static const char D_PROTO[] =
    "syntax = \"proto2\";\n"
    "package t;\n"
    "import \"c.proto\";\n"
    "message D {\n"
    "  extend C { optional int32 d_ext = 120; }\n"
    "  enum Kind { KIND_A = 0; KIND_B = 1; }\n"
    "  message Inner { optional Kind k = 1; oneof pick { int32 n = 2; } }\n"
    "}\n";
static const char A_PROTO[] = "syntax = \"proto2\";\n"
                              "package t;\n"
                              "import \"b.proto\";\n"
                              "import \"d.proto\";\n"
                              "import \"c.proto\";\n"
                              "message A { optional B b = 1; optional D.Inner inner = 2; }\n"
                              "extend C { optional string a_ext = 150; }\n"
                              "service S { rpc M(A) returns (B); }\n";

static void write_test_protos(const char *dir)
{
    need_protoc();
    write_file(dir, "a.proto", A_PROTO, sizeof(A_PROTO) - 1);
    write_file(dir, "b.proto", B_PROTO, sizeof(B_PROTO) - 1);
    write_file(dir, "c.proto", C_PROTO, sizeof(C_PROTO) - 1);
    write_file(dir, "d.proto", D_PROTO, sizeof(D_PROTO) - 1);
}

static void test_dependency_closure(void **state)
{
    const char *dir = *state;
    write_test_protos(dir);
    run_ok("protoc -I'%s' --include_imports --descriptor_set_out='%s/set.pb' '%s/a.proto'", dir,
           dir, dir);
    size_t len;
    uint8_t *set = read_file(dir, "set.pb", &len);
    const char *svc[] = {"t.S"};
    reflection_t *r = NULL;
    assert_int_equal(reflection_create(&r, set, len, svc, 1), 0);
    free(set); /* create copied it */

    const char *const abcd[] = {"a.proto", "b.proto", "c.proto", "d.proto"};
    const char *const bc[] = {"b.proto", "c.proto"};
    const char *const dc[] = {"d.proto", "c.proto"};
    const char *const c[] = {"c.proto"};
    const struct {
        int which;
        const char *arg;
        const char *const *files;
        size_t n;
    } cases[] = {
        /* depth-first preorder: a, b, b's c, then d (a's c is already sent): each once */
        {Q_FILE, "a.proto", abcd, 4},     {Q_FILE, "b.proto", bc, 2},
        {Q_FILE, "d.proto", dc, 2},       {Q_FILE, "c.proto", c, 1},
        {Q_SYMBOL, "t.S", abcd, 4},       {Q_SYMBOL, "t.S.M", abcd, 4},
        {Q_SYMBOL, "t.A.inner", abcd, 4}, {Q_SYMBOL, "t.a_ext", abcd, 4},
        {Q_SYMBOL, "t.B", bc, 2},         {Q_SYMBOL, "t.b_ext", bc, 2},
        {Q_SYMBOL, "t.D", dc, 2},         {Q_SYMBOL, "t.D.Inner", dc, 2},
        {Q_SYMBOL, "t.D.Inner.k", dc, 2}, {Q_SYMBOL, "t.D.Inner.pick", dc, 2},
        {Q_SYMBOL, "t.D.Kind", dc, 2},    {Q_SYMBOL, "t.D.KIND_B", dc, 2},
        {Q_SYMBOL, "t.D.d_ext", dc, 2},   {Q_SYMBOL, "t.C", c, 1},
        {Q_SYMBOL, "t.C.x", c, 1},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        resp_t *resp = ask_str(r, cases[i].which, cases[i].arg);
        expect_files(resp, cases[i].files, cases[i].n, cases[i].arg);
        resp_free(resp);
    }

    resp_t *resp = ask_str(r, Q_LIST, "");
    assert_int_equal(resp->message_response_case, R_LIST);
    assert_int_equal(resp->list_services_response->n_service, 1);
    assert_string_equal(resp->list_services_response->service[0]->name, "t.S");
    resp_free(resp);

    resp = ask_str(r, Q_SYMBOL, "t");
    expect_error(resp, 5, "Symbol not found: t");
    resp_free(resp);
    reflection_destroy(r);
}

static void test_extensions(void **state)
{
    const char *dir = *state;
    write_test_protos(dir);
    run_ok("protoc -I'%s' --include_imports --descriptor_set_out='%s/set.pb' '%s/a.proto'", dir,
           dir, dir);
    size_t len;
    uint8_t *set = read_file(dir, "set.pb", &len);
    reflection_t *r = NULL;
    assert_int_equal(reflection_create(&r, set, len, NULL, 0), 0);
    free(set);

    const char *const abcd[] = {"a.proto", "b.proto", "c.proto", "d.proto"};
    const char *const bc[] = {"b.proto", "c.proto"};
    const char *const dc[] = {"d.proto", "c.proto"};
    resp_t *resp = ask_ext(r, "t.C", 100);
    expect_files(resp, bc, 2, "t.C(100)");
    resp_free(resp);
    resp = ask_ext(r, "t.C", 120);
    expect_files(resp, dc, 2, "t.C(120)");
    resp_free(resp);
    resp = ask_ext(r, "t.C", 150);
    expect_files(resp, abcd, 4, "t.C(150)");
    resp_free(resp);
    resp = ask_ext(r, "t.C", 101);
    expect_error(resp, 5, "Extension not found: number 101 of t.C");
    resp_free(resp);
    resp = ask_ext(r, "t.B", 100);
    expect_error(resp, 5, "Extension not found: number 100 of t.B");
    resp_free(resp);
    resp = ask_ext(r, "t.D.Kind", 100);
    expect_error(resp, 5, "Type not found: t.D.Kind");
    resp_free(resp);

    resp = ask_str(r, Q_EXTNUM, "t.C");
    assert_int_equal(resp->message_response_case, R_EXTNUM);
    const Grpc__Reflection__V1__ExtensionNumberResponse *e = resp->all_extension_numbers_response;
    assert_string_equal(e->base_type_name, "t.C");
    assert_int_equal(e->n_extension_number, 3);
    int seen = 0;
    for (size_t i = 0; i < e->n_extension_number; i++)
        seen |= e->extension_number[i] == 100   ? 1
                : e->extension_number[i] == 120 ? 2
                : e->extension_number[i] == 150 ? 4
                                                : 8;
    assert_int_equal(seen, 7);
    resp_free(resp);

    resp = ask_str(r, Q_EXTNUM, "t.D.Inner");
    assert_int_equal(resp->message_response_case, R_EXTNUM);
    assert_string_equal(resp->all_extension_numbers_response->base_type_name, "t.D.Inner");
    assert_int_equal(resp->all_extension_numbers_response->n_extension_number, 0);
    resp_free(resp);
    reflection_destroy(r);
}

static void test_create_rejects_bad_sets(void **state)
{
    const char *dir = *state;
    write_test_protos(dir);
    reflection_t *r = NULL;
    size_t len;

    /* without --include_imports, a.proto's dependencies are missing */
    run_ok("protoc -I'%s' --descriptor_set_out='%s/alone.pb' '%s/a.proto'", dir, dir, dir);
    uint8_t *set = read_file(dir, "alone.pb", &len);
    assert_int_equal(reflection_create(&r, set, len, NULL, 0), -EINVAL);
    assert_null(r);
    free(set);

    /* two files defining t.C */
    char other[4096];
    snprintf(other, sizeof(other), "%s/o", dir);
    assert_int_equal(mkdir(other, 0700), 0);
    static const char OTHER[] = "syntax = \"proto2\";\npackage t;\nmessage C { }\n";
    write_file(other, "other.proto", OTHER, sizeof(OTHER) - 1);
    run_ok("protoc -I'%s' --descriptor_set_out='%s/c.pb' '%s/c.proto'", dir, dir, dir);
    run_ok("protoc -I'%s' --descriptor_set_out='%s/other.pb' '%s/other.proto'", other, dir, other);
    run_ok("cat '%s/c.pb' '%s/other.pb' > '%s/both.pb'", dir, dir, dir);
    set = read_file(dir, "both.pb", &len);
    assert_int_equal(reflection_create(&r, set, len, NULL, 0), -EINVAL);
    free(set);

    /* each alone is fine */
    set = read_file(dir, "other.pb", &len);
    assert_int_equal(reflection_create(&r, set, len, NULL, 0), 0);
    free(set);
    resp_t *resp = ask_str(r, Q_SYMBOL, "t.C");
    const char *const o[] = {"other.proto"};
    expect_files(resp, o, 1, "t.C");
    resp_free(resp);
    reflection_destroy(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_list_services),
        cmocka_unit_test(test_file_by_filename_payment),
        cmocka_unit_test(test_file_by_filename_grpc_files),
        cmocka_unit_test(test_file_containing_symbol),
        cmocka_unit_test(test_not_found),
        cmocka_unit_test(test_extensions_served),
        cmocka_unit_test(test_no_message_request),
        cmocka_unit_test(test_malformed_request),
        cmocka_unit_test(test_v1alpha_wire_compatible),
        cmocka_unit_test_setup_teardown(test_protoc_decodes_served_file, tmpdir_setup,
                                        tmpdir_teardown),
        cmocka_unit_test(test_concurrent_respond),
        cmocka_unit_test(test_create_rejects),
        cmocka_unit_test_setup_teardown(test_dependency_closure, tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test_setup_teardown(test_extensions, tmpdir_setup, tmpdir_teardown),
        cmocka_unit_test_setup_teardown(test_create_rejects_bad_sets, tmpdir_setup,
                                        tmpdir_teardown),
    };
    return cmocka_run_group_tests(tests, served_setup, served_teardown);
}
