// The assertion used by the native tests: records a failure and goes on, so
// one run reports every broken check; main() returns non-zero if any failed.
#pragma once

#include <cstdio>

namespace native_test {
inline int failures = 0;
}  // namespace native_test

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++native_test::failures;                                                      \
    }                                                                               \
  } while (0)
