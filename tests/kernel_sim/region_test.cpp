// Region calls through the Kernel: real memfds, mapping rights, write sealing, descriptors
// closed on destroy. The cross-process read-only guarantee is tested in
// tests/integration/region_readonly_test.cpp.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <gtest/gtest.h>

#include "kernel_test_util.h"

namespace agate::kernel::test {
namespace {

TEST(RegionTest, RegionIsASealedMemfdOfItsPages) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle r = handleOf(k.tryCreateRegion(p.pid, p.bank, 3));
  auto m = k.tryMapRegion(p.pid, r, true);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->bytes, 3 * PAGE_BYTES);
  EXPECT_TRUE(m->writable);
  struct stat st {};
  ASSERT_EQ(::fstat(m->fd.get(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 3 * PAGE_BYTES);
  const int seals = ::fcntl(m->fd.get(), F_GET_SEALS);
  EXPECT_EQ(seals & (F_SEAL_GROW | F_SEAL_SHRINK), F_SEAL_GROW | F_SEAL_SHRINK);
  EXPECT_EQ(seals & F_SEAL_FUTURE_WRITE, 0) << "open for writers until the first reader";
  EXPECT_NE(::ftruncate(m->fd.get(), 0), 0);
}

TEST(RegionTest, WritersMapBeforeTheFirstReaderSealsAndLaterWritersAreRefused) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle r = handleOf(k.tryCreateRegion(p.pid, p.bank, 1));
  auto w = k.tryMapRegion(p.pid, r, true);
  ASSERT_TRUE(w.ok());
  void* wp = ::mmap(nullptr, PAGE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, w->fd.get(), 0);
  ASSERT_NE(wp, MAP_FAILED);
  Handle ro = handleOf(k.tryCopyCap(p.pid, r, Rights::READ));
  auto rd = k.tryMapRegion(p.pid, ro, false);
  ASSERT_TRUE(rd.ok());
  EXPECT_FALSE(rd->writable);
  EXPECT_NE(::fcntl(rd->fd.get(), F_GET_SEALS) & F_SEAL_FUTURE_WRITE, 0);
  void* rp = ::mmap(nullptr, PAGE_BYTES, PROT_READ, MAP_SHARED, rd->fd.get(), 0);
  ASSERT_NE(rp, MAP_FAILED);
  static_cast<char*>(wp)[5] = 'x';
  EXPECT_EQ(static_cast<const char*>(rp)[5], 'x') << "the writer's mapping still writes";
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapRegion(p.pid, r, true), Errc::PERMISSION_DENIED);
  EXPECT_TRUE(k.tryMapRegion(p.pid, ro, false).ok()) << "readers may map again";
  ::munmap(wp, PAGE_BYTES);
  ::munmap(rp, PAGE_BYTES);
}

TEST(RegionTest, MappingNeedsTheRightsAndARegionCap) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle r = handleOf(k.tryCreateRegion(p.pid, p.bank, 1));
  Handle ro = handleOf(k.tryCopyCap(p.pid, r, Rights::READ));
  Handle none = handleOf(k.tryCopyCap(p.pid, r, Rights::GRANT));
  Handle wo = handleOf(k.tryCopyCap(p.pid, r, Rights::WRITE));
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapRegion(p.pid, ro, true), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapRegion(p.pid, none, false), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapRegion(p.pid, wo, true), Errc::PERMISSION_DENIED);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapRegion(p.pid, p.bank, false), Errc::WRONG_TYPE);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapRegion(p.pid + 1, r, false), Errc::NOT_FOUND);
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapRegion(p.pid, Handle{}, false), Errc::INVALID_HANDLE);
}

TEST(RegionTest, AWriterThatSealsTheSealsGetsReadersRefused) {
  Kernel k;
  Proc p = attach(k, 100);
  Handle r = handleOf(k.tryCreateRegion(p.pid, p.bank, 1));
  auto w = k.tryMapRegion(p.pid, r, true);
  ASSERT_TRUE(w.ok());
  ASSERT_EQ(::fcntl(w->fd.get(), F_ADD_SEALS, F_SEAL_SEAL), 0) << "a hostile writer";
  EXPECT_REFUSED_UNCHANGED(k, k.tryMapRegion(p.pid, r, false), Errc::PERMISSION_DENIED);
  EXPECT_TRUE(k.tryMapRegion(p.pid, r, true).ok()) << "still open for writers";
}

TEST(RegionTest, DestroyAndDeathCloseTheKernelsDescriptors) {
  Kernel k;
  Proc p = attach(k, 1000);
  const size_t before = countOpenFds();
  const uint64_t used = usedOf(k, p.pid, p.bank);
  Handle r = handleOf(k.tryCreateRegion(p.pid, p.bank, 4));
  for (int i = 0; i < 5; ++i) (void)handleOf(k.tryCreateRegion(p.pid, p.bank, 2));
  EXPECT_EQ(countOpenFds(), before + 6);
  ASSERT_TRUE(k.tryDestroyObject(p.pid, r).ok());
  EXPECT_EQ(countOpenFds(), before + 5);
  ASSERT_TRUE(k.tryKillProcess(p.pid).ok());
  EXPECT_EQ(countOpenFds(), before);
  (void)used;
}

TEST(RegionTest, QuotaRefusalMakesNoMemfd) {
  Kernel k;
  Proc p = attach(k, 10);
  const size_t before = countOpenFds();
  EXPECT_REFUSED_UNCHANGED(k, k.tryCreateRegion(p.pid, p.bank, 100), Errc::QUOTA_EXCEEDED);
  EXPECT_EQ(countOpenFds(), before);
}

}  // namespace
}  // namespace agate::kernel::test
