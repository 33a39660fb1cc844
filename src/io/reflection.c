/*
 * reflection: see reflection.h.
 *
 * DESIGN: reflection_create copies the FileDescriptorSet and splits it at field 1 by
 * hand, so each file is served as the exact bytes protoc wrote (no re-serialization).
 * Each file is also decoded once with the protobuf-c code of descriptor.proto to build
 * the index, then the decoded form is dropped:
 *   - files: name, bytes, dependencies resolved to file indices (a missing one is an
 *     error: the closure could not be served);
 *   - symbols: full names sorted for bsearch, with the protobuf C++ DescriptorPool's
 *     scoping (messages and enums at any depth, fields, oneofs, enum values as siblings
 *     of their enum, services, methods, extensions);
 *   - extensions: (extendee, number, file).
 * Nothing changes after create, so concurrent reflection_respond calls need no lock: each
 * allocates its own scratch (the dependency walk's stack and seen-set) and its response.
 * Responses mirror grpc C++'s ProtoServerReflection: valid_host = the request's host,
 * original_request = the request, dependencies in depth-first preorder, each file once.
 */
#include "io/reflection.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "google/protobuf/descriptor.pb-c.h"
#include "grpc/reflection/v1/reflection.pb-c.h"

/* gRPC status codes used in error_response. */
#define STATUS_INVALID_ARGUMENT 3
#define STATUS_NOT_FOUND        5

/* A requested name is repeated in an error message only if printable ASCII this short. */
#define ECHO_MAX 256

typedef enum sym_kind {
    SYM_MESSAGE,
    SYM_ENUM,
    SYM_SERVICE,
    SYM_OTHER, /* field, oneof, enum value, method, extension */
} sym_kind_t;

typedef struct sym {
    char *name; /* fully qualified, no leading dot */
    size_t file;
    sym_kind_t kind;
} sym_t;

typedef struct ext {
    char *extendee; /* fully qualified message name, no leading dot */
    int32_t number;
    size_t file;
} ext_t;

typedef struct rfile {
    char *name;
    const uint8_t *data; /* points into reflection.set */
    size_t len;
    size_t *deps; /* indices into reflection.files */
    size_t ndeps;
} rfile_t;

struct reflection {
    uint8_t *set; /* owned copy of the FileDescriptorSet */
    rfile_t *files;
    size_t nfiles;
    sym_t *syms; /* sorted by name */
    size_t nsyms, symcap;
    ext_t *exts;
    size_t nexts, extcap;
    size_t walk_max; /* bound of the dependency walk's stack: 1 + all deps */
    char **svc_names;
    Grpc__Reflection__V1__ServiceResponse *svc;   /* prebuilt list_services entries */
    Grpc__Reflection__V1__ServiceResponse **svcp; /* pointers to them, for the response */
    size_t nsvc;
};

/* ---- building the index ---- */

static int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*pp == end)
            return -EINVAL;
        uint8_t b = *(*pp)++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = x;
            return 0;
        }
    }
    return -EINVAL;
}

/* Records each field-1 (file) record of the FileDescriptorSet in r->files; skips unknown
 * fields. */
static int split_set(reflection_t *r, size_t set_len)
{
    const uint8_t *p = r->set, *end = r->set + set_len;
    size_t cap = 0;
    while (p < end) {
        uint64_t key, v;
        if (read_varint(&p, end, &key) < 0 || key >> 3 == 0)
            return -EINVAL;
        switch (key & 7) {
        case 0:
            if (read_varint(&p, end, &v) < 0)
                return -EINVAL;
            break;
        case 1:
        case 5: {
            size_t skip = (key & 7) == 1 ? 8 : 4;
            if ((size_t)(end - p) < skip)
                return -EINVAL;
            p += skip;
            break;
        }
        case 2:
            if (read_varint(&p, end, &v) < 0 || v > (uint64_t)(end - p))
                return -EINVAL;
            if (key >> 3 == 1) {
                if (r->nfiles == cap) {
                    size_t ncap = cap ? cap * 2 : 8;
                    rfile_t *nf = realloc(r->files, ncap * sizeof(*nf));
                    if (!nf)
                        return -ENOMEM;
                    r->files = nf;
                    cap = ncap;
                }
                r->files[r->nfiles++] = (rfile_t){.data = p, .len = (size_t)v};
            }
            p += v;
            break;
        default:
            return -EINVAL;
        }
    }
    return 0;
}

static char *join(const char *scope, const char *name)
{
    size_t a = strlen(scope), b = strlen(name);
    char *s = malloc(a + b + 2);
    if (!s)
        return NULL;
    if (a) {
        memcpy(s, scope, a);
        s[a++] = '.';
    }
    memcpy(s + a, name, b + 1);
    return s;
}

/* Adds scope.name; *full (optional) gets the stored full name, owned by r. */
static int sym_add(reflection_t *r, const char *scope, const char *name, size_t file,
                   sym_kind_t kind, const char **full)
{
    if (!name || !*name)
        return -EINVAL;
    if (r->nsyms == r->symcap) {
        size_t ncap = r->symcap ? r->symcap * 2 : 64;
        sym_t *ns = realloc(r->syms, ncap * sizeof(*ns));
        if (!ns)
            return -ENOMEM;
        r->syms = ns;
        r->symcap = ncap;
    }
    char *s = join(scope, name);
    if (!s)
        return -ENOMEM;
    r->syms[r->nsyms++] = (sym_t){.name = s, .file = file, .kind = kind};
    if (full)
        *full = s;
    return 0;
}

static int ext_add(reflection_t *r, const char *scope,
                   const Google__Protobuf__FieldDescriptorProto *f, size_t file)
{
    int rc = sym_add(r, scope, f->name, file, SYM_OTHER, NULL);
    if (rc < 0)
        return rc;
    if (!f->extendee || !f->has_number)
        return -EINVAL;
    if (r->nexts == r->extcap) {
        size_t ncap = r->extcap ? r->extcap * 2 : 16;
        ext_t *ne = realloc(r->exts, ncap * sizeof(*ne));
        if (!ne)
            return -ENOMEM;
        r->exts = ne;
        r->extcap = ncap;
    }
    const char *t = f->extendee[0] == '.' ? f->extendee + 1 : f->extendee;
    char *s = strdup(t);
    if (!s)
        return -ENOMEM;
    r->exts[r->nexts++] = (ext_t){.extendee = s, .number = f->number, .file = file};
    return 0;
}

/* Enum values are siblings of their enum (C++ scoping): pkg.VALUE, pkg.Msg.VALUE. */
static int index_enum(reflection_t *r, const char *scope,
                      const Google__Protobuf__EnumDescriptorProto *e, size_t file)
{
    int rc = sym_add(r, scope, e->name, file, SYM_ENUM, NULL);
    for (size_t i = 0; rc == 0 && i < e->n_value; i++)
        rc = sym_add(r, scope, e->value[i]->name, file, SYM_OTHER, NULL);
    return rc;
}

static int index_message(reflection_t *r, const char *scope,
                         const Google__Protobuf__DescriptorProto *m, size_t file)
{
    const char *full;
    int rc = sym_add(r, scope, m->name, file, SYM_MESSAGE, &full);
    for (size_t i = 0; rc == 0 && i < m->n_field; i++)
        rc = sym_add(r, full, m->field[i]->name, file, SYM_OTHER, NULL);
    for (size_t i = 0; rc == 0 && i < m->n_oneof_decl; i++)
        rc = sym_add(r, full, m->oneof_decl[i]->name, file, SYM_OTHER, NULL);
    for (size_t i = 0; rc == 0 && i < m->n_extension; i++)
        rc = ext_add(r, full, m->extension[i], file);
    for (size_t i = 0; rc == 0 && i < m->n_enum_type; i++)
        rc = index_enum(r, full, m->enum_type[i], file);
    for (size_t i = 0; rc == 0 && i < m->n_nested_type; i++)
        rc = index_message(r, full, m->nested_type[i], file);
    return rc;
}

static int index_file(reflection_t *r, size_t fi, const Google__Protobuf__FileDescriptorProto *fd)
{
    const char *pkg = fd->package ? fd->package : "";
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < fd->n_message_type; i++)
        rc = index_message(r, pkg, fd->message_type[i], fi);
    for (size_t i = 0; rc == 0 && i < fd->n_enum_type; i++)
        rc = index_enum(r, pkg, fd->enum_type[i], fi);
    for (size_t i = 0; rc == 0 && i < fd->n_extension; i++)
        rc = ext_add(r, pkg, fd->extension[i], fi);
    for (size_t i = 0; rc == 0 && i < fd->n_service; i++) {
        const Google__Protobuf__ServiceDescriptorProto *s = fd->service[i];
        const char *full;
        rc = sym_add(r, pkg, s->name, fi, SYM_SERVICE, &full);
        for (size_t k = 0; rc == 0 && k < s->n_method; k++)
            rc = sym_add(r, full, s->method[k]->name, fi, SYM_OTHER, NULL);
    }
    return rc;
}

static int file_find(const reflection_t *r, const char *name, size_t *out)
{
    /* Linear: a served set has a handful of files and lookups are rare. */
    for (size_t i = 0; i < r->nfiles; i++) {
        if (strcmp(r->files[i].name, name) == 0) {
            *out = i;
            return 0;
        }
    }
    return -ENOENT;
}

/* Parses one file's bytes: its name, its symbols, and its dependency names into deps. */
static int load_file(reflection_t *r, size_t fi, char ***dep_names)
{
    rfile_t *f = &r->files[fi];
    Google__Protobuf__FileDescriptorProto *fd =
        google__protobuf__file_descriptor_proto__unpack(NULL, f->len, f->data);
    if (!fd)
        return -EINVAL;
    int rc = -EINVAL;
    if (!fd->name || !*fd->name)
        goto done;
    rc = -ENOMEM;
    if (!(f->name = strdup(fd->name)))
        goto done;
    f->ndeps = fd->n_dependency;
    if (f->ndeps) {
        f->deps = calloc(f->ndeps, sizeof(*f->deps));
        *dep_names = calloc(f->ndeps, sizeof(**dep_names));
        if (!f->deps || !*dep_names)
            goto done;
        for (size_t i = 0; i < f->ndeps; i++)
            if (!((*dep_names)[i] = strdup(fd->dependency[i])))
                goto done;
    }
    rc = index_file(r, fi, fd);
done:
    google__protobuf__file_descriptor_proto__free_unpacked(fd, NULL);
    return rc;
}

static int sym_cmp(const void *a, const void *b)
{
    return strcmp(((const sym_t *)a)->name, ((const sym_t *)b)->name);
}

static const sym_t *sym_find(const reflection_t *r, const char *name)
{
    if (!r->nsyms)
        return NULL; /* bsearch's base must not be NULL */
    sym_t key = {.name = (char *)name};
    return bsearch(&key, r->syms, r->nsyms, sizeof(sym_t), sym_cmp);
}

static int build_index(reflection_t *r, size_t set_len)
{
    int rc = split_set(r, set_len);
    if (rc < 0)
        return rc;
    char ***dep_names = calloc(r->nfiles ? r->nfiles : 1, sizeof(*dep_names));
    if (!dep_names)
        return -ENOMEM;
    for (size_t i = 0; rc == 0 && i < r->nfiles; i++)
        rc = load_file(r, i, &dep_names[i]);

    /* file names unique; dependencies resolved */
    r->walk_max = 1;
    for (size_t i = 0; rc == 0 && i < r->nfiles; i++) {
        size_t j;
        if (file_find(r, r->files[i].name, &j) == 0 && j != i)
            rc = -EINVAL;
        for (size_t d = 0; rc == 0 && d < r->files[i].ndeps; d++)
            if (file_find(r, dep_names[i][d], &r->files[i].deps[d]) < 0)
                rc = -EINVAL;
        r->walk_max += r->files[i].ndeps;
    }
    for (size_t i = 0; i < r->nfiles; i++) {
        if (dep_names[i])
            for (size_t d = 0; d < r->files[i].ndeps; d++)
                free(dep_names[i][d]);
        free(dep_names[i]);
    }
    free(dep_names);
    if (rc < 0)
        return rc;

    if (r->nsyms)
        qsort(r->syms, r->nsyms, sizeof(sym_t), sym_cmp);
    for (size_t i = 1; i < r->nsyms; i++)
        if (strcmp(r->syms[i - 1].name, r->syms[i].name) == 0)
            return -EINVAL;
    return 0;
}

static int build_services(reflection_t *r, const char *const *services, size_t n)
{
    if (n && !services)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        const sym_t *s = services[i] ? sym_find(r, services[i]) : NULL;
        if (!s || s->kind != SYM_SERVICE)
            return -ENOENT;
    }
    size_t cap = n ? n : 1;
    r->svc_names = calloc(cap, sizeof(*r->svc_names));
    r->svc = calloc(cap, sizeof(*r->svc));
    r->svcp = calloc(cap, sizeof(*r->svcp));
    if (!r->svc_names || !r->svc || !r->svcp)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        if (!(r->svc_names[i] = strdup(services[i])))
            return -ENOMEM;
        r->nsvc = i + 1;
        grpc__reflection__v1__service_response__init(&r->svc[i]);
        r->svc[i].name = r->svc_names[i];
        r->svcp[i] = &r->svc[i];
    }
    return 0;
}

int reflection_create(reflection_t **out, const unsigned char *set, size_t set_len,
                      const char *const *services, size_t nservices)
{
    if (!out || (!set && set_len))
        return -EINVAL;
    *out = NULL;
    reflection_t *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    int rc = -ENOMEM;
    if (!(r->set = malloc(set_len ? set_len : 1)))
        goto fail;
    if (set_len)
        memcpy(r->set, set, set_len);
    if ((rc = build_index(r, set_len)) < 0)
        goto fail;
    if ((rc = build_services(r, services, nservices)) < 0)
        goto fail;
    *out = r;
    return 0;
fail:
    reflection_destroy(r);
    return rc;
}

void reflection_destroy(reflection_t *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->nfiles; i++) {
        free(r->files[i].name);
        free(r->files[i].deps);
    }
    free(r->files);
    for (size_t i = 0; i < r->nsyms; i++)
        free(r->syms[i].name);
    free(r->syms);
    for (size_t i = 0; i < r->nexts; i++)
        free(r->exts[i].extendee);
    free(r->exts);
    for (size_t i = 0; i < r->nsvc; i++)
        free(r->svc_names[i]);
    free(r->svc_names);
    free(r->svc);
    free(r->svcp);
    free(r->set);
    free(r);
}

/* ---- answering ---- */

typedef struct answer {
    Grpc__Reflection__V1__ServerReflectionResponse resp;
    Grpc__Reflection__V1__FileDescriptorResponse files;
    Grpc__Reflection__V1__ExtensionNumberResponse exts;
    Grpc__Reflection__V1__ListServiceResponse list;
    Grpc__Reflection__V1__ErrorResponse err;
    char errmsg[ECHO_MAX + 64];
    void *scratch; /* the file walk's allocations, freed after packing */
    int32_t *numbers;
} answer_t;

static bool echo_ok(const char *name)
{
    if (!name || !*name || strlen(name) > ECHO_MAX)
        return false;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        if (*p < 0x20 || *p > 0x7e)
            return false;
    return true;
}

static void answer_error(answer_t *a, int32_t code)
{
    a->err.error_code = code;
    a->err.error_message = a->errmsg;
    a->resp.message_response_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
    a->resp.error_response = &a->err;
}

/* NOT_FOUND naming what was asked for when it is printable ASCII and short. */
static void answer_not_found(answer_t *a, const char *what, const char *name)
{
    if (echo_ok(name))
        snprintf(a->errmsg, sizeof(a->errmsg), "%s not found: %s", what, name);
    else
        snprintf(a->errmsg, sizeof(a->errmsg), "%s not found.", what);
    answer_error(a, STATUS_NOT_FOUND);
}

/* file_descriptor_response: file fi, then its dependencies depth-first, each once. */
static int answer_files(const reflection_t *r, answer_t *a, size_t fi)
{
    size_t need =
        r->walk_max * sizeof(size_t) + r->nfiles * sizeof(ProtobufCBinaryData) + r->nfiles;
    uint8_t *mem = malloc(need);
    if (!mem)
        return -ENOMEM;
    a->scratch = mem;
    size_t *stack = (size_t *)mem;
    ProtobufCBinaryData *out = (ProtobufCBinaryData *)(stack + r->walk_max);
    bool *seen = (bool *)(out + r->nfiles);
    memset(seen, 0, r->nfiles);

    /* Marking at pop and pushing dependencies in reverse gives the same preorder as
     * grpc C++'s recursive FillFileDescriptorResponse. Each file is pushed at most once
     * as a root or once per edge into it, so walk_max bounds the stack. */
    size_t top = 0, n = 0;
    stack[top++] = fi;
    while (top) {
        size_t f = stack[--top];
        if (seen[f])
            continue;
        seen[f] = true;
        out[n++] =
            (ProtobufCBinaryData){.len = r->files[f].len, .data = (uint8_t *)r->files[f].data};
        for (size_t d = r->files[f].ndeps; d-- > 0;)
            stack[top++] = r->files[f].deps[d];
    }
    a->files.n_file_descriptor_proto = n;
    a->files.file_descriptor_proto = out;
    a->resp.message_response_case =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
    a->resp.file_descriptor_response = &a->files;
    return 0;
}

static const sym_t *message_find(const reflection_t *r, const char *name)
{
    const sym_t *s = sym_find(r, name);
    return s && s->kind == SYM_MESSAGE ? s : NULL;
}

static int answer_request(const reflection_t *r, answer_t *a,
                          const Grpc__Reflection__V1__ServerReflectionRequest *q)
{
    size_t fi;
    const sym_t *s;
    switch (q->message_request_case) {
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
        if (file_find(r, q->file_by_filename, &fi) < 0) {
            answer_not_found(a, "File", q->file_by_filename);
            return 0;
        }
        return answer_files(r, a, fi);

    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL:
        if (!(s = sym_find(r, q->file_containing_symbol))) {
            answer_not_found(a, "Symbol", q->file_containing_symbol);
            return 0;
        }
        return answer_files(r, a, s->file);

    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION: {
        const Grpc__Reflection__V1__ExtensionRequest *e = q->file_containing_extension;
        const char *type = e && e->containing_type ? e->containing_type : "";
        if (!message_find(r, type)) {
            answer_not_found(a, "Type", type);
            return 0;
        }
        for (size_t i = 0; i < r->nexts; i++)
            if (r->exts[i].number == e->extension_number && strcmp(r->exts[i].extendee, type) == 0)
                return answer_files(r, a, r->exts[i].file);
        if (echo_ok(type))
            snprintf(a->errmsg, sizeof(a->errmsg), "Extension not found: number %d of %s",
                     (int)e->extension_number, type);
        else
            snprintf(a->errmsg, sizeof(a->errmsg), "Extension not found: number %d",
                     (int)e->extension_number);
        answer_error(a, STATUS_NOT_FOUND);
        return 0;
    }

    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE: {
        /* As grpc C++: NOT_FOUND for a name that is not a message, else its extensions
         * (possibly none) with the type's full name. */
        if (!(s = message_find(r, q->all_extension_numbers_of_type))) {
            answer_not_found(a, "Type", q->all_extension_numbers_of_type);
            return 0;
        }
        size_t n = 0;
        for (size_t i = 0; i < r->nexts; i++)
            n += strcmp(r->exts[i].extendee, s->name) == 0;
        if (n) {
            if (!(a->numbers = malloc(n * sizeof(int32_t))))
                return -ENOMEM;
            n = 0;
            for (size_t i = 0; i < r->nexts; i++)
                if (strcmp(r->exts[i].extendee, s->name) == 0)
                    a->numbers[n++] = r->exts[i].number;
        }
        a->exts.base_type_name = s->name;
        a->exts.n_extension_number = n;
        a->exts.extension_number = a->numbers;
        a->resp.message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
        a->resp.all_extension_numbers_response = &a->exts;
        return 0;
    }

    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES:
        a->list.n_service = r->nsvc;
        a->list.service = r->svcp;
        a->resp.message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        a->resp.list_services_response = &a->list;
        return 0;

    default:
        snprintf(a->errmsg, sizeof(a->errmsg),
                 "ServerReflectionRequest: message_request is not set");
        answer_error(a, STATUS_INVALID_ARGUMENT);
        return 0;
    }
}

int reflection_respond(reflection_t *r, const uint8_t *req, size_t req_len, uint8_t **resp,
                       size_t *resp_len)
{
    static const uint8_t empty[1];
    if (!r || !resp || !resp_len || (!req && req_len))
        return -EINVAL;
    *resp = NULL;
    *resp_len = 0;
    Grpc__Reflection__V1__ServerReflectionRequest *q =
        grpc__reflection__v1__server_reflection_request__unpack(NULL, req_len, req ? req : empty);
    if (!q)
        return -EINVAL;

    answer_t a = {
        .resp = GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__INIT,
        .files = GRPC__REFLECTION__V1__FILE_DESCRIPTOR_RESPONSE__INIT,
        .exts = GRPC__REFLECTION__V1__EXTENSION_NUMBER_RESPONSE__INIT,
        .list = GRPC__REFLECTION__V1__LIST_SERVICE_RESPONSE__INIT,
        .err = GRPC__REFLECTION__V1__ERROR_RESPONSE__INIT,
    };
    a.resp.valid_host = q->host;
    a.resp.original_request = q;
    int rc = answer_request(r, &a, q);
    if (rc < 0)
        goto done;

    size_t n = protobuf_c_message_get_packed_size(&a.resp.base);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        rc = -ENOMEM;
        goto done;
    }
    *resp_len = protobuf_c_message_pack(&a.resp.base, buf);
    *resp = buf;
    rc = 0;
done:
    free(a.scratch);
    free(a.numbers);
    grpc__reflection__v1__server_reflection_request__free_unpacked(q, NULL);
    return rc;
}
