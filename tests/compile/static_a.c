/* DDP_STATIC: a private copy of the implementation in this file... */
#define DDP_STATIC
#define DDP_IMPLEMENTATION
#include "../../ddp.h"
#include "smoke.h"
#include <string.h>

int smoke_static_a(void) {
    ddp_config c;
    ddp_context *ctx = 0;
    int r;
    memset(&c, 0, sizeof c);
    c.world_size = 1;
    r = ddp_create(&c, &ctx);
    if (r != DDP_SUCCESS) return 1;
    r = ddp_world_size(ctx) == 1 ? 0 : 2;
    ddp_destroy(ctx);
    return r;
}
