/* tests/test.h: the tiny test harness every C suite uses.

   A suite is a program whose main() calls T_RUN(fn) for each case and ends with
   `return t_summary();`. A case is a `static void fn(void)` that uses
     T_CHECK(cond, fmt, ...)   record a failure and go on,
     T_ASSERT(cond, fmt, ...)  record a failure and leave the case,
     T_NOTE(fmt, ...)          print a measured value next to the case.
   Each case prints one line, `ok   name` or `FAIL name`, with its failures under it.
   The suite's last line is `SUITE: N passed, M failed`; build.sh adds those up. */
#ifndef MOE_TEST_H
#define MOE_TEST_H

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static int t_passed, t_failed, t_case_failures;
static char t_notes[16384];

static void t__vappend(const char *prefix, const char *fmt, va_list ap) {
    size_t used = strlen(t_notes);
    if (used + 8 >= sizeof t_notes) return;
    used += (size_t)snprintf(t_notes + used, sizeof t_notes - used, "%s", prefix);
    if (used >= sizeof t_notes) return;
    used += (size_t)vsnprintf(t_notes + used, sizeof t_notes - used, fmt, ap);
    if (used + 1 < sizeof t_notes) strcat(t_notes, "\n");
}

static void t__fail(const char *file, int line, const char *cond, const char *fmt, ...) {
    char prefix[512];
    va_list ap;
    snprintf(prefix, sizeof prefix, "     %s:%d: (%s) ", file, line, cond);
    va_start(ap, fmt);
    t__vappend(prefix, fmt, ap);
    va_end(ap);
    t_case_failures++;
}

static void t__note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    t__vappend("     ", fmt, ap);
    va_end(ap);
}

#define T_CHECK(cond, ...) \
    do { if (!(cond)) t__fail(__FILE__, __LINE__, #cond, __VA_ARGS__); } while (0)
#define T_ASSERT(cond, ...) \
    do { if (!(cond)) { t__fail(__FILE__, __LINE__, #cond, __VA_ARGS__); return; } } while (0)
#define T_NOTE(...) t__note(__VA_ARGS__)

static void t__run(const char *name, void (*fn)(void)) {
    t_notes[0] = 0;
    t_case_failures = 0;
    fn();
    if (t_case_failures == 0) t_passed++; else t_failed++;
    printf("%s %s\n%s", t_case_failures ? "FAIL" : "ok  ", name, t_notes);
    fflush(stdout);
}
#define T_RUN(fn) t__run(#fn, fn)

/* Run only the cases whose name contains argv[1], when given. */
static const char *t_filter;
#define T_RUN_FILTERED(fn) \
    do { if (!t_filter || strstr(#fn, t_filter)) t__run(#fn, fn); } while (0)

static int t_summary(void) {
    (void)t_filter;
    printf("SUITE: %d passed, %d failed\n", t_passed, t_failed);
    return t_failed ? 1 : 0;
}

#endif /* MOE_TEST_H */
