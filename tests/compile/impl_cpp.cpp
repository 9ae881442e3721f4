#include "impl.c"
