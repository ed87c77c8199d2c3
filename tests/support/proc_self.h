// What this process holds, read from /proc/self: for tests that check nothing leaks.
#pragma once

#include <dirent.h>

#include <cstdio>

namespace agate::testing {

// Descriptors this process has open (the directory's own excepted); -1 if /proc is unreadable.
inline int openFdCount() {
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  int n = 0;
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') ++n;
  ::closedir(d);
  return n - 1;
}

// Memory mappings this process has (lines of /proc/self/maps); -1 if unreadable.
inline int mappingCount() {
  std::FILE* f = std::fopen("/proc/self/maps", "r");
  if (f == nullptr) return -1;
  int n = 0;
  for (int c = std::fgetc(f); c != EOF; c = std::fgetc(f))
    if (c == '\n') ++n;
  std::fclose(f);
  return n;
}

}  // namespace agate::testing
