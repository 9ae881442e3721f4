/* A user translation unit: declarations only. One SGD step on a world of one
   must move w from 1 to 1 - lr * 2w = 0.5. */
#include "../../ddp.h"
#include "smoke.h"
#include <string.h>

int smoke_user(void) {
    ddp_config c;
    ddp_context *ctx = 0;
    float init = 1.0f, *w, *g;
    int id;
    memset(&c, 0, sizeof c);
    c.world_size = 1;
    c.optimizer.type = DDP_OPTIM_SGD;
    c.optimizer.lr = 0.25f;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) return 1;
    if (ddp_register_param(ctx, "w", 1, DDP_F32, &init, &id) != DDP_SUCCESS) return 2;
    if (ddp_finalize(ctx) != DDP_SUCCESS) return 3;
    w = (float *)ddp_param_data(ctx, id);
    g = (float *)ddp_param_grad(ctx, id);
    if (ddp_step_begin(ctx) != DDP_SUCCESS) return 4;
    *g += 2.0f * *w;
    if (ddp_mark_ready(ctx, id) != DDP_SUCCESS || ddp_step_end(ctx) != DDP_SUCCESS) return 5;
    if (ddp_optimizer_step(ctx) != DDP_SUCCESS) return 6;
    if (*w != 0.5f) return 7;
    ddp_destroy(ctx);
    return 0;
}
