// A user's client of its own interface: the program the consumer project builds.
#include <agate/agate.h>

#include "hello.agate.h"

agate::Promise<void> session(agate::Session& s) {
  auto greeter = co_await s.open<hello::stubs::Greeter>("greeter");
  if (!greeter) co_return greeter.error();
  auto reply = co_await greeter->greet([](auto p) { p.setName("Agate"); });
  if (!reply) co_return reply.error();
  co_return {};
}

int main(int argc, char** argv) { return agate::run(argc, argv, session); }
