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
    ddp_param_options no_decay = {0};
    float loss = 0;
    int w, b, step, steps = 100;
    cfg.optimizer = ddp_optimizer_defaults(DDP_OPTIM_ADAMW); /* PyTorch's: betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2 */
    cfg.optimizer.lr = 3e-2;
    cfg.schedule.type = DDP_SCHEDULE_COSINE;    /* linear warmup, then cosine down to min_lr */
    cfg.schedule.warmup_steps = 10;
    cfg.schedule.total_steps = steps;
    if (ddp_create(&cfg, &ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_create_error()); return 1; }
    /* register in forward order, then finalize */
    CHECK(ddp_register_param(ctx, "fc.weight", 784 * 10, DDP_F32, init_w(), &w));
    CHECK(ddp_register_param(ctx, "fc.bias", 10, DDP_F32, NULL, &b));  /* NULL: zeros */
    no_decay.no_weight_decay = 1;   /* a parameter group: the bias without weight decay */
    CHECK(ddp_set_param_options(ctx, b, &no_decay));
    CHECK(ddp_finalize(ctx));       /* checks every rank has the same model; rank 0's weights win */
    for (step = 0; step < steps; step++) {
        const batch *x = my_shard(ddp_rank(ctx), ddp_world_size(ctx), step);
        CHECK(ddp_step_begin(ctx));
        loss = my_forward(ddp_param_data(ctx, w), ddp_param_data(ctx, b), x);
        my_backward_bias(ddp_param_grad(ctx, b), x);    /* ADD into the gradients */
        CHECK(ddp_mark_ready(ctx, b));                  /* its bucket may start reducing now */
        my_backward_weight(ddp_param_grad(ctx, w), x);
        CHECK(ddp_mark_ready(ctx, w));
        CHECK(ddp_step_end(ctx));   /* gradients now hold the average over ranks */
        CHECK(ddp_optimizer_step(ctx));                 /* AdamW at this step's lr (ddp_get_lr) */
    }
    if (ddp_rank(ctx) == 0) printf("rank 0 of %d: loss %.3f\n", ddp_world_size(ctx), loss);
    ddp_destroy(ctx);
    return 0;
}
/* README:end */
