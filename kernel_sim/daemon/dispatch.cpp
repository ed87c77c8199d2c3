// The decode boundary's router: one Syscall to one handler (see syscalls.h for the contract).
#include "syscalls.h"

namespace agate::kernel::daemon {

void CallContext::fail(const Error& e) {
  auto error = reply.initError();
  error.setCode(static_cast<uint16_t>(e.code));
  error.setDetail(e.detail);
}

void dispatch(CallContext& ctx, wire::Syscall::Reader call) {
  using W = wire::Syscall;
  switch (call.which()) {
    case W::NONE:
      return ctx.fail(Error(Errc::INVALID_ARGUMENT, "a syscall names no call"));
    case W::COPY_CAP:
      return copyCap(ctx, call.getCopyCap());
    case W::DELETE_CAP:
      return deleteCap(ctx, call.getDeleteCap());
    case W::REVOKE_CAP:
      return revokeCap(ctx, call.getRevokeCap());
    case W::TRANSFER_CAP:
      return transferCap(ctx, call.getTransferCap());
    case W::INSPECT_CAP:
      return inspectCap(ctx, call.getInspectCap());
    case W::CREATE_BANK:
      return createBank(ctx, call.getCreateBank());
    case W::SET_BANK_LIMIT:
      return setBankLimit(ctx, call.getSetBankLimit());
    case W::READ_BANK:
      return readBank(ctx, call.getReadBank());
    case W::DESTROY_OBJECT:
      return destroyObject(ctx, call.getDestroyObject());
    case W::CREATE_REGION:
      return createRegion(ctx, call.getCreateRegion());
    case W::MAP_REGION:
      return mapRegion(ctx, call.getMapRegion());
    case W::GRANT_REGISTRY:
      return grantRegistry(ctx, call.getGrantRegistry());
    case W::REGISTER_SERVICE:
      return registerService(ctx, call.getRegisterService());
    case W::LOOKUP_SERVICE:
      return lookupService(ctx, call.getLookupService());
    case W::OPEN_BUSHEL:
      return openBushel(ctx, call.getOpenBushel());
    case W::BUSHEL_FDS:
      return bushelFds(ctx, call.getBushelFds());
    case W::LIST_PROCESSES:
      return listProcesses(ctx);
    case W::LIST_BANKS:
      return listBanks(ctx);
    case W::LIST_CAPS:
      return listCaps(ctx, call.getListCaps());
    case W::CREATE_NOTIFICATION:
      return createNotification(ctx, call.getCreateNotification());
    case W::NOTIFICATION_FDS:
      return notificationFds(ctx, call.getNotificationFds());
    case W::SIGNAL:
      return signalNotification(ctx, call.getSignal());
    case W::BIND_BANK_NOTIFICATION:
      return bindBankNotification(ctx, call.getBindBankNotification());
    case W::UNBIND_BANK_NOTIFICATION:
      return unbindBankNotification(ctx, call.getUnbindBankNotification());
    case W::CREATE_EVENT_BUFFER:
      return createEventBuffer(ctx, call.getCreateEventBuffer());
    case W::MAP_EVENT_BUFFER:
      return mapEventBuffer(ctx, call.getMapEventBuffer());
    case W::MAP_BANK_CREDIT:
      return mapBankCredit(ctx, call.getMapBankCredit());
    case W::LIST_PROCESSES_PAGE:
      return listProcessesPage(ctx, call.getListProcessesPage());
    case W::LIST_BANKS_PAGE:
      return listBanksPage(ctx, call.getListBanksPage());
    case W::LIST_CAPS_PAGE:
      return listCapsPage(ctx, call.getListCapsPage());
    case W::GROW_BUSHEL_STATE:
      return growBushelState(ctx, call.getGrowBushelState());
    case W::INTRODUCE:
      return introduce(ctx, call.getIntroduce());
    case W::OPEN_BUSHEL_VIA:
      return openBushelVia(ctx, call.getOpenBushelVia());
    case W::CLOSE_BUSHEL:
      return closeBushel(ctx, call.getCloseBushel());
    case W::SET_RECEIVE_LIMIT:
      return setReceiveLimit(ctx, call.getSetReceiveLimit());
  }
  // A discriminant from a newer schema (or a forged one).
  ctx.fail(Error(Errc::INVALID_ARGUMENT, "unknown syscall"));
}

}  // namespace agate::kernel::daemon
