/* Two DDP_STATIC copies of the implementation linked into one program. */
#include <stdio.h>
#include "smoke.h"

int main(void) {
    int a = smoke_static_a(), b = smoke_static_b();
    printf("static: %s (%d %d)\n", a || b ? "FAIL" : "ok", a, b);
    return a || b;
}
