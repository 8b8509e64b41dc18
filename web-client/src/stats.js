// Switchboard SDK: the call's measurements. Every half second the loudest remote microphone
// (the active speaker); every two seconds round trip, loss and bitrate over every connection,
// with the camera's simulcast layers and each remote video's size and freezes.
// It reads getStats only, and tells the Room through callbacks.

/** @typedef {import('./client.js').RemoteTrack} RemoteTrack */
/** @typedef {import('./client.js').ConnectionQuality} ConnectionQuality */
/** @typedef {import('./client.js').SendLayer} SendLayer */
/** @typedef {import('./client.js').ReceivedVideo} ReceivedVideo */

const SAMPLE_MS = 500;
/** Connection quality every this many samples. */
const QUALITY_EVERY = 4;
/** About -40 dBFS: quieter is silence or room noise. */
const SPEAKING_LEVEL = 0.01;
/** A speaker stays the speaker through pauses this short. */
const SPEAKER_HOLD_MS = 1500;
/** Simulcast layers, lowest first. */
const RIDS = ['q', 'h', 'f'];

/**
 * @typedef {object} CallStatsInputs
 * @property {() => Iterable<RemoteTrack>} remoteTracks  the remote tracks shown now
 * @property {() => (RTCPeerConnection | null)[]} connections  every connection of the call
 * @property {() => boolean} busy  true while sampling should wait (not joined, or a switch)
 * @property {(peerId: string | null) => void} onSpeaker
 * @property {(quality: ConnectionQuality) => void} onQuality
 */

export class CallStats {
  /** @type {ReturnType<typeof setInterval> | null} */ #timer = null;
  /** Previous samples, for deltas: per connection, by stats id. @type {WeakMap<RTCPeerConnection, Map<string, any>>} */
  #before = new WeakMap();
  /** The previous inbound audio sample per remote track. @type {WeakMap<MediaStreamTrack, any>} */
  #levelBefore = new WeakMap();
  /** @type {string | null} */ #speaker = null;
  #speakerSince = 0;
  #ticks = 0;
  /** @type {CallStatsInputs} */ #in;

  /** @param {CallStatsInputs} inputs */
  constructor(inputs) {
    this.#in = inputs;
  }

  start() {
    if (this.#timer) return;
    let sampling = false;
    this.#timer = setInterval(() => {
      // getStats can take longer than the interval on a loaded machine: never two at once.
      if (sampling) return;
      sampling = true;
      this.#sample()
        .catch((err) => console.debug('switchboard: stats', err))
        .finally(() => (sampling = false));
    }, SAMPLE_MS);
  }

  stop() {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
  }

  async #sample() {
    // A switch is the busiest moment of a call: the badge and speaker can wait a second.
    if (this.#in.busy()) return;
    const now = performance.now();
    // Active speaker: the loudest remote microphone over the last half second.
    let loudest = { peerId: /** @type {string | null} */ (null), level: 0 };
    for (const remote of this.#in.remoteTracks()) {
      if (remote.kind !== 'audio' || remote.muted) continue;
      // A connection closing meanwhile fails only its own sample.
      const report = await remote.receiver.getStats().catch(() => new Map());
      for (const s of report.values()) {
        if (s.type !== 'inbound-rtp') continue;
        const before = this.#levelBefore.get(remote.track);
        this.#levelBefore.set(remote.track, s);
        if (!before) continue;
        const energy = (s.totalAudioEnergy ?? 0) - (before.totalAudioEnergy ?? 0);
        const duration = (s.totalSamplesDuration ?? 0) - (before.totalSamplesDuration ?? 0);
        const level = duration > 0 ? Math.sqrt(energy / duration) : 0;
        if (level > loudest.level) loudest = { peerId: remote.peerId, level };
      }
    }
    const speaking = loudest.level > SPEAKING_LEVEL ? loudest.peerId : null;
    if (speaking !== this.#speaker && (speaking || now - this.#speakerSince > SPEAKER_HOLD_MS)) {
      this.#speaker = speaking;
      this.#in.onSpeaker(speaking);
    }
    if (speaking) this.#speakerSince = now;
    if (++this.#ticks % QUALITY_EVERY === 0) {
      const quality = await this.#quality();
      if (quality) this.#in.onQuality(quality);
    }
  }

  /**
   * @returns {Promise<ConnectionQuality | null>}  null when every stream is new (just after a
   *   switch): one sample has no rate yet, and zeros would show a working call as idle
   */
  async #quality() {
    let rtt = /** @type {number | null} */ (null);
    let lost = 0;
    let received = 0;
    let sentBytes = 0;
    let receivedBytes = 0;
    let seconds = 0;
    let fresh = 0;
    let measured = 0;
    /** @type {SendLayer[]} */
    const sendLayers = [];
    /** @type {ReceivedVideo[]} */
    const remoteVideos = [];
    const remoteByTrack = new Map();
    for (const remote of this.#in.remoteTracks()) remoteByTrack.set(remote.track.id, remote);
    for (const pc of this.#in.connections()) {
      if (!pc || pc.connectionState === 'closed') continue;
      const previous = this.#before.get(pc) ?? new Map();
      this.#before.set(pc, previous);
      const report = await pc.getStats().catch(() => new Map());
      for (const s of report.values()) {
        const key = s.id;
        const before = previous.get(key);
        if (s.type === 'candidate-pair' && s.nominated && s.currentRoundTripTime != null) {
          rtt = Math.max(rtt ?? 0, s.currentRoundTripTime * 1000);
        }
        if (s.type !== 'inbound-rtp' && s.type !== 'outbound-rtp') continue;
        previous.set(key, s);
        // Only the camera is sent in layers (with a rid): a screen share and mesh links are not.
        if (s.type === 'outbound-rtp' && s.kind === 'video' && s.rid) {
          const span = before ? (s.timestamp - before.timestamp) / 1000 : 0;
          sendLayers.push({
            rid: String(s.rid),
            active: typeof s.active === 'boolean' ? s.active : null,
            frameWidth: s.frameWidth ?? 0,
            frameHeight: s.frameHeight ?? 0,
            framesPerSecond: s.framesPerSecond ?? 0,
            bytesSent: s.bytesSent ?? 0,
            kbps: span > 0 ? Math.round((Math.max(0, (s.bytesSent ?? 0) - (before.bytesSent ?? 0)) * 8) / span / 1000) : 0,
            qualityLimitationReason: s.qualityLimitationReason ?? null,
          });
        }
        const remote = s.type === 'inbound-rtp' && s.kind === 'video' ? remoteByTrack.get(s.trackIdentifier) : undefined;
        if (remote) {
          remoteVideos.push({
            peerId: remote.peerId,
            source: remote.source,
            path: remote.path,
            frameWidth: s.frameWidth ?? 0,
            frameHeight: s.frameHeight ?? 0,
            framesPerSecond: s.framesPerSecond ?? 0,
            freezeCount: s.freezeCount ?? 0,
            totalFreezesDuration: s.totalFreezesDuration ?? 0,
          });
        }
        if (!before) {
          fresh++;
          continue;
        }
        measured++;
        seconds = Math.max(seconds, (s.timestamp - before.timestamp) / 1000);
        if (s.type === 'inbound-rtp') {
          lost += Math.max(0, (s.packetsLost ?? 0) - (before.packetsLost ?? 0));
          received += Math.max(0, (s.packetsReceived ?? 0) - (before.packetsReceived ?? 0));
          receivedBytes += Math.max(0, (s.bytesReceived ?? 0) - (before.bytesReceived ?? 0));
        } else {
          sentBytes += Math.max(0, (s.bytesSent ?? 0) - (before.bytesSent ?? 0));
        }
      }
    }
    if (fresh > 0 && measured === 0) return null;
    const lossPercent = received + lost > 0 ? (100 * lost) / (received + lost) : 0;
    const kbps = (/** @type {number} */ bytes) => (seconds > 0 ? Math.round((bytes * 8) / seconds / 1000) : 0);
    const quality = lossPercent > 5 || (rtt ?? 0) > 400 ? 'poor' : lossPercent > 1 || (rtt ?? 0) > 150 ? 'fair' : 'good';
    return {
      rttMs: rtt == null ? null : Math.round(rtt),
      lossPercent: Math.round(lossPercent * 10) / 10,
      sendKbps: kbps(sentBytes),
      receiveKbps: kbps(receivedBytes),
      quality,
      sendLayers: sendLayers.sort((a, b) => rank(a.rid) - rank(b.rid)),
      remoteVideos,
    };
  }
}

/** @param {string} rid  a layer's place, lowest first (unknown ones last) */
function rank(rid) {
  const i = RIDS.indexOf(rid);
  return i < 0 ? RIDS.length : i;
}
