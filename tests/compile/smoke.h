#ifndef SMOKE_H
#define SMOKE_H
#ifdef __cplusplus
extern "C" {
#endif
int smoke_user(void);
int smoke_static_a(void);
int smoke_static_b(void);
#ifdef __cplusplus
}
#endif
#endif
