"""A SIP phone for the real-Asterisk tests: one PJSUA2 account in a process of its own.

Run by tests/asterisk/conftest.py (``Phone``) as ``python sip_phone.py --user 410 --server
127.0.0.1:5060``. It registers to Asterisk from its own loopback UDP port, then reads commands
from stdin and writes what happens to stdout, one JSON object a line:

  commands  {"op": "call", "call": "c1", "to": "sip:0299990000@127.0.0.1:5060"}
            {"op": "answer" | "hangup" | "hold", "call": "c1"}
            {"op": "dtmf", "call": "c1", "digits": "*7"}        RFC 4733, as phones send
            {"op": "xfer", "call": "c1", "to": "sip:411@..."}  blind transfer (REFER)
            {"op": "xfer_replaces", "call": "c1", "other": "c2"}  attended (REFER + Replaces)
            {"op": "quit"}
  events    {"event": "registered", "code": 200}
            {"event": "incoming", "call": "in1", "from": "..."}
            {"event": "state", "call": "c1", "state": "CONFIRMED", "code": 200}
            {"event": "xfer", "call": "c1", "code": 200, "final": true}
            {"event": "error", "op": "...", "error": "..."}

Why a process per phone: PJSUA2 allows one library instance per process, and its callbacks
must run on the thread that pumps it (``threadCnt = 0``, ``libHandleEvents`` here).
Incoming calls are answered at once unless ``--ring`` is given (then the test answers).
Like a real phone, it hangs up its own leg once Asterisk reports a transfer it asked for done
(final NOTIFY 2xx): PJSUA2 leaves that to the application.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
from typing import Any

import pjsua2 as pj

# One pump of the SIP stack, in milliseconds: short enough that a command waits little.
PUMP_MS = 20


# The events' channel: the original stdout. fd 1 itself goes to stderr, where PJSIP's start-up
# lines (printed before its log settings apply) do no harm.
EVENTS = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)


def emit(**event: Any) -> None:
    EVENTS.write(json.dumps(event) + "\n")
    EVENTS.flush()


class PhoneCall(pj.Call):  # type: ignore[misc]
    def __init__(self, phone: Phone, key: str, call_id: int = pj.PJSUA_INVALID_ID) -> None:
        super().__init__(phone, call_id)
        self.phone = phone
        self.key = key

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        emit(event="state", call=self.key, state=info.stateText, code=info.lastStatusCode)

    def onCallMediaState(self, prm: Any) -> None:
        # Audio both ways through the null sound device, so that RTP flows as on a phone.
        manager = pj.Endpoint.instance().audDevManager()
        for i, media in enumerate(self.getInfo().media):
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                audio = self.getAudioMedia(i)
                manager.getCaptureDevMedia().startTransmit(audio)
                audio.startTransmit(manager.getPlaybackDevMedia())

    def onCallTransferStatus(self, prm: Any) -> None:
        emit(event="xfer", call=self.key, code=prm.statusCode, final=prm.finalNotify)
        if prm.finalNotify and 200 <= prm.statusCode < 300:
            self.hangup(pj.CallOpParam(True))


class Phone(pj.Account):  # type: ignore[misc]
    def __init__(self, ring: bool) -> None:
        super().__init__()
        self.ring = ring
        self.calls: dict[str, PhoneCall] = {}
        self.incoming = 0

    def onRegState(self, prm: Any) -> None:
        emit(event="registered", code=prm.code)

    def onIncomingCall(self, prm: Any) -> None:
        self.incoming += 1
        key = f"in{self.incoming}"
        call = PhoneCall(self, key, prm.callId)
        self.calls[key] = call
        emit(event="incoming", call=key, **{"from": call.getInfo().remoteUri})
        op = pj.CallOpParam(True)
        op.statusCode = pj.PJSIP_SC_RINGING if self.ring else pj.PJSIP_SC_OK
        call.answer(op)

    def command(self, cmd: dict[str, Any]) -> None:
        op = cmd["op"]
        param = pj.CallOpParam(True)
        if op == "call":
            call = PhoneCall(self, cmd["call"])
            self.calls[cmd["call"]] = call
            call.makeCall(cmd["to"], param)
            return
        call = self.calls[cmd["call"]]
        if op == "answer":
            param.statusCode = pj.PJSIP_SC_OK
            call.answer(param)
        elif op == "hangup":
            call.hangup(param)
        elif op == "hold":
            call.setHold(param)
        elif op == "dtmf":
            call.dialDtmf(cmd["digits"])
        elif op == "xfer":
            call.xfer(cmd["to"], param)
        elif op == "xfer_replaces":
            call.xferReplaces(self.calls[cmd["other"]], param)
        else:
            raise ValueError(f"unknown op {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--user", required=True, help="the endpoint / AOR name in pjsip.conf")
    parser.add_argument("--server", required=True, help="Asterisk's SIP address, host:port")
    parser.add_argument("--ring", action="store_true", help="ring on incoming calls, not answer")
    parser.add_argument("--log", help="PJSIP's own log file (for post-mortems)")
    args = parser.parse_args()

    ep = pj.Endpoint()
    ep.libCreate()
    config = pj.EpConfig()
    config.uaConfig.threadCnt = 0
    config.uaConfig.mainThreadOnly = True
    config.logConfig.consoleLevel = 0  # stdout carries the JSON events only
    config.logConfig.level = 4 if args.log else 0
    if args.log:
        config.logConfig.filename = args.log
    config.medConfig.noVad = True
    ep.libInit(config)
    transport = pj.TransportConfig()
    transport.boundAddress = "127.0.0.1"
    transport.port = 0  # any free port: the phone registers its contact
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, transport)
    ep.libStart()
    ep.audDevManager().setNullDev()
    for codec in ep.codecEnum2():  # PCMU only, as the endpoints in pjsip.conf allow
        ep.codecSetPriority(codec.codecId, 255 if codec.codecId.startswith("PCMU/") else 0)

    account = pj.AccountConfig()
    account.idUri = f"sip:{args.user}@{args.server}"
    account.regConfig.registrarUri = f"sip:{args.server}"
    phone = Phone(args.ring)
    phone.create(account)

    buffer = b""
    running = True
    while running:
        ep.libHandleEvents(PUMP_MS)
        if not select.select([sys.stdin], [], [], 0)[0]:
            continue
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:  # the test went away
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                running = False
                break
            try:
                phone.command(cmd)
            except Exception as exc:  # noqa: BLE001 (reported to the test, which fails on it)
                emit(event="error", op=cmd["op"], error=str(exc))
    ep.hangupAllCalls()
    phone.setRegistration(False)
    for _ in range(10):  # let the BYEs and the un-REGISTER go out
        ep.libHandleEvents(PUMP_MS)
    # PJSUA2's Call destructors assert once the library is destroyed: leave without them.
    os._exit(0)


if __name__ == "__main__":
    main()
