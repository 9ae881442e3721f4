#include "main_static.c"
