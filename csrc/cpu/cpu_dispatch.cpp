// Which kernel variant (csrc/variants/) this process runs, chosen once, as ATen's
// DispatchStub chooses its kernels (aten/src/ATen/native/DispatchStub.cpp):
//   the most capable variant the CPU runs, by __builtin_cpu_supports (libgcc's cpuid reader,
//   which also checks that the OS saves the YMM/ZMM state, XCR0);
//   SPECKLE_CPU_CAPABILITY=default|avx2|avx512 asks for one (as ATEN_CPU_CAPABILITY does);
//   asking for more than the CPU has runs the best it has, and cpu_capability_note() says so
//   (python -m speckle_kernels prints it); a value that names no variant is refused.
// Compiled for the baseline ISA, like everything outside the variants' translation units.
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPECKLE_X86_VARIANTS 1  // the condition of csrc/variants/kernels_1_avx2.cpp and _2_avx512.cpp
#endif

namespace speckle::cpu {
namespace DEFAULT {
extern const KernelTable kTable;
}
#if defined(SPECKLE_X86_VARIANTS)
namespace AVX2 {
extern const KernelTable kTable;
}
namespace AVX512_256 {
extern const KernelTable kTable;
}
#endif

namespace {

struct Variant {
  const KernelTable* table;
  std::vector<const char*> features;  // what the CPU must report (__builtin_cpu_supports names)
};

// The built variants, least capable first.
const std::vector<Variant>& built_variants() {
  static const std::vector<Variant> variants{
      {&DEFAULT::kTable, {}},
#if defined(SPECKLE_X86_VARIANTS)
      {&AVX2::kTable, {"avx2", "fma", "f16c"}},
      {&AVX512_256::kTable, {"avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl"}},
#endif
  };
  return variants;
}

// The features of `v` this CPU lacks ("" when it runs v).
std::string missing_features(const Variant& v) {
  std::string missing;
#if defined(SPECKLE_X86_VARIANTS)
  __builtin_cpu_init();  // may run before libgcc's constructor has
  // __builtin_cpu_supports takes string literals only, hence one call per name.
  auto supports = [](const std::string& f) -> bool {
    if (f == "avx2") return __builtin_cpu_supports("avx2");
    if (f == "fma") return __builtin_cpu_supports("fma");
    if (f == "f16c") return __builtin_cpu_supports("f16c");
    if (f == "avx512f") return __builtin_cpu_supports("avx512f");
    if (f == "avx512dq") return __builtin_cpu_supports("avx512dq");
    if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
    if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
    return false;
  };
  for (const char* f : v.features) {
    if (!supports(f)) missing += (missing.empty() ? "" : ", ") + std::string(f);
  }
#else
  (void)v;
#endif
  return missing;
}

struct Choice {
  const KernelTable* table = nullptr;
  std::string note;   // why the variant in use is not the one asked for
  std::string error;  // SPECKLE_CPU_CAPABILITY names no variant
};

Choice choose() {
  const auto& variants = built_variants();
  const Variant* best = &variants.front();
  for (const Variant& v : variants) {
    if (missing_features(v).empty()) best = &v;
  }
  Choice choice;
  choice.table = best->table;
  const char* env = std::getenv("SPECKLE_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return choice;
  std::string asked(env);
  std::transform(asked.begin(), asked.end(), asked.begin(), [](unsigned char c) { return std::tolower(c); });
  std::string names;
  for (const Variant& v : variants) {
    names += (names.empty() ? "" : ", ") + std::string(v.table->name);
    if (asked != v.table->name) continue;
    const std::string missing = missing_features(v);
    if (missing.empty()) {
      choice.table = v.table;
    } else {
      choice.note = "SPECKLE_CPU_CAPABILITY=" + asked + " asks for more than this CPU has (no " + missing +
                    "): running " + best->table->name;
    }
    return choice;
  }
  choice.error = "SPECKLE_CPU_CAPABILITY must be one of the built variants (" + names + "), got '" +
                 std::string(env) + "'";
  return choice;
}

const Choice& choice() {
  static const Choice c = choose();
  return c;
}

}  // namespace

const KernelTable& kernels() {
  const Choice& c = choice();
  TORCH_CHECK_VALUE(c.error.empty(), c.error);
  return *c.table;
}

std::string cpu_capability() { return kernels().name; }

std::vector<std::string> cpu_capabilities() {
  std::vector<std::string> names;
  for (const Variant& v : built_variants()) {
    if (missing_features(v).empty()) names.emplace_back(v.table->name);
  }
  return names;
}

std::string cpu_capability_note() {
  kernels();  // raises on an unknown SPECKLE_CPU_CAPABILITY
  return choice().note;
}

}  // namespace speckle::cpu
