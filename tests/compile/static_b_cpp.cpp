#include "static_b.c"
