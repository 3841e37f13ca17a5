// The body of every kernel variant's translation unit (kernels_<n>_<isa>.cpp, which set the ISA and
// CPU_CAPABILITY first): the kernel sources, once more, inside speckle::cpu::<CPU_CAPABILITY>,
// and the variant's table for cpu_dispatch.cpp. One translation unit a variant, not one a source
// file, so that ATen's headers are parsed three times rather than nine.
#pragma once

#include "../cpu/batch_renorm_cpu.cpp"
#include "../cpu/batch_renorm_act_cpu.cpp"
#include "../cpu/speckle_noise_cpu.cpp"

namespace speckle::cpu::CPU_CAPABILITY {
extern const KernelTable kTable;  // external linkage: cpu_dispatch.cpp reads it
const KernelTable kTable{SPECKLE_ISA_NAME,          &batch_renorm_forward,     &batch_renorm_backward,
                         &batch_renorm_stats,       &batch_renorm_act_forward, &batch_renorm_act_backward,
                         &speckle_noise,            &noise_lane_widths};
}  // namespace speckle::cpu::CPU_CAPABILITY
