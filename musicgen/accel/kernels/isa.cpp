// The instruction-set level of the kernels: what this CPU and OS allow, capped by a process-wide limit that
// Python sets (kernels.limit_isa, so that tests run every path the host can run). Each kernel call reads the
// level once and takes that level's path; no timing decides a path.
#include "kernels.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>

namespace {

musicgen::Isa detect() {
  // __builtin_cpu_supports reports AVX-512 only where the OS saves the 512-bit state too
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
    return musicgen::AVX2;
  if (!__builtin_cpu_supports("avx512vnni")) return musicgen::AVX512;
  if (!(__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
        __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("avx512bf16")))
    return musicgen::AVX512_VNNI;
  // Linux (>= 5.16) hands a process the 8 KB tile state only when asked, before its first tile instruction
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) return musicgen::AVX512_VNNI;
  return musicgen::AMX;
}

std::atomic<int> limit{musicgen::AMX};

}  // namespace

musicgen::Isa musicgen::host_isa() {
  static const Isa host = detect();
  return host;
}

musicgen::Isa musicgen::isa() {
  return static_cast<Isa>(std::min<int>(host_isa(), limit.load(std::memory_order_relaxed)));
}

void musicgen::set_isa_limit(int level) {
  TORCH_CHECK(AVX2 <= level && level <= AMX, "set_isa_limit: level ", level, " is not one of 0 (AVX2) .. 3 (AMX)");
  limit.store(level, std::memory_order_relaxed);
}
