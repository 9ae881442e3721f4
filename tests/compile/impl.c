/* The one translation unit with the implementation (the documented setup). */
#define DDP_IMPLEMENTATION
#include "../../ddp.h"
