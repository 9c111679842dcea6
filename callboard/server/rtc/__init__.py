"""Rooms with media: `/rtc` signalling, WebRTC through aiortc, and the live room model.

- `model`: `LiveRoom` (participants, publications, subscriptions, data routing) and the
  `Member` protocol every participant's transport implements;
- `signal`: the `/rtc` WebSocket, one `SignalSession` (a `Member`) per client;
- `peer`: a client's publisher and subscriber peer connections;
- `relay`: Opus relayed as RTP without decoding (the aiortc hooks);
- `speakers`: active speakers from the packets' audio level;
- `network`: which host addresses media can use.

Server-side participants (a phone call from the SIP gateway) join without WebRTC, through the
same small interface:

    room = registry.live_room(name)                     # created if needed, with its dispatch
    p = room.join(participant_info(identity, kind=SIP, attributes=...), member, auto_subscribe)
    room.activate(p)                                    # receive what is already published
    pub = room.publish(p, TrackInfo(sid=new_id("TR_"), type=AUDIO, source=MICROPHONE, ...))
    pub.push(frame)        # av.Packet of Opus (pts in 1/48000 s), or an av.AudioFrame of PCM
    room.send_data(p, DataPacket(...), reliable=True)   # e.g. DTMF as sip_dtmf
    room.leave(p, DisconnectReason.CLIENT_INITIATED)

`member` implements `Member`: `subscribe(publisher, track)` returns the sink that receives the
track's frames (a WebRTC publisher's RTP packets, an Opus `av.Packet` or a PCM frame from a
server-side one; `relay.opus_payload(frame)` gives what `av.CodecContext.create("opus", "r")`
decodes), `unsubscribe(track_sid)`, `on_participants(updates)`, `on_speakers(speakers)`,
`on_room(info)`, `on_data(packet, reliable)` and `on_removed(reason)`.
"""
