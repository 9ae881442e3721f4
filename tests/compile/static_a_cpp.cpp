#include "static_a.c"
