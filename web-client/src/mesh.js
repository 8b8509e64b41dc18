// Switchboard SDK: the mesh path. One connection per other participant, negotiated through the
// server's relay with perfect negotiation (docs/protocol.md, section 4); each description says
// which section carries which track.

/** @typedef {import('./client.js').MeshLink} MeshLink */
/** @typedef {import('./client.js').RemoteTrack} RemoteTrack */
/** @typedef {import('./client.js').Mode} Mode */
/** @typedef {import('./devices.js').LocalMedia} LocalMedia */

/** A mesh connection not connected this long after it was made cannot connect (no route). */
const MESH_CONNECT_TIMEOUT_MS = 10_000;

/**
 * What the mesh path needs of the room.
 * @typedef {object} MeshContext
 * @property {(msg: object) => void} send
 * @property {() => RTCIceServer[]} iceServers
 * @property {() => string} participantId
 * @property {() => Mode} mode
 * @property {(peerId: string) => boolean} knows  the participant is in the room
 * @property {LocalMedia} media
 * @property {Map<string, boolean>} remoteMuted  mute states by `peerId|trackId`
 * @property {() => void} changed  the remote tracks may have changed
 * @property {(peerId: string, channel: RTCDataChannel) => void} dataChannel  the peer opened one
 * @property {(context: string, err: unknown) => void} fail
 */

export class MeshPaths {
  /** Connections by peerId. @type {Map<string, MeshLink>} */
  links = new Map();
  /** @type {MeshContext} */ #ctx;

  /** @param {MeshContext} ctx */
  constructor(ctx) {
    this.#ctx = ctx;
  }

  /**
   * Of each pair, the participant whose id sorts first makes the first offer and is the
   * impolite side of perfect negotiation (docs/protocol.md, section 4).
   * @param {string} peerId
   */
  offersTo(peerId) {
    return this.#ctx.participantId() < peerId;
  }

  /** Every open mesh connection. */
  connections() {
    return [...this.links.values()].map((l) => l.pc);
  }

  /**
   * Connects to every participant this side offers to, on a switch to mesh. An offer made
   * before a switch overtook this one may have been dropped: it is sent again.
   * @param {Iterable<string>} peerIds
   */
  connectAll(peerIds) {
    for (const peerId of peerIds) {
      if (!this.offersTo(peerId)) continue;
      const pc = this.links.get(peerId)?.pc;
      if (pc && pc.signalingState === 'have-local-offer' && pc.localDescription) {
        this.#ctx.send({ type: 'offer', peerId, sdp: pc.localDescription.sdp, tracks: this.#ctx.media.trackInfo(pc) });
      } else this.link(peerId);
    }
  }

  /**
   * The connection to `peerId`, created with the local tracks in it.
   * @param {string} peerId
   * @returns {MeshLink}
   */
  link(peerId) {
    const existing = this.links.get(peerId);
    if (existing) return existing;
    const ctx = this.#ctx;
    const pc = new RTCPeerConnection({ iceServers: ctx.iceServers() });
    /** @type {MeshLink} */
    const link = {
      pc,
      polite: !this.offersTo(peerId),
      makingOffer: false,
      ignoreOffer: false,
      remoteTracks: new Map(),
    };
    this.links.set(peerId, link);
    pc.onicecandidate = (ev) => {
      if (ev.candidate) {
        const { candidate, sdpMid, sdpMLineIndex } = ev.candidate;
        ctx.send({ type: 'ice-candidate', peerId, candidate: { candidate, sdpMid, sdpMLineIndex } });
      }
    };
    pc.onnegotiationneeded = async () => {
      try {
        link.makingOffer = true;
        await pc.setLocalDescription();
        if (this.links.get(peerId) !== link || !pc.localDescription) return;
        ctx.send({ type: 'offer', peerId, sdp: pc.localDescription.sdp, tracks: ctx.media.trackInfo(pc) });
      } catch (err) {
        ctx.fail('mesh offer', err);
      } finally {
        link.makingOffer = false;
      }
    };
    pc.ontrack = () => ctx.changed();
    pc.ondatachannel = (ev) => ctx.dataChannel(peerId, ev.channel);
    let restarted = false;
    const giveUp = () => {
      if (this.links.get(peerId) !== link || pc.connectionState === 'connected' || link.failed) return;
      // A link left over while the room moves to the SFU (its offer dropped by the peer on
      // switching) says nothing about the network.
      if (ctx.mode() !== 'mesh') return;
      // Tell the server: the room moves to the SFU, which every participant can reach.
      link.failed = true;
      ctx.send({ type: 'mesh_failed', peerId });
    };
    const watchdog = setTimeout(giveUp, MESH_CONNECT_TIMEOUT_MS);
    pc.onconnectionstatechange = () => {
      if (this.links.get(peerId) !== link) return;
      if (pc.connectionState === 'connected') clearTimeout(watchdog);
      if (pc.connectionState === 'failed') {
        if (restarted) giveUp();
        else {
          restarted = true;
          pc.restartIce();
        }
      }
    };
    // The polite side adds its tracks when it answers, so the first exchange is one offer and
    // one answer rather than two colliding offers.
    if (!link.polite) {
      this.#addLocalTracks(pc);
      // Receive even what we do not send: an offer with no sections would never be made.
      for (const kind of ['audio', 'video']) {
        if (!pc.getTransceivers().some((t) => t.receiver.track.kind === kind)) {
          pc.addTransceiver(kind, { direction: 'recvonly' });
        }
      }
    }
    return link;
  }

  /** @param {RTCPeerConnection} pc */
  #addLocalTracks(pc) {
    const sending = new Set(pc.getSenders().map((s) => s.track));
    const { stream, screenTrack, screenStream } = this.#ctx.media;
    for (const track of stream?.getTracks() ?? []) {
      if (!sending.has(track)) pc.addTrack(track, /** @type {MediaStream} */ (stream));
    }
    if (screenTrack && screenStream && !sending.has(screenTrack)) {
      pc.addTrack(screenTrack, screenStream);
    }
  }

  /** @param {any} msg  a relayed `offer` or `answer` */
  async onDescription(msg) {
    const peerId = String(msg.peerId ?? '');
    if (!this.#ctx.knows(peerId)) return;
    // In an SFU room only existing mesh connections (kept until the switch settles) renegotiate.
    if (this.#ctx.mode() === 'sfu' && !this.links.has(peerId)) return;
    const link = this.link(peerId);
    const { pc } = link;
    const collision = msg.type === 'offer' && (link.makingOffer || pc.signalingState !== 'stable');
    link.ignoreOffer = !link.polite && collision;
    if (link.ignoreOffer) return;
    // Before applying: `track` events fire while the description is applied, and what they
    // announce must already know which section is which.
    link.remoteTracks = new Map();
    for (const info of Array.isArray(msg.tracks) ? msg.tracks : []) {
      if (info?.mid != null) link.remoteTracks.set(String(info.mid), info);
      if (info?.trackId && typeof info.muted === 'boolean') {
        this.#ctx.remoteMuted.set(`${peerId}|${info.trackId}`, info.muted);
      }
    }
    await pc.setRemoteDescription({ type: msg.type, sdp: msg.sdp });
    if (msg.type === 'offer') {
      this.#addLocalTracks(pc);
      await pc.setLocalDescription();
      if (this.links.get(peerId) !== link || !pc.localDescription) return;
      this.#ctx.send({ type: 'answer', peerId, sdp: pc.localDescription.sdp, tracks: this.#ctx.media.trackInfo(pc) });
    }
    this.#ctx.changed();
  }

  /** @param {any} msg  a relayed candidate */
  async onCandidate(msg) {
    const link = this.links.get(String(msg.peerId));
    if (!link || !msg.candidate?.candidate) return;
    try {
      await link.pc.addIceCandidate(msg.candidate);
    } catch (err) {
      if (!link.ignoreOffer) throw err;
    }
  }

  /** @param {string} peerId */
  close(peerId) {
    const link = this.links.get(peerId);
    if (!link) return;
    this.links.delete(peerId);
    link.pc.close();
  }

  closeAll() {
    for (const peerId of [...this.links.keys()]) this.close(peerId);
  }

  /**
   * The mesh connections' receiving sections, as remote tracks.
   * @returns {RemoteTrack[]}
   */
  tracks() {
    /** @type {RemoteTrack[]} */
    const out = [];
    for (const [peerId, link] of this.links) {
      if (link.pc.connectionState === 'closed') continue;
      for (const transceiver of link.pc.getTransceivers()) {
        const mid = transceiver.mid;
        const direction = transceiver.currentDirection;
        if (mid == null || (direction !== 'recvonly' && direction !== 'sendrecv')) continue;
        const track = transceiver.receiver.track;
        const info = link.remoteTracks.get(mid);
        const kind = /** @type {'audio' | 'video'} */ (track.kind);
        out.push({
          peerId,
          publicationId: `mesh:${peerId}:${mid}`,
          mid,
          track,
          kind,
          source: info?.source ?? (kind === 'audio' ? 'microphone' : 'camera'),
          muted: info ? (this.#ctx.remoteMuted.get(`${peerId}|${info.trackId}`) ?? false) : false,
          trackId: info?.trackId,
          receiver: transceiver.receiver,
          path: 'mesh',
        });
      }
    }
    return out;
  }
}
