// RPC between real processes over SHARED channels (the shape of a bushel: a request ring and a
// reply ring in sealed memfds): calls and a pipelined chain across fork(), a server killed with
// SIGKILL mid-call (the client's pending promise fails DISCONNECTED promptly), and a client killed
// mid-call (the server cancels its running call and drops the client's exports and answers).
//
// Watchdogs: each child arms alarm() and dies with its parent (PR_SET_PDEATHSIG); the parent
// runs a Watchdog thread (created after fork) that kills the child and aborts; every await in
// the parent carries a deadline. ctest's TIMEOUT is the last resort.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <thread>

#include "rpc_harness.h"
#include "support/watchdog.h"

namespace agate::rpc::test {
namespace {

constexpr unsigned CHILD_WATCHDOG_S = 30;

// One process's end of a bushel: it sends on `out` and receives on `in`.
struct End {
  std::unique_ptr<Channel> outChannel, inChannel;
  std::unique_ptr<MessageSender> tx;
  std::unique_ptr<MessageReceiver> rx;
};

struct Bushel {
  std::unique_ptr<Channel> requests, replies;
  Fd requestsFd, repliesFd;
};

Bushel makeBushel() {
  ChannelOptions co;
  co.scope = ChannelScope::SHARED;
  co.capacityBytes = 64 * 1024;
  Bushel b;
  b.requests = std::move(Channel::create(co).value());
  b.replies = std::move(Channel::create(co).value());
  b.requestsFd = std::move(b.requests->exportFd().value());
  b.repliesFd = std::move(b.replies->exportFd().value());
  return b;
}

// Opens this process's end from the inherited descriptors: the client sends requests and
// receives replies, the server the other way round. Watches `peer`'s process on both endpoints.
End openEnd(const Bushel& b, bool client, pid_t peer) {
  End e;
  e.outChannel = std::move(
      Channel::openShared(Fd(::dup((client ? b.requestsFd : b.repliesFd).get()))).value());
  e.inChannel = std::move(
      Channel::openShared(Fd(::dup((client ? b.repliesFd : b.requestsFd).get()))).value());
  Sender s = std::move(e.outChannel->attachSender().value());
  Receiver r = std::move(e.inChannel->attachReceiver().value());
  AGATE_ASSERT(s.watchPeer(peer).ok() && r.watchPeer(peer).ok(), "watchPeer failed");
  e.tx = std::make_unique<MessageSender>(std::move(s));
  e.rx = std::make_unique<MessageReceiver>(*e.inChannel, std::move(r), rpcReceiverOptions());
  return e;
}

pid_t spawn(const std::function<int()>& body) {
  pid_t pid = ::fork();
  AGATE_ASSERT(pid >= 0, "fork failed: %d", errno);
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::alarm(CHILD_WATCHDOG_S);
    ::_exit(body());
  }
  return pid;
}

int reap(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Child: serves a Node until the client goes away. 0 when it ended with DISCONNECTED. With
// `inCallFd`, it first serves until a HANG call is running, then writes a byte there.
int serveUntilDisconnected(const Bushel& b, pid_t client, int inCallFd = -1) {
  End end = openEnd(b, /*client=*/false, client);
  EventLoop loop;
  Log log;
  Node root(0, log);
  RpcOptions options;
  options.bootstrap = &root;
  RpcConnection conn(*end.tx, *end.rx, loop, options);
  if (inCallFd >= 0) {
    Status inCall = loop.run([](EventLoop& l, Log& lg, RpcConnection& c) -> Promise<void> {
      while (lg.hanging == 0 && c.isOpen()) co_await l.sleep(std::chrono::milliseconds(1));
      co_return {};
    }(loop, log, conn));
    const char one = 1;
    if (!inCall || log.hanging == 0 || ::write(inCallFd, &one, 1) != 1) return 4;
  }
  Status st = loop.run(conn.onDisconnect());
  return st.code() == Errc::DISCONNECTED ? 0 : 3;
}

Promise<uint64_t> echoCall(RemoteCap cap, uint64_t v) {
  Request req = cap.newCall(NODE_INTERFACE_ID, ECHO, 16);
  req.initParams<Value>().setValue(v);
  Result<Response> r = co_await req.send();
  AGATE_CO_TRY(r);
  co_return r->results().getAs<Value>().getValue();
}

Promise<uint64_t> chainOfTen(RemoteCap cap, uint64_t* receivedBeforeLast, RpcConnection& conn) {
  std::optional<RemotePromise> last;
  for (int i = 0; i < 10; ++i) {
    RemotePromise p = cap.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
    cap = p.pipeline({0});
    if (i == 9) {
      *receivedBeforeLast = conn.stats().messagesReceived;
      last.emplace(std::move(p));
    }
  }
  Result<Response> r = co_await *last;
  AGATE_CO_TRY(r);
  co_return r->results().getAs<CapAndValue>().getValue();
}

TEST(RpcForkTest, CallsAndAPipelinedChainCrossProcesses) {
  Bushel b = makeBushel();
  const pid_t parent = ::getpid();
  pid_t child = spawn([&] { return serveUntilDisconnected(b, parent); });
  agate::testing::Watchdog watchdog("RpcForkTest.CallsAndAPipelinedChain", std::chrono::seconds(40),
                                    child);
  {
    End end = openEnd(b, /*client=*/true, child);
    EventLoop loop;
    RpcConnection conn(*end.tx, *end.rx, loop);
    RemoteCap root = conn.bootstrap();
    Result<uint64_t> v = loop.run(loop.deadline(echoCall(root, 42), std::chrono::seconds(10)));
    ASSERT_TRUE(v.ok()) << errcName(v.code());
    EXPECT_EQ(*v, 42u);
    uint64_t received = 99;
    Result<uint64_t> chain =
        loop.run(loop.deadline(chainOfTen(root, &received, conn), std::chrono::seconds(10)));
    ASSERT_TRUE(chain.ok()) << errcName(chain.code());
    EXPECT_EQ(*chain, 10u);
    EXPECT_EQ(received, 1u) << "only the echo's Return came back before the chain was sent";
  }  // the client's connection closes; the server sees DISCONNECTED and exits 0
  EXPECT_EQ(reap(child), 0);
}

TEST(RpcForkTest, ServerKilledMidCallFailsThePendingCallDisconnected) {
  Bushel b = makeBushel();
  int inCall[2];
  ASSERT_EQ(::pipe(inCall), 0);
  const pid_t parent = ::getpid();
  pid_t child = spawn([&] { return serveUntilDisconnected(b, parent, inCall[1]); });
  agate::testing::Watchdog watchdog("RpcForkTest.ServerKilled", std::chrono::seconds(40), child);
  ::close(inCall[1]);
  End end = openEnd(b, /*client=*/true, child);
  EventLoop loop;
  RpcConnection conn(*end.tx, *end.rx, loop);
  RemoteCap root = conn.bootstrap();
  ASSERT_EQ(loop.run(loop.deadline(echoCall(root, 1), std::chrono::seconds(10))).value(), 1u);
  RemotePromise hanging = root.newCall(NODE_INTERFACE_ID, HANG, 16).send();
  // Killed only once the server says the call is running in it.
  Result<uint32_t> running =
      loop.run(loop.deadline(loop.waitReady(inCall[0], POLLIN), std::chrono::seconds(10)));
  ASSERT_TRUE(running.ok()) << errcName(running.code());
  char byte = 0;
  ASSERT_EQ(::read(inCall[0], &byte, 1), 1) << "the server wrote that its call runs";
  ::close(inCall[0]);
  ASSERT_EQ(::kill(child, SIGKILL), 0);
  const auto start = std::chrono::steady_clock::now();
  Result<Response> r = loop.run(
      loop.deadline([](RemotePromise& p) -> Promise<Response> { co_return co_await p; }(hanging),
                    std::chrono::seconds(5)));
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(r.code(), Errc::DISCONNECTED);
  EXPECT_LT(took, std::chrono::seconds(1)) << "peer death is seen through its pidfd, promptly";
  EXPECT_FALSE(conn.isOpen());
  EXPECT_EQ(loop.run(echoCall(root, 2)).code(), Errc::DISCONNECTED);
  // Nothing of the dead peer's is kept on this side once the handles go.
  { RemotePromise gone = std::move(hanging); }
  root = RemoteCap();
  EXPECT_EQ(conn.questionCount(), 0u);
  EXPECT_EQ(conn.importCount(), 0u);
  EXPECT_EQ(conn.handleCount(), 0u);
  EXPECT_EQ(reap(child), 128 + SIGKILL);
}

TEST(RpcForkTest, ClientKilledMidCallServerCancelsAndDropsItsState) {
  Bushel b = makeBushel();
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t parent = ::getpid();
  pid_t child = spawn([&]() -> int {
    End end = openEnd(b, /*client=*/true, parent);
    EventLoop loop;
    RpcConnection conn(*end.tx, *end.rx, loop);
    RemoteCap root = conn.bootstrap();
    // Hold a child object of the server and leave a call running on it, then wait to be killed.
    Result<Response> made = loop.run([](RemoteCap c) -> Promise<Response> {
      co_return co_await c.newCall(NODE_INTERFACE_ID, NEXT, 16).send();
    }(root));
    if (!made) return 4;
    Result<ReceivedCap> held = made->getCap(0);
    if (!held) return 5;
    RemoteCap keep = std::move(held->remote);
    { Response drop = std::move(*made); }
    RemotePromise hanging = keep.newCall(NODE_INTERFACE_ID, HANG, 16).send();
    (void)loop.run(loop.sleep(std::chrono::milliseconds(20)));
    char one = 1;
    if (::write(ready[1], &one, 1) != 1) return 6;
    (void)loop.run(loop.sleep(std::chrono::seconds(25)));
    return 7;  // never reached: killed
  });
  agate::testing::Watchdog watchdog("RpcForkTest.ClientKilled", std::chrono::seconds(40), child);
  ::close(ready[1]);
  End end = openEnd(b, /*client=*/false, child);
  EventLoop loop;
  Log log;
  Node root(0, log);
  RpcOptions options;
  options.bootstrap = &root;
  RpcConnection conn(*end.tx, *end.rx, loop, options);
  // Serve until the child says its call is running (the pipe turns readable).
  Result<uint32_t> readable =
      loop.run(loop.deadline(loop.waitReady(ready[0], POLLIN), std::chrono::seconds(10)));
  ASSERT_TRUE(readable.ok()) << errcName(readable.code());
  ASSERT_TRUE(runUntil(loop, [&] { return log.hanging == 1; }));
  EXPECT_EQ(conn.exportCount(), 2u);
  ASSERT_EQ(::kill(child, SIGKILL), 0);
  Status ended = loop.run(loop.deadline(conn.onDisconnect(), std::chrono::seconds(5)));
  EXPECT_EQ(ended.code(), Errc::DISCONNECTED);
  ASSERT_TRUE(runUntil(loop, [&] { return conn.answerCount() == 0; }));
  EXPECT_EQ(log.cancelled, 1) << "the running call was cancelled";
  EXPECT_EQ(log.destroyed, 1) << "the object the client held was destroyed";
  EXPECT_EQ(conn.exportCount(), 0u);
  EXPECT_EQ(reap(child), 128 + SIGKILL);
  ::close(ready[0]);
}

}  // namespace
}  // namespace agate::rpc::test
