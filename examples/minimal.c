/* minimal.c - the README's "Use it" snippet as a complete program: ddp.h
   around a user's model (examples/my_model.h), every result checked.

       build/ddprun -n 2 build/examples/minimal

   prints "rank 0 of 2: loss L" at the end (L falls from 2.30). The lines
   between the README markers below are exactly the README's block
   (tests/check_snippets.cmake compares them); edit both together. */
/* README:begin */
#define DDP_IMPLEMENTATION          /* in ONE .c file (a .cu file for CUDA builds) */
#include "ddp.h"
#include "my_model.h"               /* your model: forward, backward, data */

/* every call returns a ddp_result: on failure, say what went wrong and stop */
#define CHECK(call) do { ddp_result r_ = (call); if (r_ != DDP_SUCCESS) {            \
        fprintf(stderr, "%s: %s\n", ddp_result_string(r_), ddp_last_error(ctx));   \
        ddp_destroy(ctx); return 1; } } while (0)

int main(void) {
    ddp_config cfg = {0};           /* zero means default */
    ddp_context *ctx = NULL;
    float loss = 0;
    int w, b, step;
    cfg.optimizer.type = DDP_OPTIM_SGD;
    cfg.optimizer.lr = 0.05f;
    cfg.optimizer.momentum = 0.9f;
    if (ddp_create(&cfg, &ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_create_error()); return 1; }
    /* register in forward order, then finalize */
    CHECK(ddp_register_param(ctx, "fc.weight", 784 * 10, DDP_F32, init_w(), &w));
    CHECK(ddp_register_param(ctx, "fc.bias", 10, DDP_F32, NULL, &b));  /* NULL: zeros */
    CHECK(ddp_finalize(ctx));       /* checks every rank has the same model; rank 0's weights win */
    for (step = 0; step < 100; step++) {
        const batch *x = my_shard(ddp_rank(ctx), ddp_world_size(ctx), step);
        CHECK(ddp_step_begin(ctx));
        loss = my_forward(ddp_param_data(ctx, w), ddp_param_data(ctx, b), x);
        my_backward_bias(ddp_param_grad(ctx, b), x);    /* ADD into the gradients */
        CHECK(ddp_mark_ready(ctx, b));                  /* its bucket may start reducing now */
        my_backward_weight(ddp_param_grad(ctx, w), x);
        CHECK(ddp_mark_ready(ctx, w));
        CHECK(ddp_step_end(ctx));   /* gradients now hold the average over ranks */
        CHECK(ddp_optimizer_step(ctx));
    }
    if (ddp_rank(ctx) == 0) printf("rank 0 of %d: loss %.3f\n", ddp_world_size(ctx), loss);
    ddp_destroy(ctx);
    return 0;
}
/* README:end */
