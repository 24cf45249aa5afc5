// Emulator stand-in for <cuda_bf16.h>: __nv_bfloat16 lives in emu.h.
#include "../emu.h"
