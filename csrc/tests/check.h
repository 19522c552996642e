// A minimal test harness for the standalone kernel tests (no gtest on the build machines):
// CHECK/CHECK_CLOSE record failures with file and line, `expect_throw` checks that a call
// throws std::invalid_argument mentioning a given argument name, and `finish` sets the exit
// code ctest reads.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>

namespace check {

inline int& failures() {
  static int count = 0;
  return count;
}

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
}

// |got - want| <= atol + rtol * |want|, with NaN == NaN and equal infinities accepted.
inline bool close(double got, double want, double rtol, double atol) {
  if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got);
  if (std::isinf(want) || std::isinf(got)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

inline std::string fmt(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", x);
  return buf;
}

inline void expect_throw(const char* file, int line, const std::function<void()>& fn,
                         const std::string& arg) {
  try {
    fn();
  } catch (const std::invalid_argument& e) {
    if (std::string(e.what()).find(arg) != 0) {
      fail(file, line, "message '" + std::string(e.what()) + "' does not start with " + arg);
    }
    return;
  }
  fail(file, line, "expected std::invalid_argument naming " + arg);
}

inline int finish(const char* name) {
  if (failures() == 0) {
    std::printf("%s: all checks passed\n", name);
    return 0;
  }
  std::printf("%s: %d check(s) failed\n", name, failures());
  return 1;
}

}  // namespace check

#define CHECK(cond)                                             \
  do {                                                          \
    if (!(cond)) check::fail(__FILE__, __LINE__, #cond);        \
  } while (0)

#define CHECK_CLOSE(got, want, rtol, atol)                                                 \
  do {                                                                                     \
    const double got_ = (got);                                                             \
    const double want_ = (want);                                                           \
    if (!check::close(got_, want_, (rtol), (atol))) {                                      \
      check::fail(__FILE__, __LINE__,                                                      \
                  std::string(#got) + " = " + check::fmt(got_) + ", want " +                \
                      check::fmt(want_));                                              \
    }                                                                                      \
  } while (0)

#define EXPECT_THROW_ARG(expr, arg) check::expect_throw(__FILE__, __LINE__, [&] { expr; }, arg)
