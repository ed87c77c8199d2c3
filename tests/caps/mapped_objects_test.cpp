// The client's owned mappings of kernel objects, without a kernel: each refuses descriptors and
// sizes that do not match what it maps (as a lying kernel could send), and a notification's pipe
// ends are re-opened as descriptions of its own that never block.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>

#include <gtest/gtest.h>

#include "agate/caps/mapped_credit_page.h"
#include "agate/caps/mapped_event_buffer.h"
#include "agate/caps/mapped_notification.h"
#include "support/watchdog.h"

namespace agate::caps {
namespace {

Fd memfdOf(size_t bytes) {
  Fd fd(::memfd_create("agate-test", MFD_CLOEXEC));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(bytes)), 0);
  return fd;
}

TEST(MappedCreditPage, RefusesAMissingDescriptorOrAPageOfAnotherSize) {
  EXPECT_EQ(MappedCreditPage::tryMap(Fd(), 4096).code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(MappedCreditPage::tryMap(memfdOf(8192), 8192).code(), Errc::PROTOCOL_ERROR);
  EXPECT_EQ(MappedCreditPage::tryMap(memfdOf(4096), 4095).code(), Errc::PROTOCOL_ERROR);
  auto page = MappedCreditPage::tryMap(memfdOf(4096), 4096);
  ASSERT_TRUE(page.ok());
  auto credit = page->tryRead();
  ASSERT_TRUE(credit.ok());
  EXPECT_EQ(*credit, kernel::BankCredit{});  // a zeroed page reads as zero credit
}

TEST(MappedEventBuffer, RefusesSlotsThatDoNotFitItsSize) {
  EXPECT_EQ(MappedEventBuffer::tryMap(Fd(), 4096, 1, false, std::nullopt).code(),
            Errc::PROTOCOL_ERROR);
  EXPECT_EQ(MappedEventBuffer::tryMap(memfdOf(4096), 4096, 0, false, std::nullopt).code(),
            Errc::PROTOCOL_ERROR);
  EXPECT_EQ(MappedEventBuffer::tryMap(memfdOf(4096), 4096, 65, false, std::nullopt).code(),
            Errc::PROTOCOL_ERROR);
  auto buffer = MappedEventBuffer::tryMap(memfdOf(4096), 4096, 64, true, std::nullopt);
  ASSERT_TRUE(buffer.ok());
  EXPECT_EQ(buffer->slots(), 64u);
  EXPECT_EQ(buffer->notification(), nullptr);
  buffer->post(63, {1, 2, 3, 4, 5, 6, 7});
  EventRecord record;
  ASSERT_TRUE(buffer->tryRead(63, record));
  EXPECT_EQ(record.words[6], 7u);
  EXPECT_EQ(kernel::postsOf(record.sequence), 1u);
}

TEST(MappedNotification, RefusesAMissingOrShortPage) {
  EXPECT_EQ(MappedNotification::tryMap(Fd(), 4096, Fd(), Fd()).code(), Errc::INVALID_ARGUMENT);
  EXPECT_EQ(MappedNotification::tryMap(memfdOf(4096), 4, Fd(), Fd()).code(),
            Errc::INVALID_ARGUMENT);
}

TEST(MappedNotification, ReopensItsPipeEndsNonBlockingSoAnotherHoldersFlagsCannotBlockIt) {
  agate::testing::Watchdog dog("non-blocking pipe ends", std::chrono::seconds(20));
  int ends[2];
  ASSERT_EQ(::pipe2(ends, O_CLOEXEC), 0);  // blocking, as the kernel hands them out
  // Another holder keeps duplicates of the same (blocking) descriptions.
  Fd otherRead(::dup(ends[0]));
  Fd otherWrite(::dup(ends[1]));
  auto n = MappedNotification::tryMap(memfdOf(4096), 4096, Fd(ends[0]), Fd(ends[1]));
  ASSERT_TRUE(n.ok());
  ASSERT_GE(n->wakeFd(), 0);
  EXPECT_NE(::fcntl(n->wakeFd(), F_GETFL) & O_NONBLOCK, 0);
  EXPECT_EQ(::fcntl(otherRead.get(), F_GETFL) & O_NONBLOCK, 0);
  n->drainWake();  // an empty pipe: returns at once instead of blocking

  // A full pipe: ringing for a wake-descriptor waiter does not block either.
  ASSERT_EQ(::fcntl(otherWrite.get(), F_SETFL, O_NONBLOCK), 0);  // only to fill it here
  const char fill[4096] = {};
  while (::write(otherWrite.get(), fill, sizeof(fill)) > 0) {
  }
  Doorbell waiter(const_cast<DoorbellWord*>(&n->word()), true, -1);
  waiter.announce(/*viaEventfd=*/true);
  n->ring();
  waiter.cancel(true);
  n->drainWake();
  char byte;
  ASSERT_EQ(::fcntl(otherRead.get(), F_SETFL, O_NONBLOCK), 0);
  EXPECT_LT(::read(otherRead.get(), &byte, 1), 0);  // drained for every holder
}

}  // namespace
}  // namespace agate::caps
