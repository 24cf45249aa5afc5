// Emulator stand-in for <cuda_fp16.h>: __half lives in emu.h.
#include "../emu.h"
