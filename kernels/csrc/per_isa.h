// Compiles one kernel body once per ISA: `#define SPECDEC_KERNEL "body.h"` then `#include "per_isa.h"` (inside
// namespace specdec) defines the body's functions in portable::, avx2:: and avx512::, each copy under its own target
// and with its ISA's `Vec` (vec.h), so the one body runs on every path. No pragma once: included once per body.
#ifndef SPECDEC_KERNEL
#error "define SPECDEC_KERNEL as the kernel body's header before including per_isa.h"
#endif

namespace portable {
#include SPECDEC_KERNEL
}  // namespace portable

#ifdef SPECDEC_X86
SPECDEC_AVX2_BEGIN
#include SPECDEC_KERNEL
SPECDEC_ISA_END
SPECDEC_AVX512_BEGIN
#include SPECDEC_KERNEL
SPECDEC_ISA_END
#endif

#undef SPECDEC_KERNEL
