// Driver of suite `messages`: `bench/run messages [--json FILE] [--quick] ...` (bench/README.md).
//
// What building and decoding a Cap'n Proto frame with runtime/message.h costs: FrameBuilder into a
// frame, FrameReader IN_PLACE and COPY_IN, beside a memcpy of the frame (the floor: the copy
// COPY_IN makes) and Cap'n Proto's own lazy reader (the peer: no eager validation).
#include <span>

#include "messages/messages.h"
#include "support/scenario.h"

int main(int argc, char** argv) {
  return agate::bench::runSuiteMain("messages", agate::bench::messages::frameScenarios(), argc,
                                    argv);
}
