/* Runs the smoke function of the other translation units. */
#include <stdio.h>
#include "smoke.h"

int main(void) {
    int r = smoke_user();
    printf("smoke: %s (%d)\n", r ? "FAIL" : "ok", r);
    return r;
}
