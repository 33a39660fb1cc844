/*
 * grpc_client for the tests: compiles src/io/grpc_client.c into test programs that do not
 * link pay_io (see grpc_client.h here). Programs that do link pay_io get these symbols from
 * this object, and the library's copy is then not pulled in (a static library member is
 * only linked for a symbol still undefined).
 */
#include "../../src/io/grpc_client.c"
