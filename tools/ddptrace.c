/* ddptrace - draw ddp.h timelines (Chrome trace-event JSON, DDP_TRACE) as
   an SVG picture: one lane per rank and thread (your thread: the steps,
   marks, waits, the optimizer; the communication thread: each bucket's
   reduction), a time axis and a legend. C99, no dependencies.

       ddptrace [options] TRACE.json... > timeline.svg

       -o FILE          write the SVG there (default: standard output)
       --steps A:B      from the start of step A to the end of step B (the
                        "step N" events of the first rank; default: all)
       --from MS --to MS    the window in milliseconds after the first event
       --width PX       picture width (default 1400)
       --title TEXT     a title line

   Reads the JSON array form and the {"traceEvents": [...]} object form; the
   events it draws are the complete ("X") and instant ("i") ones, placed by
   pid (the rank) and tid; metadata ("M") names the lanes. Exit status 1 on
   a file it cannot read or parse (the message names the file and offset). */
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a small JSON reader (values, no recursion limit issues: depth <= 64) ---- */

enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct jv {
    int type;
    double num;
    char *str;
    struct jv *kid;      /* array elements / object values */
    char **key;          /* object keys */
    int n, cap;
} jv;

typedef struct jp {
    const char *s, *file;
    size_t i, n;
    char err[256];
} jp;

static int jfail(jp *p, const char *what) {
    if (!p->err[0]) snprintf(p->err, sizeof p->err, "%s: %s at byte %zu", p->file, what, p->i);
    return 0;
}

static void jws(jp *p) { while (p->i < p->n && isspace((unsigned char)p->s[p->i])) p->i++; }

static int jstr(jp *p, char **out) {
    size_t cap = 16, len = 0;
    char *b;
    if (p->i >= p->n || p->s[p->i] != '"') return jfail(p, "expected a string");
    p->i++;
    b = (char *)malloc(cap);
    if (!b) return jfail(p, "out of memory");
    while (p->i < p->n && p->s[p->i] != '"') {
        char c = p->s[p->i++];
        if (c == '\\') {
            if (p->i >= p->n) break;
            c = p->s[p->i++];
            switch (c) {
            case 'n': c = '\n'; break;
            case 't': c = '\t'; break;
            case 'r': c = '\r'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'u': {
                unsigned v = 0;
                int k;
                for (k = 0; k < 4 && p->i < p->n; k++) {
                    char h = p->s[p->i++];
                    v = v * 16 + (unsigned)(isdigit((unsigned char)h) ? h - '0' : (tolower((unsigned char)h) - 'a' + 10) & 15);
                }
                c = v < 128 ? (char)v : '?';
                break;
            }
            default: break;
            }
        }
        if (len + 2 > cap) {
            char *nb = (char *)realloc(b, cap *= 2);
            if (!nb) { free(b); return jfail(p, "out of memory"); }
            b = nb;
        }
        b[len++] = c;
    }
    if (p->i >= p->n) { free(b); return jfail(p, "unterminated string"); }
    p->i++;
    b[len] = 0;
    *out = b;
    return 1;
}

static int jval(jp *p, jv *v, int depth);

static int jadd(jp *p, jv *v, char *key, jv *kid) {
    if (v->n == v->cap) {
        int cap = v->cap ? v->cap * 2 : 8;
        jv *nk = (jv *)realloc(v->kid, (size_t)cap * sizeof *nk);
        char **nkey;
        if (!nk) return jfail(p, "out of memory");
        v->kid = nk;
        nkey = (char **)realloc(v->key, (size_t)cap * sizeof *nkey);
        if (!nkey) return jfail(p, "out of memory");
        v->key = nkey;
        v->cap = cap;
    }
    v->kid[v->n] = *kid;
    v->key[v->n] = key;
    v->n++;
    return 1;
}

static int jval(jp *p, jv *v, int depth) {
    memset(v, 0, sizeof *v);
    jws(p);
    if (depth > 64) return jfail(p, "nested too deeply");
    if (p->i >= p->n) return jfail(p, "unexpected end");
    switch (p->s[p->i]) {
    case '{':
    case '[': {
        int obj = p->s[p->i] == '{';
        char close = obj ? '}' : ']';
        v->type = obj ? J_OBJ : J_ARR;
        p->i++;
        jws(p);
        if (p->i < p->n && p->s[p->i] == close) { p->i++; return 1; }
        for (;;) {
            jv kid;
            char *key = NULL;
            jws(p);
            if (obj) {
                if (!jstr(p, &key)) return 0;
                jws(p);
                if (p->i >= p->n || p->s[p->i] != ':') { free(key); return jfail(p, "expected ':'"); }
                p->i++;
            }
            if (!jval(p, &kid, depth + 1)) { free(key); return 0; }
            if (!jadd(p, v, key, &kid)) return 0;
            jws(p);
            /* the array form may end without its ']' (a trace cut short): accept the end */
            if (p->i >= p->n && !obj && depth == 0) return 1;
            if (p->i >= p->n) return jfail(p, "unexpected end");
            if (p->s[p->i] == ',') { p->i++; continue; }
            if (p->s[p->i] == close) { p->i++; return 1; }
            return jfail(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    case '"':
        v->type = J_STR;
        return jstr(p, &v->str);
    case 't':
    case 'f':
    case 'n': {
        const char *w = p->s[p->i] == 't' ? "true" : p->s[p->i] == 'f' ? "false" : "null";
        size_t l = strlen(w);
        if (p->i + l > p->n || strncmp(p->s + p->i, w, l)) return jfail(p, "bad literal");
        p->i += l;
        v->type = w[0] == 'n' ? J_NULL : J_BOOL;
        v->num = w[0] == 't';
        return 1;
    }
    default: {
        char *end;
        char buf[64];
        size_t k = 0;
        while (p->i + k < p->n && k < sizeof buf - 1 && strchr("+-0123456789.eE", p->s[p->i + k])) { buf[k] = p->s[p->i + k]; k++; }
        buf[k] = 0;
        v->num = strtod(buf, &end);
        if (k == 0 || *end) return jfail(p, "bad number");
        p->i += k;
        v->type = J_NUM;
        return 1;
    }
    }
}

static const jv *jget(const jv *o, const char *key) {
    int i;
    if (!o || o->type != J_OBJ) return NULL;
    for (i = 0; i < o->n; i++) if (!strcmp(o->key[i], key)) return &o->kid[i];
    return NULL;
}

static double jnum(const jv *o, const char *key, double def) {
    const jv *v = jget(o, key);
    return v && v->type == J_NUM ? v->num : def;
}

static const char *jtext(const jv *o, const char *key) {
    const jv *v = jget(o, key);
    return v && v->type == J_STR ? v->str : "";
}

/* ---- events and lanes ---- */

typedef struct ev {
    double ts, dur;          /* microseconds; dur < 0: an instant */
    int pid, tid, bucket;
    double bytes;
    char name[96], cat[24];
} ev;

typedef struct lane { int pid, tid; char label[96]; } lane;

static ev *g_ev;
static int g_nev, g_capev;
static lane g_lane[256];
static int g_nlane;

static int lane_of(int pid, int tid) {
    int i;
    for (i = 0; i < g_nlane; i++) if (g_lane[i].pid == pid && g_lane[i].tid == tid) return i;
    if (g_nlane == 256) return -1;
    g_lane[g_nlane].pid = pid;
    g_lane[g_nlane].tid = tid;
    snprintf(g_lane[g_nlane].label, sizeof g_lane[g_nlane].label, "rank %d %s", pid, tid == 1 ? "communication" : tid == 0 ? "main" : "thread");
    return g_nlane++;
}

static int cmp_lane(const void *a, const void *b) {
    const lane *x = (const lane *)a, *y = (const lane *)b;
    return x->pid != y->pid ? (x->pid > y->pid) - (x->pid < y->pid) : (x->tid > y->tid) - (x->tid < y->tid);
}

static void take(const jv *e) {
    const char *ph = jtext(e, "ph");
    const jv *args = jget(e, "args");
    int pid = (int)jnum(e, "pid", 0), tid = (int)jnum(e, "tid", 0);
    ev *x;
    if (!strcmp(ph, "M")) {
        int l;
        if (strcmp(jtext(e, "name"), "thread_name") || !args) return;
        l = lane_of(pid, tid);
        if (l >= 0) snprintf(g_lane[l].label, sizeof g_lane[l].label, "rank %d %s", pid, jtext(args, "name"));
        return;
    }
    if (strcmp(ph, "X") && strcmp(ph, "i") && strcmp(ph, "I")) return;
    if (lane_of(pid, tid) < 0) return;
    if (g_nev == g_capev) {
        int cap = g_capev ? g_capev * 2 : 4096;
        ev *n = (ev *)realloc(g_ev, (size_t)cap * sizeof *n);
        if (!n) { fprintf(stderr, "ddptrace: out of memory\n"); exit(1); }
        g_ev = n;
        g_capev = cap;
    }
    x = &g_ev[g_nev++];
    x->ts = jnum(e, "ts", 0);
    x->dur = ph[0] == 'X' ? jnum(e, "dur", 0) : -1;
    x->pid = pid;
    x->tid = tid;
    x->bucket = (int)jnum(args, "bucket", -1);
    x->bytes = jnum(args, "bytes", -1);
    snprintf(x->name, sizeof x->name, "%s", jtext(e, "name"));
    snprintf(x->cat, sizeof x->cat, "%s", jtext(e, "cat"));
}

static void jfree(jv *v) {
    int i;
    for (i = 0; i < v->n; i++) { jfree(&v->kid[i]); free(v->key[i]); }
    free(v->kid);
    free(v->key);
    free(v->str);
}

static void read_trace(const char *path) {
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;
    jp p;
    jv root;
    const jv *arr;
    int i;
    if (!f) { fprintf(stderr, "ddptrace: cannot open %s\n", path); exit(1); }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = (char *)malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) { fprintf(stderr, "ddptrace: cannot read %s\n", path); exit(1); }
    fclose(f);
    memset(&p, 0, sizeof p);
    p.s = buf;
    p.n = (size_t)n;
    p.file = path;
    if (!jval(&p, &root, 0)) { fprintf(stderr, "ddptrace: %s\n", p.err); exit(1); }
    arr = root.type == J_ARR ? &root : jget(&root, "traceEvents");
    if (!arr || arr->type != J_ARR) { fprintf(stderr, "ddptrace: %s: no array of trace events\n", path); exit(1); }
    for (i = 0; i < arr->n; i++) if (arr->kid[i].type == J_OBJ) take(&arr->kid[i]);
    jfree(&root);
    free(buf);
}

/* ---- drawing ---- */

static const char *const palette[] = { "#4c78a8", "#f58518", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d", "#ff9da6", "#17becf" };

static const char *color_of(const ev *e) {
    if (!strncmp(e->name, "step", 4)) return "#dfe5ec";
    if (!strncmp(e->name, "wait", 4)) return "#e45756";
    if (!strcmp(e->name, "optimizer")) return "#54a24b";
    if (!strncmp(e->name, "parameter all-gather", 20)) return "#88d27a";
    if (!strncmp(e->name, "checkpoint", 10)) return "#8c6d31";
    if (e->bucket >= 0) return palette[e->bucket % 8];
    return "#bab0ac";
}

static void xml_text(FILE *f, const char *s) {
    for (; *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else if (*s == '"') fputs("&quot;", f);
        else fputc(*s, f);
    }
}

static double nice_step(double span_ms) {
    double raw = span_ms / 10, p = pow(10, floor(log10(raw > 0 ? raw : 1e-3))), m = raw / p;
    return (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * p;
}

int main(int argc, char **argv) {
    const char *out = NULL, *title = NULL;
    double from = -1, to = -1, t0 = 1e300, t1 = -1e300, width = 1400, left = 190, right = 20, lane_h = 30, top = 50;
    int sa = -1, sb = -1, i, nfiles = 0;
    FILE *f;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: ddptrace [-o FILE] [--steps A:B] [--from MS --to MS] [--width PX] [--title TEXT] TRACE.json...\n");
            return 0;
        }
        if (a[0] == '-' && a[1]) {
            if (!v) { fprintf(stderr, "ddptrace: %s needs a value\n", a); return 1; }
            i++;
            if (!strcmp(a, "-o")) out = v;
            else if (!strcmp(a, "--steps")) { if (sscanf(v, "%d:%d", &sa, &sb) != 2 || sa > sb) { fprintf(stderr, "ddptrace: --steps A:B\n"); return 1; } }
            else if (!strcmp(a, "--from")) from = atof(v);
            else if (!strcmp(a, "--to")) to = atof(v);
            else if (!strcmp(a, "--width")) width = atof(v);
            else if (!strcmp(a, "--title")) title = v;
            else { fprintf(stderr, "ddptrace: unknown option %s\n", a); return 1; }
            continue;
        }
        read_trace(a);
        nfiles++;
    }
    if (!nfiles) { fprintf(stderr, "ddptrace: no trace file (try --help)\n"); return 1; }
    if (!g_nev) { fprintf(stderr, "ddptrace: no events to draw\n"); return 1; }
    qsort(g_lane, (size_t)g_nlane, sizeof *g_lane, cmp_lane);
    for (i = 0; i < g_nev; i++) {
        double e = g_ev[i].ts + (g_ev[i].dur > 0 ? g_ev[i].dur : 0);
        if (g_ev[i].ts < t0) t0 = g_ev[i].ts;
        if (e > t1) t1 = e;
    }
    if (sa >= 0) {
        /* the steps of the first lane's rank */
        double a = 1e300, b = -1e300;
        for (i = 0; i < g_nev; i++) {
            int k;
            if (g_ev[i].pid != g_lane[0].pid || strncmp(g_ev[i].name, "step ", 5) || g_ev[i].dur < 0) continue;
            k = atoi(g_ev[i].name + 5);
            if (k == sa && g_ev[i].ts < a) a = g_ev[i].ts;
            if (k == sb && g_ev[i].ts + g_ev[i].dur > b) b = g_ev[i].ts + g_ev[i].dur;
        }
        if (a >= b) { fprintf(stderr, "ddptrace: steps %d..%d are not in the trace\n", sa, sb); return 1; }
        t0 = a;
        t1 = b;
    } else {
        double base = t0;
        if (from >= 0) t0 = base + from * 1e3;
        if (to > 0) t1 = base + to * 1e3;
    }
    if (t1 <= t0) t1 = t0 + 1;
    f = out ? fopen(out, "w") : stdout;
    if (!f) { fprintf(stderr, "ddptrace: cannot write %s\n", out); return 1; }
    {
        double plot = width - left - right, span = t1 - t0, h = top + g_nlane * lane_h + 70;
        double step_ms = nice_step(span / 1e3), tick;
        fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">\n", width, h);
        fprintf(f, "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
        fprintf(f, "<text x=\"10\" y=\"20\" font-size=\"14\" font-weight=\"bold\">");
        xml_text(f, title ? title : "ddp.h timeline");
        fprintf(f, "</text>\n<text x=\"10\" y=\"38\" fill=\"#555\">%.3f ms shown; hover a box for its name, duration and bytes</text>\n", span / 1e3);
        for (i = 0; i < g_nlane; i++) {
            double y = top + i * lane_h;
            fprintf(f, "<g class=\"lane\"><rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"/>", left, y, plot, lane_h - 4,
                    i % 2 ? "#fafafa" : "#f3f3f3");
            fprintf(f, "<text x=\"8\" y=\"%.1f\">", y + lane_h / 2 + 1);
            xml_text(f, g_lane[i].label);
            fprintf(f, "</text></g>\n");
        }
        /* boxes: steps first (underneath), then the rest */
        {
            int pass;
            for (pass = 0; pass < 2; pass++)
                for (i = 0; i < g_nev; i++) {
                    const ev *e = &g_ev[i];
                    int l, is_step = !strncmp(e->name, "step", 4);
                    double a, b, y;
                    if (e->dur < 0 || is_step != (pass == 0)) continue;
                    a = e->ts;
                    b = e->ts + e->dur;
                    if (b < t0 || a > t1) continue;
                    if (a < t0) a = t0;
                    if (b > t1) b = t1;
                    for (l = 0; l < g_nlane; l++) if (g_lane[l].pid == e->pid && g_lane[l].tid == e->tid) break;
                    y = top + l * lane_h + (is_step ? 0 : 4);
                    fprintf(f, "<rect class=\"ev\" x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.1f\" fill=\"%s\"><title>",
                            left + (a - t0) / span * plot, y, (b - a) / span * plot > 0.3 ? (b - a) / span * plot : 0.3,
                            is_step ? lane_h - 4 : lane_h - 12, color_of(e));
                    xml_text(f, e->name);
                    fprintf(f, ": %.3f ms", e->dur / 1e3);
                    if (e->bytes >= 0) fprintf(f, ", %.0f bytes", e->bytes);
                    fprintf(f, "</title></rect>\n");
                    if ((b - a) / span * plot > 8 * (double)strlen(e->name) && !is_step) {
                        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"10\" fill=\"white\">", left + (a - t0) / span * plot + 2, y + lane_h / 2 - 2);
                        xml_text(f, e->name);
                        fprintf(f, "</text>\n");
                    }
                }
        }
        /* instants: marks and launches as ticks at the top of their lane */
        for (i = 0; i < g_nev; i++) {
            const ev *e = &g_ev[i];
            int l;
            double x;
            if (e->dur >= 0 || e->ts < t0 || e->ts > t1) continue;
            for (l = 0; l < g_nlane; l++) if (g_lane[l].pid == e->pid && g_lane[l].tid == e->tid) break;
            x = left + (e->ts - t0) / span * plot;
            fprintf(f, "<line class=\"mark\" x1=\"%.2f\" x2=\"%.2f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"1.5\"><title>",
                    x, x, top + l * lane_h, top + l * lane_h + (strncmp(e->name, "launch", 6) ? 6 : 12),
                    strncmp(e->name, "launch", 6) ? "#333" : color_of(e));
            xml_text(f, e->name);
            fprintf(f, "</title></line>\n");
        }
        /* the time axis */
        {
            double ya = top + g_nlane * lane_h + 4;
            fprintf(f, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>\n", left, left + plot, ya, ya);
            for (tick = 0; tick <= span / 1e3 + 1e-9; tick += step_ms) {
                double x = left + tick * 1e3 / span * plot;
                fprintf(f, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/><text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"10\">%g ms</text>\n",
                        x, x, ya, ya + 4, x, ya + 16, tick);
            }
            /* the legend */
            {
                static const char *const names[] = { "step (your forward/backward)", "wait for buckets (exposed)", "optimizer",
                                                     "ZeRO-1 all-gather", "bucket 0 reduction", "bucket 1", "bucket 2", "bucket 3" };
                static const char *const colors[] = { "#dfe5ec", "#e45756", "#54a24b", "#88d27a", "#4c78a8", "#f58518", "#72b7b2", "#b279a2" };
                double x = left;
                int k;
                for (k = 0; k < 8; k++) {
                    fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"12\" fill=\"%s\" stroke=\"#999\"/><text x=\"%.1f\" y=\"%.1f\" font-size=\"11\">%s</text>\n",
                            x, ya + 28, colors[k], x + 16, ya + 38, names[k]);
                    x += 30 + 6.2 * (double)strlen(names[k]);
                }
            }
        }
        fprintf(f, "</svg>\n");
    }
    if (out) fclose(f);
    free(g_ev);
    return 0;
}
