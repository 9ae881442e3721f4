/* bench/ddp_step: the cost of DDP on a CPU training step. The example
   model (examples/mlp.h: CPU forward and backward, SGD with momentum 0.9)
   trained with ddp.h on N ranks, batch B each, against the same program at
   world size 1 with the library bypassed: plain malloc'd arrays, the same
   model, the same batch B, the same SGD arithmetic written inline, the same
   single compute thread per process.

       build/ddprun -n 2 build/bench/ddp_step [options]

       --model M     small (784-256-256-10, batch 32), large (784-1024-1024-10,
                     batch 128) or dims such as 784,512,10 (default: small
                     then large)
       --batch B     per-rank batch (default: the model's)
       --seconds S   length of one measurement (default 2)
       --reps R      measurements of each loop; the median is kept (default 3)
       --scrambled   instead: the parameters registered out of order, the
                     registration-order buckets against the learned ones
                     (see run_scrambled); --bucket-kb K sets both caps
       --debug       instead of ZeRO-1, the second context runs with desync
                     detection (config.debug = DDP_DEBUG_DETAIL): its cost

   Fairness on a machine with few cores: every rank runs the local loop at
   the same time (after a barrier), then every rank runs the DDP loop, so
   both loops see the same number of busy processes. Each loop: 10 warm-up
   steps and a step count giving about --seconds (rank 0's estimate,
   shared); then --reps rounds, each a barrier, a local measurement, a
   barrier and a DDP measurement (interleaved, so that both loops see the
   same drift in machine load). Data: mlp_synthetic; rank r takes batch
   (step * N + r) of a fixed set. Subnormals are flushed to zero in both
   loops (see FLUSH_DENORMALS). One context per model, one after the other.

   ZeRO-1: a second context (config.zero_stage = 1, on MASTER_PORT + 1)
   trains the same model from the same weights on the same batches, the
   same number of steps as the DDP loop, measured in the same rounds.
   With --debug that second context is a plain one with DDP_DEBUG=detail
   (every collective's fingerprint checked first) instead.

   Output (rank 0; ddprun prefixes each line with "[0] "): '#' lines are
   comments, then per model:
       ranks=N params=P batch=B local_ms=X ddp_ms=Y overhead=Y/X
       zero: ranks=N params=P ddp_ms=Y zero_ms=Z speedup=Y/Z state_bytes_ddp=A state_bytes_zero=B
   or with --debug
       debug: ranks=N params=P ddp_ms=Y debug_ms=Z cost=Z/Y
   where X, Y, Z are the median milliseconds per step (rank 0's clock), A
   and B the optimizer-state bytes rank 0 holds (ddp_optimizer_state_bytes),
   and a comment line with every measurement and the bucket count. Each
   model ends with checks that the weights are identical on every rank and
   that the ZeRO-1 weights equal the DDP ones bit for bit.
   Exit status 1 on any error. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "bench.h"
#define MLP_IMPLEMENTATION
#define MLP_NO_ZLIB
#include "../examples/mlp.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Subnormal floats: once the synthetic task is learnt (after about 800
   steps of the small model) backward produces subnormal values and every
   step gets twice as slow on x86, at a point that depends on the loop
   (DDP trains on N times the data). Both loops therefore run with
   flush-to-zero and denormals-are-zero, as torch.set_flush_denormal(True)
   does; set before ddp_create(), so the communication thread inherits it. */
#if defined(__SSE__) || defined(_M_X64)
#  include <xmmintrin.h>
#  define FLUSH_DENORMALS() _mm_setcsr(_mm_getcsr() | 0x8040u) /* FTZ | DAZ */
#  define FLUSH_DENORMALS_ON 1
#else
#  define FLUSH_DENORMALS() ((void)0)
#  define FLUSH_DENORMALS_ON 0
#endif

#define LR       0.01f
#define MOMENTUM 0.9f
#define WARMUP   10
#define MAX_REPS 101

typedef struct model_run {
    mlp_shape shape;
    int batch;
    mlp_dataset data;
    int nbatches;
    float *init[MLP_MAX_PARAMS];
    mlp_workspace ws;
} model_run;

/* rank 0's number of steps for `seconds`, given its time per step */
static int agree_steps(ddp_context *ctx, double step_s, double seconds) {
    int32_t steps = 0;
    if (ddp_rank(ctx) == 0) {
        double n = seconds / (step_s > 1e-7 ? step_s : 1e-7);
        steps = n < 5 ? 5 : n > 1e7 ? 10000000 : (int32_t)n;
    }
    check(ctx, ddp_broadcast(ctx, &steps, 1, DDP_I32, 0), "ddp_broadcast of the step count");
    return (int)steps;
}

static const float *batch_x(const model_run *m, int step, int rank, int world) {
    int b = (int)(((long)step * world + rank) % m->nbatches);
    return m->data.x + (size_t)b * m->batch * m->shape.dims[0];
}

static const uint8_t *batch_y(const model_run *m, int step, int rank, int world) {
    int b = (int)(((long)step * world + rank) % m->nbatches);
    return m->data.y + (size_t)b * m->batch;
}

/* ---- the local loop: no library ------------------------------------------- */

typedef struct local_state {
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS], *mom[MLP_MAX_PARAMS];
    long steps_done;
} local_state;

/* ddp's SGD (ddp__sgd_f32, no weight decay, no Nesterov), written inline */
static void local_step(model_run *m, local_state *s, int step, int rank, int world) {
    int p, np = mlp_num_params(&m->shape);
    for (p = 0; p < np; p++) memset(s->grads[p], 0, mlp_param_numel(&m->shape, p) * sizeof(float));
    mlp_forward_backward(s->params, batch_x(m, step, rank, world), batch_y(m, step, rank, world), m->batch,
                         1.0f, s->grads, &m->ws, NULL, NULL, NULL);
    for (p = 0; p < np; p++) {
        float *w = s->params[p], *g = s->grads[p], *buf = s->mom[p];
        size_t i, n = mlp_param_numel(&m->shape, p);
        int first = s->steps_done == 0;
        for (i = 0; i < n; i++) {
            float d = g[i];
            float b = first ? d : MOMENTUM * buf[i] + d;
            buf[i] = b;
            w[i] -= LR * b;
        }
    }
    s->steps_done++;
}

static double local_loop(ddp_context *ctx, model_run *m, local_state *s, int steps) {
    int i, rank = ddp_rank(ctx), world = ddp_world_size(ctx);
    double t0 = now_s();
    for (i = 0; i < steps; i++) local_step(m, s, (int)s->steps_done, rank, world);
    return (now_s() - t0) / steps;
}

/* ---- the DDP loop ------------------------------------------------------------ */

typedef struct ddp_state {
    ddp_context *ctx;
    ddp_result err;
    long steps_done;
    int ids[MLP_MAX_PARAMS];  /* the ddp id of each model parameter (registration order) */
} ddp_state;

static void on_ready(int p, void *user) {
    ddp_state *s = (ddp_state *)user;
    ddp_result r = ddp_mark_ready(s->ctx, s->ids[p]);
    if (r != DDP_SUCCESS && s->err == DDP_SUCCESS) s->err = r;
}

static void ddp_one_step(model_run *m, ddp_state *s) {
    ddp_context *ctx = s->ctx;
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    int p, rank = ddp_rank(ctx), world = ddp_world_size(ctx), step = (int)s->steps_done;
    for (p = 0; p < mlp_num_params(&m->shape); p++) {
        params[p] = (float *)ddp_param_data(ctx, s->ids[p]);
        grads[p] = (float *)ddp_param_grad(ctx, s->ids[p]);
    }
    check(ctx, ddp_step_begin(ctx), "ddp_step_begin");
    mlp_forward_backward(params, batch_x(m, step, rank, world), batch_y(m, step, rank, world), m->batch,
                         1.0f, grads, &m->ws, NULL, on_ready, s);
    check(ctx, s->err, "ddp_mark_ready");
    check(ctx, ddp_step_end(ctx), "ddp_step_end");
    check(ctx, ddp_optimizer_step(ctx), "ddp_optimizer_step");
    s->steps_done++;
}

static double ddp_loop(model_run *m, ddp_state *s, int steps) {
    int i;
    double t0 = now_s();
    for (i = 0; i < steps; i++) ddp_one_step(m, s);
    return (now_s() - t0) / steps;
}

/* ---- one model ------------------------------------------------------------------ */

static int run_model(const char *dims, int batch, double seconds, int reps, int debug) {
    model_run m;
    local_state ls;
    ddp_state ds, zs;
    ddp_config c;
    ddp_context *ctx, *zctx;
    ddp_result r;
    double local[MAX_REPS], dist[MAX_REPS], zdist[MAX_REPS], t, lmed, dmed, zmed, sum, lo, hi;
    int p, k, steps_local, steps_ddp, rank, world, np, zsame = 1;
    size_t total;

    memset(&m, 0, sizeof m);
    if (mlp_shape_parse(dims, &m.shape) || mlp_shape_check(&m.shape)) die("bad model dims", dims);
    m.batch = batch;
    np = mlp_num_params(&m.shape);
    total = mlp_total_numel(&m.shape);

    memset(&c, 0, sizeof c);
    c.device = DDP_DEVICE_CPU;
    c.backend = DDP_BACKEND_SHM;
    c.optimizer.type = DDP_OPTIM_SGD;
    c.optimizer.lr = LR;
    c.optimizer.momentum = MOMENTUM;
    r = ddp_create(&c, &ctx);
    if (r != DDP_SUCCESS) die(ddp_result_string(r), ddp_create_error());
    rank = ddp_rank(ctx);
    world = ddp_world_size(ctx);

    if (mlp_workspace_init(&m.ws, &m.shape, batch)) die("out of memory for the workspace", NULL);
    m.nbatches = 16 * world;
    if (mlp_synthetic(&m.data, m.nbatches * batch, m.shape.dims[0], m.shape.dims[m.shape.num_layers], 1))
        die("mlp_synthetic failed", NULL);
    for (p = 0; p < np; p++) {
        m.init[p] = (float *)malloc(mlp_param_numel(&m.shape, p) * sizeof(float));
        if (!m.init[p]) die("out of memory", NULL);
    }
    mlp_init_params(&m.shape, 1, m.init);
    for (p = 0; p < np; p++) {
        char name[32];
        int id;
        mlp_param_name(p, name, sizeof name);
        check(ctx, ddp_register_param(ctx, name, mlp_param_numel(&m.shape, p), DDP_F32, m.init[p], &id),
              "ddp_register_param");
    }
    check(ctx, ddp_finalize(ctx), "ddp_finalize");

    /* the same model with ZeRO-1 (--debug: with fingerprints) on the next port (both contexts live) */
    if (debug) c.debug = DDP_DEBUG_DETAIL;
    else c.zero_stage = 1;
    c.master_port = ddp_query_config(ctx).master_port + 1;
    r = ddp_create(&c, &zctx);
    if (r != DDP_SUCCESS) die(ddp_result_string(r), ddp_create_error());
    for (p = 0; p < np; p++) {
        char name[32];
        int id;
        mlp_param_name(p, name, sizeof name);
        check(zctx, ddp_register_param(zctx, name, mlp_param_numel(&m.shape, p), DDP_F32, m.init[p], &id),
              "ddp_register_param");
    }
    check(zctx, ddp_finalize(zctx), "ddp_finalize");

    /* plain arrays for the local loop, from the same initial weights */
    memset(&ls, 0, sizeof ls);
    for (p = 0; p < np; p++) {
        size_t n = mlp_param_numel(&m.shape, p);
        ls.params[p] = (float *)malloc(n * sizeof(float));
        ls.grads[p] = (float *)calloc(n, sizeof(float));
        ls.mom[p] = (float *)calloc(n, sizeof(float));
        if (!ls.params[p] || !ls.grads[p] || !ls.mom[p]) die("out of memory", NULL);
        memcpy(ls.params[p], m.init[p], n * sizeof(float));
    }

    /* warm-up and step counts: local loop on every rank at once, then DDP */
    memset(&ds, 0, sizeof ds);
    ds.ctx = ctx;
    memset(&zs, 0, sizeof zs);
    zs.ctx = zctx;
    for (p = 0; p < np; p++) ds.ids[p] = zs.ids[p] = p;
    check(ctx, ddp_barrier(ctx), "ddp_barrier");
    t = local_loop(ctx, &m, &ls, WARMUP);
    steps_local = agree_steps(ctx, t, seconds);
    check(ctx, ddp_barrier(ctx), "ddp_barrier");
    t = ddp_loop(&m, &ds, WARMUP);
    steps_ddp = agree_steps(ctx, t, seconds);
    check(zctx, ddp_barrier(zctx), "ddp_barrier");
    (void)ddp_loop(&m, &zs, WARMUP); /* ZeRO-1 runs the DDP loop's step counts: the same weights */

    /* measurements, interleaved so that the loops see the same drift in
       machine load: every rank runs the local loop, then every rank the DDP
       loop, then every rank the ZeRO-1 loop */
    for (k = 0; k < reps; k++) {
        check(ctx, ddp_barrier(ctx), "ddp_barrier");
        local[k] = local_loop(ctx, &m, &ls, steps_local);
        check(ctx, ddp_barrier(ctx), "ddp_barrier");
        dist[k] = ddp_loop(&m, &ds, steps_ddp);
        check(zctx, ddp_barrier(zctx), "ddp_barrier");
        zdist[k] = ddp_loop(&m, &zs, steps_ddp);
    }
    for (p = 0; p < np; p++)
        zsame &= memcmp(ddp_param_data(ctx, p), ddp_param_data(zctx, p), mlp_param_numel(&m.shape, p) * sizeof(float)) == 0;

    /* every rank must hold the same weights */
    sum = 0;
    for (p = 0; p < np; p++) {
        const float *w = (const float *)ddp_param_data(ctx, p);
        size_t i, n = mlp_param_numel(&m.shape, p);
        for (i = 0; i < n; i++) sum += (double)w[i] * (double)((i % 7) + 1);
    }
    lo = -sum;
    hi = sum;
    check(ctx, ddp_allreduce(ctx, &lo, 1, DDP_F64, DDP_OP_MAX), "ddp_allreduce");
    check(ctx, ddp_allreduce(ctx, &hi, 1, DDP_F64, DDP_OP_MAX), "ddp_allreduce");

    lmed = median(local, reps);
    dmed = median(dist, reps);
    zmed = median(zdist, reps);
    if (rank == 0) {
        printf("ranks=%d params=%zu batch=%d local_ms=%.3f ddp_ms=%.3f overhead=%.3f\n", world, total, batch,
               lmed * 1e3, dmed * 1e3, dmed / lmed);
        if (debug)
            printf("debug: ranks=%d params=%zu ddp_ms=%.3f debug_ms=%.3f cost=%.3f\n", world, total, dmed * 1e3, zmed * 1e3, zmed / dmed);
        else
            printf("zero: ranks=%d params=%zu ddp_ms=%.3f zero_ms=%.3f speedup=%.3f state_bytes_ddp=%zu state_bytes_zero=%zu\n",
                   world, total, dmed * 1e3, zmed * 1e3, dmed / zmed, ddp_optimizer_state_bytes(ctx), ddp_optimizer_state_bytes(zctx));
        printf("#   model=%s buckets=%d ftz=%d steps/measurement local=%d ddp=%d; local_ms", dims,
               ddp_bucket_count(ctx), FLUSH_DENORMALS_ON, steps_local, steps_ddp);
        for (k = 0; k < reps; k++) printf(" %.3f", local[k] * 1e3);
        printf("; ddp_ms");
        for (k = 0; k < reps; k++) printf(" %.3f", dist[k] * 1e3);
        printf(debug ? "; debug_ms" : "; zero_ms");
        for (k = 0; k < reps; k++) printf(" %.3f", zdist[k] * 1e3);
        printf("; weights identical on all ranks: %s; %s weights == DDP weights: %s\n", hi == -lo ? "yes" : "NO",
               debug ? "DDP_DEBUG=detail" : "ZeRO-1", zsame ? "yes" : "NO");
        fflush(stdout);
    }

    for (p = 0; p < np; p++) { free(ls.params[p]); free(ls.grads[p]); free(ls.mom[p]); free(m.init[p]); }
    mlp_dataset_free(&m.data);
    mlp_workspace_free(&m.ws);
    check(ctx, ddp_barrier(ctx), "ddp_barrier");
    ddp_destroy(zctx);
    ddp_destroy(ctx);
    return hi == -lo && zsame ? 0 : 1;
}

/* ---- scrambled registration: the bucket order learned from the first step ---- */

/* The model's parameters registered in an order unlike the backward's:
   fc1.weight, marked last by the backward, registered last, so that it
   opens bucket 0 of the registration order. Two contexts (the second on
   MASTER_PORT + 1): config.static_bucket_order = 1 and the default
   (learned); the same steps from the same weights, interleaved; the
   exposed communication per step from ddp_get_step_stats. Row:
       scrambled: ranks=N params=P buckets=B static_ms=S learned_ms=L
                  exposed_static_ms=ES exposed_learned_ms=EL overlap_static=OS% overlap_learned=OL% */
static int run_scrambled(const char *dims, int batch, double seconds, int reps, int bucket_kb) {
    static const int scramble[] = { 3, 4, 1, 5, 2, 0 }; /* registration order of mlp parameters (3 layers) */
    model_run m;
    ddp_state st[2];
    ddp_context *ctx[2];
    ddp_config c;
    ddp_result r;
    ddp_step_stats before, after;
    double ms[2][MAX_REPS], ex[2][MAX_REPS], comm[2][MAX_REPS], t;
    int p, k, v, steps, np, same = 1;
    memset(&m, 0, sizeof m);
    if (mlp_shape_parse(dims, &m.shape) || mlp_shape_check(&m.shape)) die("bad model dims", dims);
    np = mlp_num_params(&m.shape);
    if (np != 6) die("--scrambled needs a model of 3 layers", dims);
    m.batch = batch;
    memset(st, 0, sizeof st);
    for (v = 0; v < 2; v++) {
        memset(&c, 0, sizeof c);
        c.device = DDP_DEVICE_CPU;
        c.backend = DDP_BACKEND_SHM;
        c.optimizer.type = DDP_OPTIM_SGD;
        c.optimizer.lr = LR;
        c.optimizer.momentum = MOMENTUM;
        c.static_bucket_order = v == 0;
        if (bucket_kb) c.first_bucket_bytes = c.bucket_bytes = (size_t)bucket_kb << 10;
        if (v == 1) c.master_port = ddp_query_config(ctx[0]).master_port + 1;
        r = ddp_create(&c, &ctx[v]);
        if (r != DDP_SUCCESS) die(ddp_result_string(r), ddp_create_error());
        if (v == 0) {
            int world = ddp_world_size(ctx[0]);
            if (mlp_workspace_init(&m.ws, &m.shape, batch)) die("out of memory for the workspace", NULL);
            m.nbatches = 16 * world;
            if (mlp_synthetic(&m.data, m.nbatches * batch, m.shape.dims[0], m.shape.dims[m.shape.num_layers], 1))
                die("mlp_synthetic failed", NULL);
            for (p = 0; p < np; p++) {
                m.init[p] = (float *)malloc(mlp_param_numel(&m.shape, p) * sizeof(float));
                if (!m.init[p]) die("out of memory", NULL);
            }
            mlp_init_params(&m.shape, 1, m.init);
        }
        st[v].ctx = ctx[v];
        for (k = 0; k < (int)(sizeof scramble / sizeof scramble[0]); k++) {
            char name[32];
            int id = -1;
            p = scramble[k];
            mlp_param_name(p, name, sizeof name);
            check(ctx[v], ddp_register_param(ctx[v], name, mlp_param_numel(&m.shape, p), DDP_F32, m.init[p], &id),
                  "ddp_register_param");
            st[v].ids[p] = id;
        }
        check(ctx[v], ddp_finalize(ctx[v]), "ddp_finalize");
    }
    /* warm-up: the first step teaches the learned context its order */
    for (v = 0; v < 2; v++) { check(ctx[v], ddp_barrier(ctx[v]), "ddp_barrier"); t = ddp_loop(&m, &st[v], WARMUP); }
    steps = agree_steps(ctx[0], t, seconds);
    for (k = 0; k < reps; k++)
        for (v = 0; v < 2; v++) {
            check(ctx[v], ddp_barrier(ctx[v]), "ddp_barrier");
            check(ctx[v], ddp_get_step_stats(ctx[v], NULL, &before), "ddp_get_step_stats");
            ms[v][k] = ddp_loop(&m, &st[v], steps);
            check(ctx[v], ddp_get_step_stats(ctx[v], NULL, &after), "ddp_get_step_stats");
            ex[v][k] = (after.exposed_s - before.exposed_s) / steps;
            comm[v][k] = (after.comm_s - before.comm_s) / steps;
        }
    for (p = 0; p < np; p++)
        same &= memcmp(ddp_param_data(ctx[0], st[0].ids[p]), ddp_param_data(ctx[1], st[1].ids[p]),
                       mlp_param_numel(&m.shape, p) * sizeof(float)) == 0;
    if (ddp_rank(ctx[0]) == 0) {
        double e0 = median(ex[0], reps), e1 = median(ex[1], reps), c0 = median(comm[0], reps), c1 = median(comm[1], reps);
        printf("scrambled: ranks=%d params=%zu buckets=%d/%d static_ms=%.3f learned_ms=%.3f exposed_static_ms=%.3f "
               "exposed_learned_ms=%.3f overlap_static=%.0f%% overlap_learned=%.0f%%\n",
               ddp_world_size(ctx[0]), mlp_total_numel(&m.shape), ddp_bucket_count(ctx[0]), ddp_bucket_count(ctx[1]),
               median(ms[0], reps) * 1e3, median(ms[1], reps) * 1e3, e0 * 1e3, e1 * 1e3,
               c0 > e0 ? 100 * (1 - e0 / c0) : 0.0, c1 > e1 ? 100 * (1 - e1 / c1) : 0.0);
        printf("#   model=%s bucket_kb=%d steps/measurement=%d comm_ms static=%.3f learned=%.3f; learned weights == static weights: %s\n",
               dims, bucket_kb, steps, c0 * 1e3, c1 * 1e3, same ? "yes" : "NO");
        fflush(stdout);
    }
    for (p = 0; p < np; p++) free(m.init[p]);
    mlp_dataset_free(&m.data);
    mlp_workspace_free(&m.ws);
    for (v = 1; v >= 0; v--) { check(ctx[v], ddp_barrier(ctx[v]), "ddp_barrier"); ddp_destroy(ctx[v]); }
    return same ? 0 : 1;
}

int main(int argc, char **argv) {
    const char *model = NULL;
    int batch = 0, reps = 3, i, bad = 0, scrambled = 0, bucket_kb = 0, debug = 0;
    double seconds = 2.0;
    FLUSH_DENORMALS();
    bench_name = "ddp_step";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: ddp_step [--model small|large|DIMS] [--batch B] [--seconds S] [--reps R] [--scrambled [--bucket-kb K] | --debug]\n");
            return 0;
        }
        if (!strcmp(a, "--scrambled")) { scrambled = 1; continue; }
        if (!strcmp(a, "--debug")) { debug = 1; continue; }
        if (!v) die("option needs a value", a);
        i++;
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--batch")) batch = (int)parse_long(v, 1, 1 << 20);
        else if (!strcmp(a, "--reps")) reps = (int)parse_long(v, 1, MAX_REPS);
        else if (!strcmp(a, "--bucket-kb")) bucket_kb = (int)parse_long(v, 1, 1 << 20);
        else if (!strcmp(a, "--seconds")) {
            char *end;
            seconds = strtod(v, &end);
            if (end == v || *end || !(seconds > 0)) die("bad --seconds", v);
        } else die("unknown option", a);
    }
    if (scrambled) {
        if (!model || !strcmp(model, "small")) bad |= run_scrambled("784,256,256,10", batch ? batch : 32, seconds, reps, bucket_kb);
        if (!model || !strcmp(model, "large")) bad |= run_scrambled("784,1024,1024,10", batch ? batch : 128, seconds, reps, bucket_kb);
        if (model && strcmp(model, "small") && strcmp(model, "large")) bad |= run_scrambled(model, batch ? batch : 32, seconds, reps, bucket_kb);
        return bad;
    }
    if (!model || !strcmp(model, "small")) bad |= run_model("784,256,256,10", batch ? batch : 32, seconds, reps, debug);
    if (!model || !strcmp(model, "large")) bad |= run_model("784,1024,1024,10", batch ? batch : 128, seconds, reps, debug);
    if (model && strcmp(model, "small") && strcmp(model, "large"))
        bad |= run_model(model, batch ? batch : 32, seconds, reps, debug);
    return bad;
}
