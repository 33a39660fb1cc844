/*
 * reflection: the logic of gRPC server reflection (grpc.reflection.v1 and v1alpha,
 * which are wire-identical), without the transport. The gRPC server feeds each
 * ServerReflectionRequest read from a stream to reflection_respond and writes back the
 * ServerReflectionResponse it produces.
 *
 * It serves the files of one serialized google.protobuf.FileDescriptorSet (the build
 * embeds one: pay_descriptor_set, from `protoc --include_imports`), answering
 * list_services, file_by_filename, file_containing_symbol, file_containing_extension and
 * all_extension_numbers_of_type the way gRPC's C++ server does: a file comes with its
 * transitive dependencies, the requested one first, each once, as the FileDescriptorProto
 * bytes of the set unchanged. Lookup failures are an error_response with NOT_FOUND (5),
 * a request without message_request one with INVALID_ARGUMENT (3).
 *
 * Threads: reflection_create builds an index that nothing modifies afterwards, so any
 * number of threads may call reflection_respond on one reflection_t concurrently.
 * reflection_destroy must not race with them.
 */
#ifndef PAY_IO_REFLECTION_H
#define PAY_IO_REFLECTION_H

#include <stddef.h>
#include <stdint.h>

typedef struct reflection reflection_t;

/** The embedded FileDescriptorSet of every served proto and its imports (generated). */
extern const unsigned char pay_descriptor_set[];
extern const size_t pay_descriptor_set_len;

/** Indexes set (copied) and the service names list_services reports, in that order.
 *  -EINVAL if set is malformed, names a file twice, defines a symbol twice or lacks a
 *  dependency; -ENOENT if a listed service is not a service of set; -ENOMEM. */
int reflection_create(reflection_t **out, const unsigned char *set, size_t set_len,
                      const char *const *services, size_t nservices);

/** Answers one serialized ServerReflectionRequest with a malloc'd serialized
 *  ServerReflectionResponse (caller frees). -EINVAL if req does not parse; -ENOMEM. */
int reflection_respond(reflection_t *r, const uint8_t *req, size_t req_len, uint8_t **resp,
                       size_t *resp_len);

/** Frees r and everything it owns; NULL is fine. */
void reflection_destroy(reflection_t *r);

#endif
