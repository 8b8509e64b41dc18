// Switchboard SDK: the SFU path. Two connections to the server: publish (we offer, with our
// tracks; the camera in three simulcast layers) and subscribe (the server offers, we answer);
// the subscribe offer's sections as remote tracks; ICE candidates held until their description
// has gone out; video pauses; the camera layers the server asks for (`layers`); the relay data
// channel on the publish connection, for files through the server (relay.js).

import { RelayLink } from './relay.js';

/** @typedef {import('./client.js').Subscription} Subscription */
/** @typedef {import('./client.js').RemoteTrack} RemoteTrack */
/** @typedef {import('./client.js').TrackInfo} TrackInfo */
/** @typedef {import('./client.js').Transport} Transport */
/** @typedef {import('./devices.js').LocalMedia} LocalMedia */

/** How long the first subscribe answer waits for local candidates before trickling the rest. */
const SUBSCRIBE_GATHER_WAIT_MS = 500;

/**
 * Chromium encodes three simulcast layers only from this many pixels up (960x540), two from
 * 480x270, else one (WebRTC-LegacySimulcastLayerLimit, on by default), and drops the top layers
 * it does not encode: a 640x480 camera offered q, h and f would send only q and h (160x120 and
 * 320x240), never its full size.
 */
const THREE_LAYERS_FROM_PX = 960 * 540;
const TWO_LAYERS_FROM_PX = 480 * 270;

/**
 * The camera's simulcast layers, lowest first, as the server expects them (docs/protocol.md):
 * a quarter (`q`), a half (`h`) and the whole (`f`) of the captured size. A smaller camera gets
 * the top two, or one layer without a rid (no simulcast), as many as a browser encodes for it. A
 * screen share is sent in one layer: it is shown large by everyone, and text needs every pixel.
 * @param {number | null} maxBitrate  the full layer's cap (the server's `maxVideoBitrate`), bits
 *   per second; none when the server did not say
 * @param {boolean} withScalability  each layer in three temporal layers (`L1T3`), so the server can
 *   also thin the frame rate; not every browser takes `scalabilityMode`
 * @param {number} [pixels]  the camera's width times height, when known
 * @returns {RTCRtpEncodingParameters[]}
 */
export function cameraEncodings(maxBitrate, withScalability, pixels = Infinity) {
  const cap = (/** @type {number} */ bps) => (maxBitrate ? Math.min(bps, maxBitrate) : bps);
  const full = { scaleResolutionDownBy: 1, ...(maxBitrate ? { maxBitrate } : {}) };
  /** @type {RTCRtpEncodingParameters[]} */
  let layers = [
    { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: cap(150_000) },
    { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: cap(500_000) },
    { rid: 'f', ...full },
  ];
  if (pixels < TWO_LAYERS_FROM_PX) layers = [full];
  else if (pixels < THREE_LAYERS_FROM_PX) layers = layers.slice(1);
  return withScalability ? layers.map((layer) => ({ ...layer, scalabilityMode: 'L1T3' })) : layers;
}

/** The latest encoding change queued per sender. @type {WeakMap<RTCRtpSender, Promise<void>>} */
const encodingUpdates = new WeakMap();

/**
 * Changes a sender's encodings, one change at a time per sender: each setParameters must follow
 * its own getParameters, and one change must not overwrite another made meanwhile (a mode switch
 * lightening the camera, the server's `layers`).
 * @param {RTCRtpSender} sender
 * @param {(encodings: RTCRtpEncodingParameters[]) => boolean} change  returns false when it
 *   changed nothing (then nothing is set)
 * @returns {Promise<void>}  fails as setParameters does
 */
export function changeEncodings(sender, change) {
  const previous = encodingUpdates.get(sender) ?? Promise.resolve();
  const next = previous
    .catch(() => {})
    .then(async () => {
      const params = sender.getParameters();
      // Not negotiated yet: nothing is encoded for it.
      if (!params.encodings?.length) return;
      if (change(params.encodings)) await sender.setParameters(params);
    });
  encodingUpdates.set(sender, next);
  return next;
}

/**
 * What the SFU path needs of the room.
 * @typedef {object} SfuContext
 * @property {(msg: object) => void} send
 * @property {() => RTCIceServer[]} iceServers
 * @property {() => boolean} joined
 * @property {LocalMedia} media
 * @property {Map<string, boolean>} remoteMuted  mute states by `peerId|trackId`
 * @property {() => number | null} maxVideoBitrate  the server's cap per video track (`joined`)
 * @property {() => void} changed  the remote tracks may have changed
 * @property {(context: string, err: unknown) => void} fail
 * @property {(event: {code: string, message: string}) => void} error  for the app
 * @property {(peerId: string, channel: import('./relay.js').RelayedChannel) => void} dataChannel  a participant opened one through the server
 */

export class SfuPath {
  /** @type {RTCPeerConnection | null} */ publishPc = null;
  /** @type {RTCPeerConnection | null} */ subscribePc = null;
  /** Channels to others through the server, on the publish connection. @type {RelayLink | null} */
  relay = null;
  /** @type {Map<string, Subscription>} the latest subscribe offer's sections, by mid */
  subscriptions = new Map();
  /** Local candidates are held until the description they belong to has been sent. */
  #candidateGate = {
    publish: { open: false, held: /** @type {any[]} */ ([]) },
    subscribe: { open: false, held: /** @type {any[]} */ ([]) },
  };
  /** A publish re-offer is due once the outstanding one is answered. */
  #publishPending = false;
  /** Stream ids seen in `track` events, by mid: a fallback when an offer omits a section. */
  #streamIdByMid = new Map();
  /** Publications the server was asked to pause. @type {Set<string>} */
  #pauseSent = new Set();
  /** Camera senders added with simulcast layers. @type {WeakSet<RTCRtpSender>} */
  #simulcast = new WeakSet();
  /** @type {SfuContext} */ #ctx;

  /** @param {SfuContext} ctx */
  constructor(ctx) {
    this.#ctx = ctx;
  }

  /** True while the connections to the server are open. */
  get open() {
    return !!(this.publishPc || this.subscribePc);
  }

  /** Opens the publish connection (the server offers the subscribe one). */
  start() {
    if (this.publishPc) return;
    const pc = new RTCPeerConnection({ iceServers: this.#ctx.iceServers() });
    this.publishPc = pc;
    this.#watch(pc, 'publish');
    // Before the first offer, so that it carries the channel's section.
    this.relay = new RelayLink(pc, (peerId, channel) => this.#ctx.dataChannel(peerId, channel));
    const { stream, screenTrack, screenStream } = this.#ctx.media;
    for (const track of stream?.getTracks() ?? []) this.publishTrack(track, /** @type {MediaStream} */ (stream));
    if (screenTrack && screenStream) {
      pc.addTransceiver(screenTrack, { direction: 'sendonly', streams: [screenStream] });
    }
    pc.onnegotiationneeded = () => this.offerPublish().catch((err) => this.#ctx.fail('publish', err));
  }

  /**
   * Sends a microphone or camera track on the publish connection (not a screen share): a camera in
   * the simulcast layers of `cameraEncodings` for its size (a camera put in its place later keeps
   * them), all active until the server's `layers` says otherwise.
   * @param {MediaStreamTrack} track
   * @param {MediaStream} stream
   */
  publishTrack(track, stream) {
    const pc = this.publishPc;
    if (!pc || pc.signalingState === 'closed') return;
    if (track.kind !== 'video') {
      pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
      return;
    }
    const { width, height } = track.getSettings();
    const pixels = width && height ? width * height : undefined;
    const init = (/** @type {boolean} */ withScalability) => ({
      direction: /** @type {const} */ ('sendonly'),
      streams: [stream],
      sendEncodings: cameraEncodings(this.#ctx.maxVideoBitrate(), withScalability, pixels),
    });
    /** @type {RTCRtpTransceiver} */
    let transceiver;
    try {
      transceiver = pc.addTransceiver(track, init(true));
    } catch {
      // A browser that knows scalabilityMode but not L1T3 (or not for this camera) refuses the
      // whole transceiver: the same layers, without temporal ones.
      transceiver = pc.addTransceiver(track, init(false));
    }
    this.#simulcast.add(transceiver.sender);
  }

  /**
   * The server's `layers`: which of a camera's simulcast layers some subscriber needs. The others
   * are not encoded (`active: false`) until one does. An unknown track is ignored.
   * @param {any} msg  `{publicationId, trackId, active: string[]}`
   */
  onLayers(msg) {
    const pc = this.publishPc;
    if (!pc || pc.signalingState === 'closed' || !Array.isArray(msg.active)) return;
    const { media } = this.#ctx;
    const sender = pc.getSenders().find((s) => s.track && media.announcedId(s.track) === msg.trackId);
    if (!sender) return;
    const active = new Set(msg.active.map(String));
    changeEncodings(sender, (encodings) => {
      let changed = false;
      for (const encoding of encodings) {
        const want = !!encoding.rid && active.has(encoding.rid);
        // A layer without a rid is the only one (simulcast refused): it stays on.
        if (!encoding.rid || encoding.active === want) continue;
        encoding.active = want;
        changed = true;
      }
      return changed;
    }).catch((err) => {
      // A connection closed meanwhile (a reconnect, a switch to mesh) needs no layers.
      if (this.publishPc === pc && pc.signalingState !== 'closed') this.#ctx.fail('layers', err);
    });
  }

  /** Offers the publish connection now, or once the outstanding offer is answered. */
  async offerPublish() {
    const pc = this.publishPc;
    if (!pc || pc.signalingState === 'closed') return;
    if (pc.signalingState !== 'stable') {
      this.#publishPending = true;
      return;
    }
    this.#publishPending = false;
    // Always something to offer: the relay channel, if no track.
    await pc.setLocalDescription(await pc.createOffer());
    if (!this.#ctx.joined() || this.publishPc !== pc) return;
    this.#sendDescription(pc, 'publish', { type: 'offer', tracks: this.#ctx.media.trackInfo(pc) });
  }

  /** @param {string} sdp  the server's answer to our publish offer */
  async onPublishAnswer(sdp) {
    const pc = this.publishPc;
    if (!pc) return;
    await pc.setRemoteDescription({ type: 'answer', sdp });
    this.#fullSizeUnlessSimulcast(pc);
    if (this.#publishPending) await this.offerPublish();
  }

  /**
   * An answer without simulcast leaves a camera only its first, smallest layer (WebRTC keeps the
   * first encoding): it is then sent whole, up to the server's cap.
   * @param {RTCPeerConnection} pc
   */
  #fullSizeUnlessSimulcast(pc) {
    for (const sender of pc.getSenders()) {
      if (!this.#simulcast.has(sender)) continue;
      const maxBitrate = this.#ctx.maxVideoBitrate();
      changeEncodings(sender, (encodings) => {
        const [only] = encodings;
        if (encodings.length !== 1 || (only.scaleResolutionDownBy ?? 1) === 1) return false;
        only.scaleResolutionDownBy = 1;
        only.active = true;
        if (maxBitrate) only.maxBitrate = maxBitrate;
        else delete only.maxBitrate;
        return true;
      }).catch((err) => console.debug('switchboard: camera encoding', err));
    }
  }

  /** The server refused our publish offer: roll it back so later changes can be offered. */
  rollbackPublishOffer() {
    if (this.publishPc?.signalingState === 'have-local-offer') {
      this.publishPc.setLocalDescription({ type: 'rollback' }).catch(() => {});
    }
  }

  /** @param {any} msg  a trickled candidate from `sfu` */
  async onCandidate(msg) {
    const pc = msg.transport === 'publish' ? this.publishPc : this.subscribePc;
    if (pc && msg.candidate?.candidate) await pc.addIceCandidate(msg.candidate);
  }

  close() {
    this.relay?.close();
    this.relay = null;
    this.publishPc?.close();
    this.subscribePc?.close();
    this.publishPc = null;
    this.subscribePc = null;
    this.subscriptions = new Map();
    this.#pauseSent.clear();
    this.#streamIdByMid.clear();
    this.#publishPending = false;
    for (const gate of Object.values(this.#candidateGate)) {
      gate.open = false;
      gate.held.length = 0;
    }
  }

  #ensureSubscribePc() {
    if (this.subscribePc) return this.subscribePc;
    const pc = new RTCPeerConnection({ iceServers: this.#ctx.iceServers() });
    this.subscribePc = pc;
    this.#watch(pc, 'subscribe');
    pc.ontrack = (ev) => {
      const mid = ev.transceiver.mid;
      if (mid != null && ev.streams[0]) this.#streamIdByMid.set(mid, ev.streams[0].id);
    };
    return pc;
  }

  /**
   * @param {any} msg  the server's subscribe offer
   * @param {Set<string>} videoPaused  participants whose video the app does not show
   */
  async onSubscribeOffer(msg, videoPaused) {
    const pc = this.#ensureSubscribePc();
    this.subscriptions = new Map(
      (msg.subscriptions ?? []).map((/** @type {Subscription} */ s) => [String(s.mid), s]),
    );
    for (const sub of this.subscriptions.values()) {
      if (sub.trackId) this.#ctx.remoteMuted.set(`${sub.peerId}|${sub.trackId}`, !!sub.muted);
    }
    await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    // The server is the controlling ICE agent here. A client candidate it first learns from
    // a connectivity check (peer-reflexive) is nominated only after a wait of about a second,
    // so the first answer carries the host candidates instead of trickling them.
    await iceGatheringComplete(pc, SUBSCRIBE_GATHER_WAIT_MS);
    if (!this.#ctx.joined() || this.subscribePc !== pc) return;
    this.#sendDescription(pc, 'subscribe', { type: 'answer' });
    this.applyPauses(videoPaused);
    this.#ctx.changed();
  }

  /**
   * Tells the server which video subscriptions to pause, as far as that changed.
   * @param {Set<string>} videoPaused  participants whose video the app does not show
   */
  applyPauses(videoPaused) {
    if (!this.open) return;
    for (const sub of this.subscriptions.values()) {
      // A screen share shows on the stage whatever the tile does: only cameras pause.
      if (sub.kind !== 'video' || sub.source !== 'camera') continue;
      const want = videoPaused.has(sub.peerId);
      if (want === this.#pauseSent.has(sub.publicationId)) continue;
      if (want) this.#pauseSent.add(sub.publicationId);
      else this.#pauseSent.delete(sub.publicationId);
      this.#ctx.send({ type: 'pause', publicationId: sub.publicationId, paused: want });
    }
  }

  /**
   * The subscribe connection's receiving sections, as remote tracks.
   * Sections are identified by mid; a reused section (new publicationId on an old mid)
   * is a different track.
   * @returns {RemoteTrack[]}
   */
  tracks() {
    const pc = this.subscribePc;
    if (!pc || pc.connectionState === 'closed') return [];
    /** @type {RemoteTrack[]} */
    const out = [];
    for (const transceiver of pc.getTransceivers()) {
      const mid = transceiver.mid;
      const direction = transceiver.currentDirection;
      if (mid == null || (direction !== 'recvonly' && direction !== 'sendrecv')) continue;
      const track = transceiver.receiver.track;
      const sub = this.subscriptions.get(mid);
      const peerId = sub?.peerId ?? this.#streamIdByMid.get(mid);
      if (!peerId) continue;
      out.push({
        peerId,
        publicationId: sub?.publicationId ?? `${peerId}/${track.id}`,
        mid,
        track,
        kind: sub?.kind ?? /** @type {'audio' | 'video'} */ (track.kind),
        source: sub?.source ?? (track.kind === 'audio' ? 'microphone' : 'camera'),
        muted: sub?.trackId ? (this.#ctx.remoteMuted.get(`${peerId}|${sub.trackId}`) ?? !!sub.muted) : !!sub?.muted,
        trackId: sub?.trackId,
        receiver: transceiver.receiver,
        path: 'sfu',
      });
    }
    return out;
  }

  /**
   * @param {RTCPeerConnection} pc
   * @param {Transport} transport
   */
  #watch(pc, transport) {
    pc.onicecandidate = (ev) => {
      const candidate = ev.candidate
        ? {
            candidate: ev.candidate.candidate,
            sdpMid: ev.candidate.sdpMid,
            sdpMLineIndex: ev.candidate.sdpMLineIndex,
          }
        : null;
      const msg = { type: 'ice-candidate', peerId: 'sfu', transport, candidate };
      const gate = this.#candidateGate[transport];
      if (gate.open) this.#ctx.send(msg);
      else gate.held.push(msg);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === 'failed' && this.#ctx.joined()) {
        this.#ctx.error({ code: 'connection_failed', message: `${transport} connection failed` });
      }
    };
  }

  /**
   * Sends the local description of `pc` and lets its candidates flow from then on.
   * @param {RTCPeerConnection} pc
   * @param {Transport} transport
   * @param {{type: 'offer' | 'answer', tracks?: TrackInfo[]}} msg
   */
  #sendDescription(pc, transport, msg) {
    this.#ctx.send({ ...msg, peerId: 'sfu', transport, sdp: pc.localDescription?.sdp });
    const gate = this.#candidateGate[transport];
    if (gate.open) return;
    gate.open = true;
    // Candidates gathered so far are already in the description; only end-of-candidates is news.
    for (const held of gate.held.splice(0)) if (held.candidate === null) this.#ctx.send(held);
  }
}

/**
 * Resolves when `pc` has gathered its candidates, or after `maxWaitMs`.
 * @param {RTCPeerConnection} pc
 * @param {number} maxWaitMs
 */
function iceGatheringComplete(pc, maxWaitMs) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener('icegatheringstatechange', onChange);
      resolve(undefined);
    };
    const onChange = () => pc.iceGatheringState === 'complete' && done();
    const timer = setTimeout(done, maxWaitMs);
    pc.addEventListener('icegatheringstatechange', onChange);
  });
}
