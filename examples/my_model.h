/* my_model.h - the "your model" of examples/minimal.c: a softmax regression
   (one linear layer, 784 inputs, 10 classes, cross-entropy) on synthetic
   data, with a plain C forward and backward. It stands for your own code;
   ddp.h never sees inside it. A teacher matrix labels random inputs, so the
   task is learnable and the loss falls from ln(10) = 2.30.

   my_shard(rank, world, step) is this rank's slice of the step's global
   batch of MY_BATCH rows (every rank draws the same batch, a function of
   the step, and keeps rows [rank * B / world, (rank + 1) * B / world)).
   The backward functions ADD world * rows / B times the gradient of the
   shard's mean loss: ddp averages over ranks, which then gives the gradient
   of the mean over the whole global batch (1 when B divides by world). */
#ifndef MY_MODEL_H
#define MY_MODEL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define MY_IN 784
#define MY_OUT 10
#define MY_BATCH 64

typedef struct batch {
    float x[MY_BATCH][MY_IN];
    int   y[MY_BATCH];
    int   rows;              /* this rank's rows */
    float scale;             /* world * rows / MY_BATCH */
    float p[MY_BATCH][MY_OUT]; /* softmax of the last forward */
} batch;

static uint64_t my__next(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float my__uniform(uint64_t *s) { return (float)(my__next(s) >> 40) / 16777216.0f * 2.0f - 1.0f; }

/* initial weights: small, deterministic (the same on every rank anyway:
   rank 0's values win at ddp_finalize) */
static const float *init_w(void) {
    static float w[MY_OUT * MY_IN];
    uint64_t s = 42;
    int i;
    for (i = 0; i < MY_OUT * MY_IN; i++) w[i] = 0.01f * my__uniform(&s);
    return w;
}

static const batch *my_shard(int rank, int world, int step) {
    static batch b;
    static float teacher[MY_OUT][MY_IN];
    float row[MY_IN];
    uint64_t s = 7;
    int i, j, c, lo = MY_BATCH * rank / world, hi = MY_BATCH * (rank + 1) / world;
    for (c = 0; c < MY_OUT; c++)
        for (j = 0; j < MY_IN; j++) teacher[c][j] = my__uniform(&s);
    s = 1000 + (uint64_t)step;
    b.rows = hi - lo;
    b.scale = (float)world * (float)b.rows / (float)MY_BATCH;
    for (i = 0; i < MY_BATCH; i++) {
        float best = -1e30f;
        int label = 0;
        for (j = 0; j < MY_IN; j++) row[j] = my__uniform(&s);
        if (i < lo || i >= hi) continue;
        for (c = 0; c < MY_OUT; c++) {
            float z = 0;
            for (j = 0; j < MY_IN; j++) z += teacher[c][j] * row[j];
            if (z > best) { best = z; label = c; }
        }
        memcpy(b.x[i - lo], row, sizeof row);
        b.y[i - lo] = label;
    }
    return &b;
}

/* z = W x + b, p = softmax(z); returns the shard's mean cross-entropy */
static float my_forward(const void *w_, const void *b_, const batch *x_) {
    const float *w = (const float *)w_, *bias = (const float *)b_;
    batch *x = (batch *)x_;
    double loss = 0;
    int i, j, c;
    for (i = 0; i < x->rows; i++) {
        float z[MY_OUT], m = -1e30f, sum = 0;
        for (c = 0; c < MY_OUT; c++) {
            z[c] = bias[c];
            for (j = 0; j < MY_IN; j++) z[c] += w[c * MY_IN + j] * x->x[i][j];
            if (z[c] > m) m = z[c];
        }
        for (c = 0; c < MY_OUT; c++) { z[c] = expf(z[c] - m); sum += z[c]; }
        for (c = 0; c < MY_OUT; c++) x->p[i][c] = z[c] / sum;
        loss -= log(x->p[i][x->y[i]] > 1e-30f ? x->p[i][x->y[i]] : 1e-30f);
    }
    return x->rows ? (float)(loss / x->rows) : 0.0f;
}

/* dL/dz = (p - onehot(y)) / rows, scaled; the bias gradient is its sum over rows */
static void my_backward_bias(void *g_, const batch *x) {
    float *g = (float *)g_;
    int i, c;
    for (i = 0; i < x->rows; i++)
        for (c = 0; c < MY_OUT; c++)
            g[c] += x->scale * (x->p[i][c] - (c == x->y[i])) / (float)x->rows;
}

static void my_backward_weight(void *g_, const batch *x) {
    float *g = (float *)g_;
    int i, j, c;
    for (i = 0; i < x->rows; i++)
        for (c = 0; c < MY_OUT; c++) {
            float d = x->scale * (x->p[i][c] - (c == x->y[i])) / (float)x->rows;
            for (j = 0; j < MY_IN; j++) g[c * MY_IN + j] += d * x->x[i][j];
        }
}

#endif
