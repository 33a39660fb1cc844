/*
 * grpc_client for the tests: the client lives in src/io/grpc_client.{c,h} (also used by
 * build/payment-cli). This header and tests/e2e/grpc_client.c wrap it for test programs
 * that link only pay_proto and gRPC (not pay_io), hence the relative paths.
 */
#ifndef PAY_TESTS_GRPC_CLIENT_H
#define PAY_TESTS_GRPC_CLIENT_H

#include "../../src/io/grpc_client.h"

#endif
