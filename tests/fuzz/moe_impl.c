/* tests/fuzz/moe_impl.c — the implementation of moe.h, compiled once and linked into every
   fuzz target (each target then compiles in a second). */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#include "moe.h"
