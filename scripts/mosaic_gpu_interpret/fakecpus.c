// Reports 16 schedulable CPUs. GPU interpret mode runs each simulated
// warpgroup in XLA's CPU worker pool and blocks there on barriers; with the
// pool sized to a 2-core machine, two waiting warpgroups starve the third
// (a hang that is the harness's, not the kernel's).
#define _GNU_SOURCE
#include <sched.h>
#include <string.h>
#include <unistd.h>

int sched_getaffinity(pid_t pid, size_t size, cpu_set_t *mask) {
  (void)pid;
  memset(mask, 0, size);
  for (int i = 0; i < 16; i++) CPU_SET_S(i, size, mask);
  return 0;
}

long sysconf(int name) {
  extern long __sysconf(int);
  if (name == _SC_NPROCESSORS_ONLN || name == _SC_NPROCESSORS_CONF) return 16;
  return __sysconf(name);
}

int get_nprocs(void) { return 16; }
int get_nprocs_conf(void) { return 16; }
