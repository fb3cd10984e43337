from twisted.application.service import ServiceMaker

engage = ServiceMaker(
    "engage appliance",
    "appliance.tap",
    "ESMTP injection, engagement tracking, spool and MX delivery",
    "engage-appliance",
)
