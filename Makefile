# The front door. `make run` and `make test` install what they need (scripts/bootstrap.sh),
# build, and then run the service with its local stack, or every test suite.
SHELL := /bin/bash
JOBS  ?= $(shell nproc)
BUILD ?= build

.PHONY: all bootstrap build run test test-main test-tsan test-asan clean

all: build

bootstrap:
	@scripts/bootstrap.sh

build: bootstrap
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	@cmake --build $(BUILD) -j$(JOBS)

run: build
	@scripts/run.sh

# Every suite: the normal build (unit, runtime, integration, e2e, chaos), the runtime's
# tests under ThreadSanitizer, and the unit and e2e tests under ASan+UBSan, each in its
# own build tree. Runs all three and fails if any failed.
test: bootstrap
	@scripts/test.sh

clean:
	rm -rf build build-tsan build-asan
