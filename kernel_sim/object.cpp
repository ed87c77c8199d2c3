#include "agate/kernel/object.h"

#include "agate/kernel/cspace.h"
#include "agate/runtime/result.h"

namespace agate::kernel {

KernelObject::~KernelObject() {
  AGATE_ASSERT(capCount_ == 0 && capsHead_ == nullptr, "%s %lu destroyed with %u caps to it",
               objectTypeName(type_), static_cast<unsigned long>(koid_), capCount_);
}

void KernelObject::deleteAllCaps() noexcept {
  // Each erase unlinks the head; children handed around by erase name this object too and are
  // erased in turn, so the loop ends with the list empty.
  while (Slot* s = capsHead_) CSpace::erase(*s);
  AGATE_ASSERT(capCount_ == 0, "%u caps left after deleting all", capCount_);
}

void KernelObject::verifyCaps() const {
  uint32_t n = 0;
  const Slot* prev = nullptr;
  for (const Slot* s = capsHead_; s; prev = s, s = s->objNext) {
    AGATE_ASSERT(s->object == this && s->objPrev == prev, "cap list of %lu broken at slot %u",
                 static_cast<unsigned long>(koid_), s->index);
    ++n;
  }
  AGATE_ASSERT(n == capCount_, "object %lu counts %u caps, lists %u",
               static_cast<unsigned long>(koid_), capCount_, n);
}

}  // namespace agate::kernel
