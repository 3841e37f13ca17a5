// The DEFAULT variant: the kernels for the baseline ISA of the target (x86-64: SSE2), on
// at::vec's generic vectors (arrays the compiler vectorises). Runs on every CPU; the only one
// built on other architectures.
#define CPU_CAPABILITY DEFAULT
#define SPECKLE_ISA_NAME "default"
#include "kernels_body.h"
