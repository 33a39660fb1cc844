/*
 * Server reflection against a real paymentd, grpc.reflection.v1alpha and v1 (DESIGN.md
 * §2/§3): list_services names exactly the four served services; file_containing_symbol
 * and file_by_filename return FileDescriptorProtos that protoc itself decodes, naming
 * the three payment methods; an unknown symbol is an error_response NOT_FOUND; several
 * requests share one stream; the stream ends OK after the client half-closes.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "e2e/grpc_client.h"
#include "e2e/paymentd_proc.h"
#include "grpc/reflection/v1/reflection.pb-c.h"

#define V1ALPHA "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
#define V1      "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

typedef Grpc__Reflection__V1__ServerReflectionRequest req_t;
typedef Grpc__Reflection__V1__ServerReflectionResponse resp_t;

typedef struct fixture {
    pd_proc_t pd;
    gc_t *gc;
    bool passed;
    char tmp[128];
} fixture_t;

static int setup_group(void **state)
{
    fixture_t *f = calloc(1, sizeof(*f));
    *state = f;
    snprintf(f->tmp, sizeof(f->tmp), "/tmp/pay-e2e-refl-XXXXXX");
    if (!mkdtemp(f->tmp))
        return -1;
    if (pd_start(&f->pd, NULL) < 0)
        return -1;
    return gc_connect(&f->gc, f->pd.target);
}

static int teardown_group(void **state)
{
    fixture_t *f = *state;
    if (!f->passed)
        pd_dump_log(&f->pd);
    gc_close(f->gc);
    pd_cleanup(&f->pd);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", f->tmp);
    if (f->tmp[0] && system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", f->tmp);
    free(f);
    return 0;
}

/* Sends one request on the stream and returns the decoded response. */
static resp_t *ask(gc_stream_t *s, req_t *req)
{
    assert_int_equal(gc_stream_send_msg(s, &req->base), 0);
    uint8_t *data = NULL;
    size_t len = 0;
    assert_int_equal(gc_stream_recv(s, 10000, &data, &len), 1);
    resp_t *r = grpc__reflection__v1__server_reflection_response__unpack(NULL, len, data);
    free(data);
    assert_non_null(r);
    return r;
}

/* Decodes a FileDescriptorProto with protoc and returns its text format (malloc'd). */
static char *protoc_decode(fixture_t *f, const ProtobufCBinaryData *fd, int n)
{
    if (system("command -v protoc >/dev/null 2>&1") != 0)
        fail_msg("protoc is not installed (Debian package protobuf-compiler): cannot decode "
                 "the served descriptors independently");
    char in[200], out[200], cmd[700];
    snprintf(in, sizeof(in), "%s/fd%d.bin", f->tmp, n);
    snprintf(out, sizeof(out), "%s/fd%d.txt", f->tmp, n);
    FILE *w = fopen(in, "wb");
    assert_non_null(w);
    assert_int_equal(fwrite(fd->data, 1, fd->len, w), fd->len);
    fclose(w);
    snprintf(cmd, sizeof(cmd),
             "protoc --decode=google.protobuf.FileDescriptorProto -I/usr/include "
             "google/protobuf/descriptor.proto < '%s' > '%s' 2>&1",
             in, out);
    int rc = system(cmd);
    FILE *r = fopen(out, "r");
    assert_non_null(r);
    char *text = calloc(1, 1 << 20);
    size_t got = fread(text, 1, (1 << 20) - 1, r);
    text[got] = '\0';
    fclose(r);
    if (rc != 0)
        fail_msg("protoc could not decode served descriptor %d: %s", n, text);
    return text;
}

/* The "name" of a FileDescriptorProto in protoc's text output (first line). */
static void file_name_of(const char *text, char *name, size_t len)
{
    const char *p = strstr(text, "name: \"");
    assert_non_null(p);
    p += 7;
    const char *e = strchr(p, '"');
    assert_non_null(e);
    snprintf(name, len, "%.*s", (int)(e - p), p);
}

static void check_payment_files(fixture_t *f, resp_t *r)
{
    assert_int_equal(
        r->message_response_case,
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE);
    Grpc__Reflection__V1__FileDescriptorResponse *fdr = r->file_descriptor_response;
    /* payment.proto imports nothing: exactly that one file. */
    assert_int_equal(fdr->n_file_descriptor_proto, 1);
    char *text = protoc_decode(f, &fdr->file_descriptor_proto[0], 0);
    char name[200];
    file_name_of(text, name, sizeof(name));
    assert_string_equal(name, "payment/v1/payment.proto");
    assert_non_null(strstr(text, "package: \"payment.v1\""));
    assert_non_null(strstr(text, "name: \"PaymentService\""));
    const char *methods[] = {"AuthorizePayment", "GetPayment", "GetAccountBalance"};
    for (size_t i = 0; i < 3; i++) {
        char want[200];
        snprintf(want, sizeof(want), "name: \"%s\"\n    input_type: \".payment.v1.%sRequest\"",
                 methods[i], methods[i]);
        if (!strstr(text, want))
            fail_msg("method %s missing from the descriptor:\n%s", methods[i], text);
    }
    free(text);
}

static void run_reflection(fixture_t *f, const char *path)
{
    gc_stream_t *s;
    assert_int_equal(gc_stream_open(f->gc, path, 30000, &s), 0);

    /* list_services */
    req_t req = GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
    req.message_request_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES;
    req.list_services = "";
    resp_t *r = ask(s, &req);
    assert_int_equal(
        r->message_response_case,
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE);
    static const char *const want[] = {
        "payment.v1.PaymentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    };
    assert_int_equal(r->list_services_response->n_service, 4);
    for (size_t i = 0; i < 4; i++)
        assert_string_equal(r->list_services_response->service[i]->name, want[i]);
    grpc__reflection__v1__server_reflection_response__free_unpacked(r, NULL);

    /* file_containing_symbol */
    req = (req_t)GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
    req.message_request_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL;
    req.file_containing_symbol = "payment.v1.PaymentService";
    r = ask(s, &req);
    check_payment_files(f, r);
    grpc__reflection__v1__server_reflection_response__free_unpacked(r, NULL);

    /* file_by_filename */
    req = (req_t)GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
    req.message_request_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME;
    req.file_by_filename = "payment/v1/payment.proto";
    r = ask(s, &req);
    check_payment_files(f, r);
    grpc__reflection__v1__server_reflection_response__free_unpacked(r, NULL);

    /* the health service's file, found by a method symbol */
    req = (req_t)GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
    req.message_request_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL;
    req.file_containing_symbol = "grpc.health.v1.Health.Watch";
    r = ask(s, &req);
    assert_int_equal(
        r->message_response_case,
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE);
    assert_true(r->file_descriptor_response->n_file_descriptor_proto >= 1);
    char *text = protoc_decode(f, &r->file_descriptor_response->file_descriptor_proto[0], 1);
    char name[200];
    file_name_of(text, name, sizeof(name));
    assert_string_equal(name, "grpc/health/v1/health.proto");
    free(text);
    grpc__reflection__v1__server_reflection_response__free_unpacked(r, NULL);

    /* unknown symbol */
    req = (req_t)GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__INIT;
    req.message_request_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL;
    req.file_containing_symbol = "no.such.Symbol";
    r = ask(s, &req);
    assert_int_equal(
        r->message_response_case,
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE);
    assert_int_equal(r->error_response->error_code, 5);
    grpc__reflection__v1__server_reflection_response__free_unpacked(r, NULL);

    /* half-close: the server finishes with OK after the last answer */
    assert_int_equal(gc_stream_half_close(s), 0);
    uint8_t *data;
    size_t len;
    assert_int_equal(gc_stream_recv(s, 10000, &data, &len), 0);
    grpc_status_code code;
    char details[256];
    assert_int_equal(gc_stream_status(s, 10000, &code, details, sizeof(details)), 0);
    assert_int_equal(code, GRPC_STATUS_OK);
    gc_stream_free(s);
}

static void test_v1alpha(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    run_reflection(f, V1ALPHA);
    f->passed = true;
}

static void test_v1(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    run_reflection(f, V1);
    f->passed = true;
}

static void test_malformed_request(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    gc_stream_t *s;
    assert_int_equal(gc_stream_open(f->gc, V1, 10000, &s), 0);
    static const uint8_t junk[] = {0xff, 0xff, 0xff};
    assert_int_equal(gc_stream_send(s, junk, sizeof(junk)), 0);
    uint8_t *data;
    size_t len;
    assert_int_equal(gc_stream_recv(s, 10000, &data, &len), 0);
    grpc_status_code code;
    char details[256];
    assert_int_equal(gc_stream_status(s, 10000, &code, details, sizeof(details)), 0);
    assert_int_equal(code, GRPC_STATUS_INVALID_ARGUMENT);
    assert_string_equal(details, "request: malformed message");
    gc_stream_free(s);
    f->passed = true;
}

static void test_shutdown_clean(void **state)
{
    fixture_t *f = *state;
    f->passed = false;
    assert_int_equal(pd_signal(&f->pd, SIGTERM), 0);
    int status;
    assert_int_equal(pd_wait(&f->pd, 30000, &status), 0);
    char why[64];
    assert_string_equal(pd_status_str(status, why, sizeof(why)), "exit 0");
    f->passed = true;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_v1alpha),
        cmocka_unit_test(test_v1),
        cmocka_unit_test(test_malformed_request),
        cmocka_unit_test(test_shutdown_clean),
    };
    return cmocka_run_group_tests_name("e2e_reflection", tests, setup_group, teardown_group);
}
