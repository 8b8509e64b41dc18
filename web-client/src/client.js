// Switchboard browser SDK: signaling protocol version 1 (docs/protocol.md).
// Plain ES module, no dependencies, no build step.
//
//   import { Room } from './client.js';
//   const room = new Room();
//   room.on('trackSubscribed', ({ peerId, track, kind, source }) => { ... });
//   room.on('participantLeft', ({ peerId }) => { ... });
//   await room.connect(location.origin, { room: 'standup', name: 'Alice' });
//   room.setMicrophoneEnabled(false);
//   room.leave();
//
// `connect(serverUrl, options)` does the same in one call; participants already present are
// then found in `room.participants`.
//
// Mesh or SFU is invisible to the app: a room of up to three is a peer-to-peer mesh, a larger one
// goes through the server, and when the room switches the SDK brings up the new connections
// while the old ones keep playing. A remote track is swapped for its counterpart on the new path
// (trackUnsubscribed, then trackSubscribed, in one task) only once the new one is decoding.

/**
 * @typedef {'microphone' | 'camera' | 'screen'} Source
 * @typedef {'publish' | 'subscribe'} Transport
 * @typedef {'mesh' | 'sfu'} Mode
 *
 * @typedef {object} Subscription  One media section of the server's subscribe offer.
 * @property {string} mid
 * @property {string} publicationId
 * @property {string} peerId
 * @property {'audio' | 'video'} kind
 * @property {Source} source
 * @property {boolean} muted
 * @property {string} [trackId]
 *
 * @typedef {object} TrackInfo  What a description says about one of its sender's tracks.
 * @property {string} trackId
 * @property {Source} source
 * @property {string | null} [mid]
 * @property {boolean} [muted]
 *
 * @typedef {object} RemoteTrack  What `trackSubscribed` / `trackUnsubscribed` carry.
 * @property {string} peerId
 * @property {string} publicationId  stable for as long as the track is subscribed
 * @property {string} mid
 * @property {MediaStreamTrack} track
 * @property {'audio' | 'video'} kind
 * @property {Source} source
 * @property {boolean} muted
 * @property {string | undefined} trackId  the publisher's name for the track
 * @property {RTCRtpReceiver} receiver  for getStats()
 * @property {Mode} path  the connection it arrives on
 *
 * @typedef {object} Participant  A remote participant.
 * @property {string} peerId
 * @property {string} name
 * @property {Map<string, RemoteTrack>} tracks  by publicationId
 *
 * @typedef {object} ErrorEvent
 * @property {string} code
 * @property {string} message
 * @property {string} [requestType]
 *
 * @typedef {object} ConnectOptions
 * @property {string} room
 * @property {string} name  used as userId for the token and as display name
 * @property {boolean | string} [audio=true]  false, true, or a microphone's deviceId
 * @property {boolean | string} [video=true]  false, true, or a camera's deviceId
 * @property {MediaStream} [stream]  local media already captured (a preview): used instead of
 *   capturing, and stopped when the room is left
 * @property {number} [joinTimeoutMs=15000]
 *
 * @typedef {object} ConnectionQuality  Measured over the last two seconds, all connections.
 * @property {number | null} rttMs  round-trip time to the server or the peers (the worst)
 * @property {number} lossPercent  incoming packets lost
 * @property {number} sendKbps
 * @property {number} receiveKbps
 * @property {'good' | 'fair' | 'poor'} quality
 *
 * @typedef {object} ChatMessage
 * @property {number} id  its number in the room, from 1
 * @property {string} peerId  the sender (your own participantId for your messages)
 * @property {string} name  the sender's display name
 * @property {string} text  as typed: escape it before putting it in HTML
 * @property {number} at  when the server received it, ms since the Unix epoch
 *
 * @typedef {object} MeshLink  The connection to one participant in mesh mode.
 * @property {RTCPeerConnection} pc
 * @property {boolean} polite  yields when both sides offer at once (perfect negotiation)
 * @property {boolean} makingOffer
 * @property {boolean} ignoreOffer
 * @property {Map<string, TrackInfo>} remoteTracks  the peer's tracks by mid
 * @property {boolean} [failed]  reported to the server as unable to connect
 *
 * Events (listener argument):
 *  - participantJoined   (Participant)
 *  - participantUpdated  (Participant)   a known participant's name changed
 *  - participantLeft     (Participant)
 *  - trackSubscribed     (RemoteTrack)
 *  - trackUnsubscribed   (RemoteTrack)
 *  - trackMuted          ({peerId, publicationId, source, muted})
 *  - modeChanged         ({mode, phase})   'mesh' | 'sfu', 'switching' | 'settled'
 *  - chatMessage         (ChatMessage)   also your own, once the server has it
 *  - activeSpeaker       ({peerId: string | null})   the remote participant speaking loudest
 *  - connectionQuality   (ConnectionQuality)   every two seconds
 *  - localStream         (MediaStream)   local media captured, before joining
 *  - error               (ErrorEvent)
 *  - reconnecting        ({reason: string})   the connection to the server was lost; retrying
 *  - reconnected         ({})   back in the room (participants are announced again)
 *  - disconnected        ({reason: string, code?: number})   for good: left, refused, or 30 s
 *                                 of reconnecting failed
 */

export const PROTOCOL_VERSION = 1;

/** How long the first subscribe answer waits for local candidates before trickling the rest. */
const SUBSCRIBE_GATHER_WAIT_MS = 500;
/**
 * The longest one incoming message may hold up the next. A peer connection closed while one of
 * its operations is in flight never settles that operation's promise (as the WebRTC spec says).
 */
const HANDLER_TIMEOUT_MS = 10_000;
/** How long opening the signaling socket or fetching a token may take. */
const SOCKET_OPEN_TIMEOUT_MS = 5000;
/** How long the SDK keeps trying to get back into the room after losing the server. */
const RECONNECT_WINDOW_MS = 30_000;
/** Refusals a retry cannot fix. */
const FATAL_CODES = ['name_taken', 'room_full', 'unauthorized', 'bad_request'];
/** How often, during a switch, new-path tracks are checked for decoded media. */
const LIVE_POLL_MS = 100;
/**
 * A new-path track replaces the old one once it has decoded this many frames (video) or received
 * this many packets (audio, 20 ms each) and is still progressing: one keyframe that is not
 * followed by more would show as a freeze.
 */
const LIVE_MIN_FRAMES = 8;
const LIVE_MIN_AUDIO_PACKETS = 10;
/** ...or once it has shown media for this long, however slowly it arrives. */
const LIVE_SLOW_MS = 800;
/** A mesh connection not connected this long after it was made cannot connect (no route). */
const MESH_CONNECT_TIMEOUT_MS = 10_000;
/**
 * While a switch brings up the new path, the old path's camera is sent at half the width and
 * height and at most this frame rate: every page then encodes and decodes both paths at once,
 * and on a busy machine the full-size old path starves the new one (and itself) into a freeze.
 */
const SWITCH_OLD_PATH_SCALE = 2;
const SWITCH_OLD_PATH_FPS = 15;

/** An error carrying a protocol error code (`name_taken`, `unauthorized`, ...). */
export class SwitchboardError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {string} [requestType]
   */
  constructor(code, message, requestType) {
    super(message);
    this.name = 'SwitchboardError';
    this.code = code;
    this.requestType = requestType;
  }
}

/** Minimal event emitter; listeners that throw do not break the SDK. */
class Emitter {
  /** @type {Map<string, Set<(arg: any) => void>>} */
  #listeners = new Map();

  /**
   * @param {string} type
   * @param {(arg: any) => void} fn
   * @returns {() => void} a function that removes the listener
   */
  on(type, fn) {
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  /**
   * @param {string} type
   * @param {(arg: any) => void} fn
   */
  off(type, fn) {
    this.#listeners.get(type)?.delete(fn);
  }

  /**
   * @param {string} type
   * @param {any} [arg]
   */
  emit(type, arg) {
    for (const fn of [...(this.#listeners.get(type) ?? [])]) {
      try {
        fn(arg);
      } catch (err) {
        console.error(`switchboard: "${type}" listener threw`, err);
      }
    }
  }
}

/**
 * Connects to a Switchboard server, joins a room and publishes camera and microphone.
 * Participants already in the room when this resolves are in `room.participants`;
 * attach listeners to a `new Room()` and call `room.connect()` to see their events too.
 *
 * @param {string} serverUrl  e.g. "https://sfu.example.com" or location.origin
 * @param {ConnectOptions} options
 * @returns {Promise<Room>}
 */
export async function connect(serverUrl, options) {
  const room = new Room();
  await room.connect(serverUrl, options);
  return room;
}

export class Room extends Emitter {
  /** @type {string | null} */ participantId = null;
  /** @type {string | null} */ roomName = null;
  /** @type {string | null} */ name = null;
  /** @type {RTCIceServer[]} */ iceServers = [];
  /** The room's mode (during a switch, the mode it is switching to). @type {Mode} */
  mode = 'sfu';
  /** True between `mode`/`switching` and `mode`/`settled`. */
  switching = false;
  /** @type {RTCPeerConnection | null} */ publishPc = null;
  /** @type {RTCPeerConnection | null} */ subscribePc = null;
  /** Mesh connections by peerId. @type {Map<string, MeshLink>} */
  mesh = new Map();
  /** @type {MediaStream | null} */ localStream = null;
  /** @type {MediaStreamTrack | null} */ screenTrack = null;
  /** @type {Map<string, Participant>} remote participants by peerId */
  participants = new Map();
  /** @type {Map<string, Subscription>} the latest subscribe offer's sections, by mid */
  subscriptions = new Map();
  /** @type {'new' | 'connecting' | 'joined' | 'reconnecting' | 'closed'} */
  state = 'new';
  /** The room's chat so far (the server keeps the latest 100 for those who join later). @type {ChatMessage[]} */
  chat = [];

  /** @type {WebSocket | null} */ #ws = null;
  /** Incoming messages are handled one at a time, in arrival order. @type {Promise<unknown>} */
  #queue = Promise.resolve();
  /** @type {{resolve: (msg: any) => void, reject: (err: Error) => void} | null} */
  #joinWaiter = null;
  /** Remote tracks announced to listeners, by `peerId|kind|source`. @type {Map<string, RemoteTrack>} */
  #active = new Map();
  /** Stream ids seen in `track` events, by mid: a fallback when an offer omits a section. */
  #streamIdByMid = new Map();
  /** Local candidates are held until the description they belong to has been sent. */
  #candidateGate = {
    publish: { open: false, held: /** @type {any[]} */ ([]) },
    subscribe: { open: false, held: /** @type {any[]} */ ([]) },
  };
  /** A publish re-offer is due once the outstanding one is answered. */
  #publishPending = false;
  /** Remote tracks that decode media steadily (video frames, audio packets). @type {WeakSet<MediaStreamTrack>} */
  #live = new WeakSet();
  /** The last decoded-frame (video) or packet (audio) count seen per track. @type {WeakMap<MediaStreamTrack, number>} */
  #progress = new WeakMap();
  /** Mute states by `peerId|trackId`. @type {Map<string, boolean>} */
  #remoteMuted = new Map();
  #readySent = false;
  /** The number of the switch under way, echoed in `ready`. @type {number | undefined} */
  #switchNumber = undefined;
  /** @type {ReturnType<typeof setTimeout> | null} */
  #livePoll = null;
  /** Sources of local tracks by track id. @type {Map<string, Source>} */
  #localSources = new Map();
  /** @type {MediaStream | null} */ #screenStream = null;
  #screenPending = false;
  /** The device switch in progress, if any. @type {Promise<void>} */
  #deviceSwitch = Promise.resolve();
  /** When the mode last changed: errors for messages that crossed it are expected. */
  #modeChangedAt = 0;
  /** When each track first showed decoded media. @type {WeakMap<MediaStreamTrack, number>} */
  #firstMediaAt = new WeakMap();
  /** What a reconnect needs: where, who, and the secret that replaces our lost self. */
  /** @type {{base: URL, room: string, name: string, joinTimeoutMs: number} | null} */
  #session = null;
  /** @type {string | null} */ #resumeToken = null;
  /** A replacement track (another camera) keeps the id its first track was announced by. @type {WeakMap<MediaStreamTrack, string>} */
  #announcedIds = new WeakMap();
  /** @type {ReturnType<typeof setInterval> | null} */ #statsTimer = null;
  /** Previous samples, for deltas: per connection, by stats id. @type {WeakMap<RTCPeerConnection, Map<string, any>>} */
  #statsBefore = new WeakMap();
  /** The previous inbound audio sample per remote track. @type {WeakMap<MediaStreamTrack, any>} */
  #levelBefore = new WeakMap();
  /** @type {string | null} */ #speaker = null;
  #speakerSince = 0;
  #statsTicks = 0;
  /** Participants whose video the app does not show (off screen). @type {Set<string>} */
  #videoPaused = new Set();
  /** Publications the server was asked to pause. @type {Set<string>} */
  #pauseSent = new Set();
  /** Chat messages already announced, by `id@at`. @type {Set<string>} */
  #chatSeen = new Set();
  /** Camera senders lightened for a switch, with the encoding settings to restore. @type {Map<RTCRtpSender, {scaleResolutionDownBy?: number, maxFramerate?: number}>} */
  #lightened = new Map();
  /** The latest encoding change queued per sender. @type {WeakMap<RTCRtpSender, Promise<void>>} */
  #encodingUpdates = new WeakMap();

  /**
   * @param {string} serverUrl
   * @param {ConnectOptions} options
   */
  async connect(serverUrl, { room, name, audio = true, video = true, stream: given, joinTimeoutMs = 15000 }) {
    if (this.state !== 'new') throw new Error('Room.connect may be called once');
    this.state = 'connecting';
    const base = new URL(serverUrl);
    try {
      // Media first: whichever mode the room is in, connections are made with the tracks in them.
      if (given || audio || video) {
        const stream = given ?? (await captureMedia(audio, video));
        if (this.state !== 'connecting') {
          for (const track of stream.getTracks()) track.stop();
          throw new SwitchboardError('closed', 'left while capturing media');
        }
        this.localStream = stream;
        for (const track of stream.getTracks()) {
          this.#localSources.set(track.id, track.kind === 'audio' ? 'microphone' : 'camera');
        }
        this.emit('localStream', this.localStream);
      }
      this.#session = { base, room, name, joinTimeoutMs };
      const token = await fetchToken(base, name, room);
      await this.#openSocket(base, token);
      await this.#join(name, joinTimeoutMs);
    } catch (err) {
      this.#close(err instanceof SwitchboardError ? err.code : 'connect_failed', false);
      throw err;
    }
  }

  /** Leaves the room and releases camera, microphone and connections. */
  leave() {
    if (this.state === 'closed') return;
    this.#send({ type: 'leave' });
    this.#close('left', true);
  }

  /** @param {boolean} enabled */
  setMicrophoneEnabled(enabled) {
    this.#setEnabled('audio', enabled);
  }

  /** @param {boolean} enabled */
  setCameraEnabled(enabled) {
    this.#setEnabled('video', enabled);
  }

  get microphoneEnabled() {
    return this.localStream?.getAudioTracks().some((t) => t.enabled) ?? false;
  }

  get cameraEnabled() {
    return this.localStream?.getVideoTracks().some((t) => t.enabled) ?? false;
  }

  /**
   * Sends a chat message to everyone in the room (1 to 1000 characters; at most 10 at once,
   * then 1 per second). It comes back as a `chatMessage` event once the server has it.
   * @param {string} text
   */
  sendChat(text) {
    if (this.state !== 'joined') throw new SwitchboardError('invalid_state', 'join a room first');
    if (!text.trim()) return;
    this.#send({ type: 'chat', text });
  }

  /**
   * Shares a screen (or any video track, e.g. a canvas capture) with everyone.
   * @param {MediaStreamTrack} [track]  default: asks the browser for a screen
   */
  async startScreenShare(track) {
    if (this.state !== 'joined') throw new SwitchboardError('invalid_state', 'join a room first');
    if (this.screenTrack || this.#screenPending) return;
    if (!track) {
      this.#screenPending = true;
      try {
        const display = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
        track = display.getVideoTracks()[0];
      } finally {
        this.#screenPending = false;
      }
    }
    this.screenTrack = track;
    this.#screenStream = new MediaStream([track]);
    this.#localSources.set(track.id, 'screen');
    track.addEventListener('ended', () => this.stopScreenShare());
    for (const link of this.mesh.values()) link.pc.addTrack(track, this.#screenStream);
    if (this.publishPc) {
      this.publishPc.addTransceiver(track, { direction: 'sendonly', streams: [this.#screenStream] });
    }
  }

  /** Stops the screen share. */
  stopScreenShare() {
    const track = this.screenTrack;
    if (!track) return;
    this.screenTrack = null;
    this.#screenStream = null;
    for (const pc of [...[...this.mesh.values()].map((l) => l.pc), this.publishPc]) {
      const sender = pc?.getSenders().find((s) => s.track === track);
      if (pc && sender && pc.signalingState !== 'closed') pc.removeTrack(sender);
    }
    track.stop();
  }

  /**
   * Switches to another microphone or camera (see `listDevices()`), on every connection at
   * once, without renegotiating. Its mute state carries over.
   * @param {'audioinput' | 'videoinput'} kind
   * @param {string} deviceId
   */
  setDevice(kind, deviceId) {
    // One switch at a time: two at once would both replace the same old track.
    const next = this.#deviceSwitch.then(() => this.#switchDevice(kind, deviceId));
    this.#deviceSwitch = next.catch(() => {});
    return next;
  }

  /**
   * @param {'audioinput' | 'videoinput'} kind
   * @param {string} deviceId
   */
  async #switchDevice(kind, deviceId) {
    const audio = kind === 'audioinput';
    const captured = await captureMedia(audio ? deviceId : false, audio ? false : deviceId);
    const track = captured.getTracks()[0];
    if (this.state === 'closed') {
      track.stop(); // Left during the permission prompt: the camera must not stay lit.
      return;
    }
    const stream = this.localStream ?? new MediaStream();
    this.localStream = stream;
    const old = stream.getTracks().find((t) => t.kind === track.kind);
    if (old) {
      track.enabled = old.enabled;
      this.#announcedIds.set(track, this.#announcedId(old));
    } else {
      this.#localSources.set(track.id, audio ? 'microphone' : 'camera');
    }
    const connections = [this.publishPc, ...[...this.mesh.values()].map((l) => l.pc)];
    for (const pc of connections) {
      for (const sender of pc?.getSenders() ?? []) {
        // A connection closing meanwhile (a mode switch) no longer needs the track.
        if (old && sender.track === old) await sender.replaceTrack(track).catch(() => {});
      }
    }
    if (old) {
      stream.removeTrack(old);
      old.stop();
    }
    stream.addTrack(track);
    if (!old) {
      // A kind not sent before: connections take it as a new track.
      for (const link of this.mesh.values()) link.pc.addTrack(track, stream);
      this.publishPc?.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
    }
    this.emit('localStream', stream);
  }

  /**
   * Stops (or resumes) receiving a participant's video, for a tile that is off screen: in a
   * large room only what is seen costs bandwidth and decoding. Through the server only (a mesh
   * is small); remembered for the participant's later video too.
   * @param {string} peerId
   * @param {boolean} paused
   */
  pauseVideo(peerId, paused) {
    if (paused) this.#videoPaused.add(peerId);
    else this.#videoPaused.delete(peerId);
    this.#applyPauses();
  }

  /** Tells the server which video subscriptions to pause, as far as that changed. */
  #applyPauses() {
    if (!this.publishPc && !this.subscribePc) return;
    for (const sub of this.subscriptions.values()) {
      // A screen share shows on the stage whatever the tile does: only cameras pause.
      if (sub.kind !== 'video' || sub.source !== 'camera') continue;
      const want = this.#videoPaused.has(sub.peerId);
      if (want === this.#pauseSent.has(sub.publicationId)) continue;
      if (want) this.#pauseSent.add(sub.publicationId);
      else this.#pauseSent.delete(sub.publicationId);
      this.#send({ type: 'pause', publicationId: sub.publicationId, paused: want });
    }
  }

  /** @param {MediaStreamTrack} track */
  #announcedId(track) {
    return this.#announcedIds.get(track) ?? track.id;
  }

  // --- stats: active speaker and connection quality -----------------------------------------

  #startStats() {
    if (this.#statsTimer) return;
    let sampling = false;
    this.#statsTimer = setInterval(() => {
      // getStats can take longer than the interval on a loaded machine: never two at once.
      if (sampling) return;
      sampling = true;
      this.#sampleStats()
        .catch((err) => console.debug('switchboard: stats', err))
        .finally(() => (sampling = false));
    }, 500);
  }

  async #sampleStats() {
    // A switch is the busiest moment of a call: the badge and speaker can wait a second.
    if (this.state !== 'joined' || this.switching) return;
    const now = performance.now();
    // Active speaker: the loudest remote microphone over the last half second.
    let loudest = { peerId: /** @type {string | null} */ (null), level: 0 };
    for (const remote of this.#active.values()) {
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
    // About -40 dBFS: quieter is silence or room noise.
    const speaking = loudest.level > 0.01 ? loudest.peerId : null;
    if (speaking !== this.#speaker && (speaking || now - this.#speakerSince > 1500)) {
      this.#speaker = speaking;
      this.emit('activeSpeaker', { peerId: speaking });
    }
    if (speaking) this.#speakerSince = now;
    if (++this.#statsTicks % 4 === 0) {
      const quality = await this.#quality();
      if (quality) this.emit('connectionQuality', quality);
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
    const pcs = [this.publishPc, this.subscribePc, ...[...this.mesh.values()].map((l) => l.pc)];
    for (const pc of pcs) {
      if (!pc || pc.connectionState === 'closed') continue;
      const previous = this.#statsBefore.get(pc) ?? new Map();
      this.#statsBefore.set(pc, previous);
      const report = await pc.getStats().catch(() => new Map());
      for (const s of report.values()) {
        const key = s.id;
        const before = previous.get(key);
        if (s.type === 'candidate-pair' && s.nominated && s.currentRoundTripTime != null) {
          rtt = Math.max(rtt ?? 0, s.currentRoundTripTime * 1000);
        }
        if (s.type !== 'inbound-rtp' && s.type !== 'outbound-rtp') continue;
        previous.set(key, s);
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
    };
  }

  /**
   * @param {'audio' | 'video'} kind
   * @param {boolean} enabled
   */
  #setEnabled(kind, enabled) {
    for (const track of this.localStream?.getTracks() ?? []) {
      if (track.kind !== kind || track.enabled === enabled) continue;
      track.enabled = enabled;
      this.#send({ type: 'mute', trackId: this.#announcedId(track), muted: !enabled });
    }
  }

  // --- socket -------------------------------------------------------------------------------

  /**
   * @param {URL} base
   * @param {string} token
   */
  #openSocket(base, token) {
    const url = new URL('/ws/signal', base);
    url.protocol = base.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('token', token);
    const ws = new WebSocket(url);
    this.#ws = ws;
    return new Promise((resolve, reject) => {
      // A black-holed network would otherwise leave this pending past any deadline.
      const timer = setTimeout(() => {
        reject(new SwitchboardError('unreachable', `no answer from ${url.origin}/ws/signal`));
        if (ws.readyState === WebSocket.CONNECTING) ws.close();
      }, SOCKET_OPEN_TIMEOUT_MS);
      ws.addEventListener('open', () => clearTimeout(timer));
      ws.addEventListener('close', () => clearTimeout(timer));
      ws.onopen = () => resolve(undefined);
      ws.onerror = () => reject(new SwitchboardError('socket', `cannot open ${url.origin}/ws/signal`));
      ws.onclose = (ev) => {
        reject(new SwitchboardError('socket', `signaling socket closed (${ev.code})`));
        if (this.#ws !== ws) return;
        if (this.state === 'joined') this.#reconnect(ev.reason || `signaling socket closed (${ev.code})`);
        else if (this.state === 'connecting') this.#close(ev.reason || 'socket closed', true, ev.code);
        // While reconnecting, the attempt fails (here, or its join) and the next one follows.
        else if (this.state === 'reconnecting') {
          this.#joinWaiter?.reject(new SwitchboardError('socket', `signaling socket closed (${ev.code})`));
          this.#joinWaiter = null;
        }
      };
      ws.onmessage = (ev) => {
        if (this.#ws !== ws) return;
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch {
          this.emit('error', { code: 'bad_message', message: 'server sent invalid JSON' });
          return;
        }
        this.#queue = this.#queue
          // A message of a socket replaced since (a reconnect) is about a session that is gone.
          .then(() => (this.#ws === ws ? withTimeout(this.#handle(msg), HANDLER_TIMEOUT_MS, `handling \`${msg?.type}\``) : undefined))
          .catch((err) => this.#fail(msg?.type ?? 'message', err));
      };
    });
  }

  /** @param {object} msg */
  #send(msg) {
    if (this.#ws?.readyState === WebSocket.OPEN) this.#ws.send(JSON.stringify(msg));
  }

  /**
   * @param {string} name
   * @param {number} timeoutMs
   * @returns {Promise<any>} the `joined` message
   */
  #join(name, timeoutMs) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new SwitchboardError('timeout', 'no answer to join')),
        timeoutMs,
      );
      this.#joinWaiter = {
        resolve: (msg) => (clearTimeout(timer), resolve(msg)),
        reject: (err) => (clearTimeout(timer), reject(err)),
      };
      this.#send({ type: 'join', name, ...(this.#resumeToken ? { resume: this.#resumeToken } : {}) });
    });
  }

  /**
   * Gets back into the room after the server was lost (network drop, server restart): drops
   * the connections and remote participants, keeps local media, and rejoins with a fresh token
   * and the resume secret, retrying for up to 30 s.
   * @param {string} reason
   */
  async #reconnect(reason) {
    const session = this.#session;
    if (this.state !== 'joined' || !session) return;
    this.state = 'reconnecting';
    this.emit('reconnecting', { reason });
    this.#dropRoomState();
    const deadline = Date.now() + RECONNECT_WINDOW_MS;
    let lastError = reason;
    for (let attempt = 0; Date.now() < deadline; attempt++) {
      await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** attempt, 2000)));
      if (this.state !== 'reconnecting') return;
      try {
        const token = await fetchToken(session.base, session.name, session.room);
        // Left meanwhile: no socket, no join (it would seat a phantom).
        if (this.state !== 'reconnecting') return;
        await this.#openSocket(session.base, token);
        if (this.state !== 'reconnecting') return;
        await this.#join(session.name, Math.min(session.joinTimeoutMs, Math.max(1000, deadline - Date.now())));
        this.emit('reconnected', {});
        return;
      } catch (err) {
        lastError = err instanceof Error ? err.message : String(err);
        const ws = this.#ws;
        this.#ws = null;
        ws?.close();
        if (this.state !== 'reconnecting') return;
        // `name_taken` is not final here: an earlier attempt that was seated may hold the name
        // until the server notices it is gone.
        if (err instanceof SwitchboardError && FATAL_CODES.includes(err.code) && err.code !== 'name_taken') break;
      }
    }
    this.#close(`could not reconnect: ${lastError}`, true);
  }

  /** Forgets everything about the room but the local media, for a reconnect. */
  #dropRoomState() {
    // A handler may be awaiting a connection closed below, whose promise then never settles:
    // the new session's messages must not queue behind it.
    this.#queue = Promise.resolve();
    if (this.#livePoll) clearTimeout(this.#livePoll);
    this.#livePoll = null;
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onerror = null;
      ws.close();
    }
    this.#closeSfu();
    for (const peerId of [...this.mesh.keys()]) this.#closeMeshLink(peerId);
    for (const peerId of [...this.participants.keys()]) this.#removeParticipant(peerId);
    this.switching = false;
    this.#readySent = false;
    this.#remoteMuted.clear();
    this.#lightened.clear();
  }

  /**
   * @param {string} reason
   * @param {boolean} notify  emit `disconnected` (only once the room was joined)
   * @param {number} [code]
   */
  #close(reason, notify, code) {
    if (this.state === 'closed') return;
    const wasJoined = this.state === 'joined' || this.state === 'reconnecting';
    this.state = 'closed';
    this.#joinWaiter?.reject(new SwitchboardError('closed', reason));
    this.#joinWaiter = null;
    if (this.#livePoll) clearTimeout(this.#livePoll);
    if (this.#statsTimer) clearInterval(this.#statsTimer);
    const ws = this.#ws;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onerror = null;
      if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(1000);
    }
    this.#closeSfu();
    for (const peerId of [...this.mesh.keys()]) this.#closeMeshLink(peerId);
    for (const track of this.localStream?.getTracks() ?? []) track.stop();
    this.screenTrack?.stop();
    for (const peerId of [...this.participants.keys()]) this.#removeParticipant(peerId);
    if (notify && wasJoined) this.emit('disconnected', { reason, code });
  }

  /**
   * @param {string} context
   * @param {unknown} err
   */
  #fail(context, err) {
    if (this.state === 'closed') return;
    const message = err instanceof Error ? err.message : String(err);
    const code = err instanceof SwitchboardError ? err.code : 'client';
    console.error(`switchboard: ${context} failed`, err);
    this.emit('error', { code, message: `${context}: ${message}`, requestType: context });
  }

  // --- incoming messages ----------------------------------------------------------------------

  /** @param {any} msg */
  async #handle(msg) {
    if (this.state === 'closed') return;
    const fromSfu = msg?.peerId === 'sfu';
    switch (msg?.type) {
      case 'joined':
        return this.#onJoined(msg);
      case 'error':
        return this.#onError(msg);
      case 'peer_joined':
        return this.#addParticipant(msg.peerId, msg.name);
      case 'peer_left':
        return this.#removeParticipant(msg.peerId);
      case 'mode':
        return this.#onMode(msg);
      case 'answer':
        if (!fromSfu) return this.#onMeshDescription(msg);
        if (msg.transport === 'publish' && this.publishPc) {
          await this.publishPc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
          if (this.#publishPending) await this.#offerPublish();
        }
        return;
      case 'offer':
        if (!fromSfu) return this.#onMeshDescription(msg);
        // One the server queued just before settling in mesh: its connection is gone.
        if (this.mode === 'mesh' && !this.switching) return;
        if (msg.transport === 'subscribe') await this.#onSubscribeOffer(msg);
        return;
      case 'ice-candidate': {
        if (!fromSfu && msg.peerId) return this.#onMeshCandidate(msg);
        const pc = msg.transport === 'publish' ? this.publishPc : this.subscribePc;
        if (pc && msg.candidate?.candidate) await pc.addIceCandidate(msg.candidate);
        return;
      }
      case 'mute':
        return this.#onRemoteMute(msg);
      case 'chat':
        return this.#onChat(msg);
      default:
        // Unknown message types are ignored, as unknown fields are (forward compatibility).
        return;
    }
  }

  /** @param {any} msg */
  #onJoined(msg) {
    if (!this.#joinWaiter) return;
    // State is set here, not in connect(), so that messages queued behind `joined` see it.
    this.state = 'joined';
    this.participantId = String(msg.participantId);
    this.roomName = msg.room ?? null;
    this.name = msg.name ?? null;
    this.iceServers = Array.isArray(msg.iceServers) ? msg.iceServers : [];
    this.#resumeToken = typeof msg.resumeToken === 'string' ? msg.resumeToken : null;
    this.mode = msg.mode === 'mesh' ? 'mesh' : 'sfu';
    // The server knows nothing of mutes made before this join (or before a reconnect).
    for (const track of this.localStream?.getTracks() ?? []) {
      if (!track.enabled) this.#send({ type: 'mute', trackId: this.#announcedId(track), muted: true });
    }
    if (this.mode === 'sfu') this.#startSfu();
    this.#startStats();
    for (const peer of msg.peers ?? []) this.#addParticipant(peer.peerId, peer.name);
    for (const message of Array.isArray(msg.chat) ? msg.chat : []) this.#onChat(message);
    this.#joinWaiter.resolve(msg);
    this.#joinWaiter = null;
    this.emit('modeChanged', { mode: this.mode, phase: 'settled' });
  }

  /** @param {any} msg */
  #onError(msg) {
    const event = {
      code: String(msg.code ?? 'unknown'),
      message: String(msg.message ?? ''),
      requestType: msg.requestType,
    };
    // Only `join` refusals (name_taken, room_full, ...) end the connection attempt.
    if (this.#joinWaiter && (event.requestType === 'join' || !event.requestType)) {
      this.#joinWaiter.reject(new SwitchboardError(event.code, event.message, event.requestType));
      this.#joinWaiter = null;
    }
    // The server refused a publish offer: roll it back so later changes can be offered.
    if (event.code === 'invalid_sdp' && event.requestType === 'offer' && this.publishPc?.signalingState === 'have-local-offer') {
      this.publishPc.setLocalDescription({ type: 'rollback' }).catch(() => {});
    }
    // The SDK addresses only participants it knows: an unknown one has just left, and a message
    // (a trickled candidate, say) crossed its `peer_left`. Likewise a negotiation message that
    // crossed a change of mode. Nothing for the app to act on.
    const negotiation = ['offer', 'answer', 'ice-candidate', 'pause'].includes(event.requestType);
    const crossedModeChange = event.code === 'invalid_state' && Date.now() - this.#modeChangedAt < 3000;
    if (negotiation && (event.code === 'unknown_peer' || crossedModeChange)) {
      console.debug(`switchboard: ${event.message}`);
      return;
    }
    this.emit('error', event);
  }

  /**
   * @param {string} peerId
   * @param {string} [name]
   */
  #addParticipant(peerId, name) {
    if (!peerId || peerId === this.participantId) return this.participants.get(peerId);
    const existing = this.participants.get(peerId);
    if (existing) {
      if (name && name !== existing.name) {
        existing.name = name;
        this.emit('participantUpdated', existing);
      }
      return existing;
    }
    /** @type {Participant} */
    const participant = { peerId, name: name || peerId, tracks: new Map() };
    this.participants.set(peerId, participant);
    this.emit('participantJoined', participant);
    if (this.mode === 'mesh' && this.#offersTo(peerId)) this.#meshLink(peerId);
    // An offer may already carry this participant's media.
    this.#reconcile();
    return participant;
  }

  /** @param {string} peerId */
  #removeParticipant(peerId) {
    const participant = this.participants.get(peerId);
    if (!participant) return;
    this.#closeMeshLink(peerId);
    // Drop its media at once rather than waiting for the next subscribe offer.
    for (const [key, remote] of [...this.#active]) {
      if (remote.peerId === peerId) this.#unannounce(key);
    }
    this.participants.delete(peerId);
    this.emit('participantLeft', participant);
    this.#checkReady();
  }

  /** @param {any} msg */
  #onChat(msg) {
    // A rejoin replays the history: show each message once. (A restarted server numbers
    // from 1 again, hence the time in the key.)
    const key = `${msg.id}@${msg.at}`;
    if (this.#chatSeen.has(key)) return;
    this.#chatSeen.add(key);
    if (this.#chatSeen.size > 1000) this.#chatSeen.delete(/** @type {string} */ (this.#chatSeen.values().next().value));
    /** @type {ChatMessage} */
    const message = {
      id: Number(msg.id),
      peerId: String(msg.peerId ?? ''),
      name: String(msg.name ?? ''),
      text: String(msg.text ?? ''),
      at: Number(msg.at),
    };
    this.chat.push(message);
    if (this.chat.length > 500) this.chat.splice(0, this.chat.length - 500);
    this.emit('chatMessage', message);
  }

  /** @param {any} msg */
  #onRemoteMute(msg) {
    const muted = !!msg.muted;
    if (msg.trackId) this.#remoteMuted.set(`${msg.peerId}|${msg.trackId}`, muted);
    for (const sub of this.subscriptions.values()) {
      if (sub.publicationId === msg.publicationId) sub.muted = muted;
    }
    for (const remote of this.#active.values()) {
      const same =
        remote.peerId === msg.peerId &&
        ((msg.trackId && remote.trackId === msg.trackId) ||
          (msg.publicationId && remote.publicationId === msg.publicationId));
      if (!same) continue;
      remote.muted = muted;
      this.emit('trackMuted', {
        peerId: remote.peerId,
        publicationId: remote.publicationId,
        source: remote.source,
        muted,
      });
    }
  }

  // --- mode switching -------------------------------------------------------------------------

  /** @param {any} msg */
  #onMode(msg) {
    /** @type {Mode} */
    const mode = msg.mode === 'mesh' ? 'mesh' : 'sfu';
    if (msg.phase === 'switching') {
      this.mode = mode;
      this.switching = true;
      this.#readySent = false;
      this.#switchNumber = typeof msg.switch === 'number' ? msg.switch : undefined;
      // Make: bring up the new path beside the old one.
      this.#modeChangedAt = Date.now();
      // The path being left only has to bridge the switch: lighten it. A switch overtaken by
      // one back gets its path restored.
      const meshPcs = [...this.mesh.values()].map((l) => l.pc);
      this.#lightenCamera(mode === 'sfu' ? meshPcs : [this.publishPc]);
      this.#restoreCamera(mode === 'sfu' ? [this.publishPc] : meshPcs);
      if (mode === 'sfu') this.#startSfu();
      else {
        for (const peerId of this.participants.keys()) {
          if (!this.#offersTo(peerId)) continue;
          const existing = this.mesh.get(peerId);
          // An offer made before a switch overtook this one may have been dropped: send it again.
          const pc = existing?.pc;
          if (pc && pc.signalingState === 'have-local-offer' && pc.localDescription) {
            this.#send({ type: 'offer', peerId, sdp: pc.localDescription.sdp, tracks: this.#localTrackInfo(pc) });
          } else this.#meshLink(peerId);
        }
      }
      this.emit('modeChanged', { mode, phase: 'switching' });
      this.#reconcile();
      return;
    }
    if (msg.phase === 'settled' && mode === this.mode) {
      this.switching = false;
      this.#modeChangedAt = Date.now();
      // Break: the old path's connections go.
      if (mode === 'sfu') for (const peerId of [...this.mesh.keys()]) this.#closeMeshLink(peerId);
      else this.#closeSfu();
      this.#lightened.clear();
      this.emit('modeChanged', { mode, phase: 'settled' });
      this.#reconcile();
    }
  }

  /**
   * Sends the camera on `pcs` at a fraction of its size and frame rate (see SWITCH_OLD_PATH_SCALE).
   * @param {(RTCPeerConnection | null)[]} pcs
   */
  #lightenCamera(pcs) {
    for (const sender of this.#cameraSenders(pcs)) {
      if (this.#lightened.has(sender)) continue;
      /** @type {{scaleResolutionDownBy?: number, maxFramerate?: number}} */
      const saved = {};
      this.#lightened.set(sender, saved);
      this.#updateEncoding(sender, (encoding) => {
        saved.scaleResolutionDownBy = encoding.scaleResolutionDownBy;
        saved.maxFramerate = encoding.maxFramerate;
        encoding.scaleResolutionDownBy = Math.max(encoding.scaleResolutionDownBy ?? 1, SWITCH_OLD_PATH_SCALE);
        encoding.maxFramerate = Math.min(encoding.maxFramerate ?? Infinity, SWITCH_OLD_PATH_FPS);
      });
    }
  }

  /**
   * Undoes #lightenCamera on `pcs`.
   * @param {(RTCPeerConnection | null)[]} pcs
   */
  #restoreCamera(pcs) {
    for (const sender of this.#cameraSenders(pcs)) {
      const saved = this.#lightened.get(sender);
      if (!saved) continue;
      this.#lightened.delete(sender);
      this.#updateEncoding(sender, (encoding) => {
        encoding.scaleResolutionDownBy = saved.scaleResolutionDownBy ?? 1;
        if (saved.maxFramerate === undefined) delete encoding.maxFramerate;
        else encoding.maxFramerate = saved.maxFramerate;
      });
    }
  }

  /**
   * Changes a sender's first encoding. One change at a time per sender: each setParameters must
   * follow its own getParameters, and a restore must not overtake the lightening it undoes.
   * @param {RTCRtpSender} sender
   * @param {(encoding: RTCRtpEncodingParameters) => void} change
   */
  #updateEncoding(sender, change) {
    const previous = this.#encodingUpdates.get(sender) ?? Promise.resolve();
    const next = previous
      .then(async () => {
        const params = sender.getParameters();
        const encoding = params.encodings?.[0];
        // Not negotiated yet: nothing is encoded for it.
        if (!encoding) return;
        change(encoding);
        await sender.setParameters(params);
      })
      // A connection closing meanwhile (the switch settling) needs no change.
      .catch((err) => console.debug('switchboard: sender encoding', err));
    this.#encodingUpdates.set(sender, next);
  }

  /**
   * @param {(RTCPeerConnection | null)[]} pcs
   * @returns {RTCRtpSender[]}  the senders of the local camera on `pcs`
   */
  #cameraSenders(pcs) {
    const out = [];
    for (const pc of pcs) {
      if (!pc || pc.signalingState === 'closed') continue;
      for (const sender of pc.getSenders()) {
        if (sender.track?.kind === 'video' && sender.track !== this.screenTrack) out.push(sender);
      }
    }
    return out;
  }

  /** Tells the server, once per switch, when everything shown comes through the new path. */
  #checkReady() {
    if (!this.switching || this.#readySent || this.state !== 'joined') return;
    for (const remote of this.#active.values()) if (remote.path !== this.mode) return;
    this.#readySent = true;
    this.#send({ type: 'ready', mode: this.mode, switch: this.#switchNumber });
  }

  /**
   * Brings the announced remote tracks in line with both paths' connections. For each
   * participant's source, the current mode's track is shown once it decodes (or when there is
   * nothing else to show); until then the other path's track keeps playing.
   */
  #reconcile() {
    if (this.state === 'closed') return;
    /** @type {Map<string, {preferred?: RemoteTrack, other?: RemoteTrack}>} */
    const groups = new Map();
    for (const candidate of [...this.#sfuTracks(), ...this.#meshTracks()]) {
      if (!this.participants.has(candidate.peerId)) continue;
      const key = `${candidate.peerId}|${candidate.kind}|${candidate.source}`;
      const group = groups.get(key) ?? {};
      groups.set(key, group);
      if (candidate.path === this.mode) group.preferred ??= candidate;
      else group.other ??= candidate;
    }
    let waiting = false;
    /** @type {Map<string, RemoteTrack>} */
    const wanted = new Map();
    for (const [key, { preferred, other }] of groups) {
      // A paused video decodes nothing, and is not shown anyway: it need not wait.
      const paused =
        preferred?.kind === 'video' && preferred.source === 'camera' && preferred.path === 'sfu' && this.#videoPaused.has(preferred.peerId);
      const preferredLive = !!preferred && (paused || this.#live.has(preferred.track));
      if (preferred && other && !preferredLive) waiting = true;
      const pick = preferred && (preferredLive || !other) ? preferred : (other ?? preferred);
      if (pick) wanted.set(key, pick);
    }
    // Retire first, then announce, in this one task: the app never shows a gap or two at once.
    for (const [key, remote] of [...this.#active]) {
      const next = wanted.get(key);
      if (!next || next.track !== remote.track || next.publicationId !== remote.publicationId) {
        this.#unannounce(key);
      }
    }
    for (const [key, remote] of wanted) {
      const current = this.#active.get(key);
      if (current) {
        // Same track: what later descriptions or offers say about it may be news.
        current.trackId = remote.trackId;
        if (current.muted !== remote.muted) {
          current.muted = remote.muted;
          this.emit('trackMuted', {
            peerId: current.peerId,
            publicationId: current.publicationId,
            source: current.source,
            muted: current.muted,
          });
        }
        continue;
      }
      this.#active.set(key, remote);
      this.participants.get(remote.peerId)?.tracks.set(remote.publicationId, remote);
      this.emit('trackSubscribed', remote);
    }
    this.#checkReady();
    if ((waiting || (this.switching && !this.#readySent)) && !this.#livePoll) {
      this.#livePoll = setTimeout(() => this.#pollLive(), LIVE_POLL_MS);
    }
  }

  /** Marks new-path tracks that decode media as live, then reconciles. */
  async #pollLive() {
    this.#livePoll = null;
    if (this.state === 'closed') return;
    const candidates = this.mode === 'sfu' ? this.#sfuTracks() : this.#meshTracks();
    await Promise.all(
      candidates
        .filter((c) => !this.#live.has(c.track))
        .map(async (c) => {
          try {
            for (const s of (await c.receiver.getStats()).values()) {
              if (s.type !== 'inbound-rtp') continue;
              const count = (c.kind === 'video' ? s.framesDecoded : s.packetsReceived) ?? 0;
              const enough = count >= (c.kind === 'video' ? LIVE_MIN_FRAMES : LIVE_MIN_AUDIO_PACKETS);
              const last = this.#progress.get(c.track);
              this.#progress.set(c.track, count);
              if (count > 0 && !this.#firstMediaAt.has(c.track)) this.#firstMediaAt.set(c.track, Date.now());
              // A camera that is off sends about one black frame a second, and a still screen
              // share hardly more: media that keeps arriving slowly counts after a while.
              const slowButThere = count > 0 && Date.now() - (this.#firstMediaAt.get(c.track) ?? Date.now()) > LIVE_SLOW_MS;
              if ((enough && last !== undefined && count > last) || slowButThere) this.#live.add(c.track);
            }
          } catch {
            // The connection closed meanwhile: the next reconcile drops the track.
          }
        }),
    );
    this.#reconcile();
  }

  /** @param {string} key */
  #unannounce(key) {
    const remote = this.#active.get(key);
    if (!remote) return;
    this.#active.delete(key);
    this.participants.get(remote.peerId)?.tracks.delete(remote.publicationId);
    this.emit('trackUnsubscribed', remote);
  }

  // --- SFU path: publish and subscribe connections ---------------------------------------------

  /** Opens the publish connection (the server offers the subscribe one). */
  #startSfu() {
    if (this.publishPc) return;
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.publishPc = pc;
    this.#watchSfuPc(pc, 'publish');
    const stream = this.localStream;
    for (const track of stream?.getTracks() ?? []) {
      pc.addTransceiver(track, { direction: 'sendonly', streams: [/** @type {MediaStream} */ (stream)] });
    }
    if (this.screenTrack && this.#screenStream) {
      pc.addTransceiver(this.screenTrack, { direction: 'sendonly', streams: [this.#screenStream] });
    }
    pc.onnegotiationneeded = () => this.#offerPublish().catch((err) => this.#fail('publish', err));
  }

  /** Offers the publish connection now, or once the outstanding offer is answered. */
  async #offerPublish() {
    const pc = this.publishPc;
    if (!pc || pc.signalingState === 'closed') return;
    if (pc.signalingState !== 'stable') {
      this.#publishPending = true;
      return;
    }
    this.#publishPending = false;
    if (pc.getTransceivers().every((t) => !t.sender.track && t.mid == null)) return;
    await pc.setLocalDescription(await pc.createOffer());
    if (this.state !== 'joined' || this.publishPc !== pc) return;
    this.#sendDescription(pc, 'publish', { type: 'offer', tracks: this.#localTrackInfo(pc) });
  }

  #closeSfu() {
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
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.subscribePc = pc;
    this.#watchSfuPc(pc, 'subscribe');
    pc.ontrack = (ev) => {
      const mid = ev.transceiver.mid;
      if (mid != null && ev.streams[0]) this.#streamIdByMid.set(mid, ev.streams[0].id);
    };
    return pc;
  }

  /** @param {any} msg */
  async #onSubscribeOffer(msg) {
    const pc = this.#ensureSubscribePc();
    this.subscriptions = new Map(
      (msg.subscriptions ?? []).map((/** @type {Subscription} */ s) => [String(s.mid), s]),
    );
    for (const sub of this.subscriptions.values()) {
      if (sub.trackId) this.#remoteMuted.set(`${sub.peerId}|${sub.trackId}`, !!sub.muted);
    }
    await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    // The server is the controlling ICE agent here. A client candidate it first learns from
    // a connectivity check (peer-reflexive) is nominated only after a wait of about a second,
    // so the first answer carries the host candidates instead of trickling them.
    await iceGatheringComplete(pc, SUBSCRIBE_GATHER_WAIT_MS);
    if (this.state !== 'joined' || this.subscribePc !== pc) return;
    this.#sendDescription(pc, 'subscribe', { type: 'answer' });
    this.#applyPauses();
    this.#reconcile();
  }

  /**
   * The subscribe connection's receiving sections, as remote tracks.
   * Sections are identified by mid; a reused section (new publicationId on an old mid)
   * is a different track.
   * @returns {RemoteTrack[]}
   */
  #sfuTracks() {
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
        muted: sub?.trackId ? (this.#remoteMuted.get(`${peerId}|${sub.trackId}`) ?? !!sub.muted) : !!sub?.muted,
        trackId: sub?.trackId,
        receiver: transceiver.receiver,
        path: 'sfu',
      });
    }
    return out;
  }

  // --- mesh path: one connection per participant, perfect negotiation ---------------------------

  /**
   * Of each pair, the participant whose id sorts first makes the first offer and is the
   * impolite side of perfect negotiation (docs/protocol.md, section 4).
   * @param {string} peerId
   */
  #offersTo(peerId) {
    return /** @type {string} */ (this.participantId) < peerId;
  }

  /**
   * The connection to `peerId`, created with the local tracks in it.
   * @param {string} peerId
   * @returns {MeshLink}
   */
  #meshLink(peerId) {
    const existing = this.mesh.get(peerId);
    if (existing) return existing;
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    /** @type {MeshLink} */
    const link = {
      pc,
      polite: !this.#offersTo(peerId),
      makingOffer: false,
      ignoreOffer: false,
      remoteTracks: new Map(),
    };
    this.mesh.set(peerId, link);
    pc.onicecandidate = (ev) => {
      if (ev.candidate) {
        const { candidate, sdpMid, sdpMLineIndex } = ev.candidate;
        this.#send({ type: 'ice-candidate', peerId, candidate: { candidate, sdpMid, sdpMLineIndex } });
      }
    };
    pc.onnegotiationneeded = async () => {
      try {
        link.makingOffer = true;
        await pc.setLocalDescription();
        if (this.mesh.get(peerId) !== link || !pc.localDescription) return;
        this.#send({
          type: 'offer',
          peerId,
          sdp: pc.localDescription.sdp,
          tracks: this.#localTrackInfo(pc),
        });
      } catch (err) {
        this.#fail('mesh offer', err);
      } finally {
        link.makingOffer = false;
      }
    };
    pc.ontrack = () => this.#reconcile();
    let restarted = false;
    const giveUp = () => {
      if (this.mesh.get(peerId) !== link || pc.connectionState === 'connected' || link.failed) return;
      // A link left over while the room moves to the SFU (its offer dropped by the peer on
      // switching) says nothing about the network.
      if (this.mode !== 'mesh') return;
      // Tell the server: the room moves to the SFU, which every participant can reach.
      link.failed = true;
      this.#send({ type: 'mesh_failed', peerId });
    };
    const watchdog = setTimeout(giveUp, MESH_CONNECT_TIMEOUT_MS);
    pc.onconnectionstatechange = () => {
      if (this.mesh.get(peerId) !== link) return;
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
    const stream = this.localStream;
    for (const track of stream?.getTracks() ?? []) {
      if (!sending.has(track)) pc.addTrack(track, /** @type {MediaStream} */ (stream));
    }
    if (this.screenTrack && this.#screenStream && !sending.has(this.screenTrack)) {
      pc.addTrack(this.screenTrack, this.#screenStream);
    }
  }

  /** @param {any} msg  a relayed `offer` or `answer` */
  async #onMeshDescription(msg) {
    const peerId = String(msg.peerId ?? '');
    if (!this.participants.has(peerId)) return;
    // In an SFU room only existing mesh connections (kept until the switch settles) renegotiate.
    if (this.mode === 'sfu' && !this.mesh.has(peerId)) return;
    const link = this.#meshLink(peerId);
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
        this.#remoteMuted.set(`${peerId}|${info.trackId}`, info.muted);
      }
    }
    await pc.setRemoteDescription({ type: msg.type, sdp: msg.sdp });
    if (msg.type === 'offer') {
      this.#addLocalTracks(pc);
      await pc.setLocalDescription();
      if (this.mesh.get(peerId) !== link || !pc.localDescription) return;
      this.#send({
        type: 'answer',
        peerId,
        sdp: pc.localDescription.sdp,
        tracks: this.#localTrackInfo(pc),
      });
    }
    this.#reconcile();
  }

  /** @param {any} msg */
  async #onMeshCandidate(msg) {
    const link = this.mesh.get(String(msg.peerId));
    if (!link || !msg.candidate?.candidate) return;
    try {
      await link.pc.addIceCandidate(msg.candidate);
    } catch (err) {
      if (!link.ignoreOffer) throw err;
    }
  }

  /** @param {string} peerId */
  #closeMeshLink(peerId) {
    const link = this.mesh.get(peerId);
    if (!link) return;
    this.mesh.delete(peerId);
    link.pc.close();
  }

  /**
   * The mesh connections' receiving sections, as remote tracks.
   * @returns {RemoteTrack[]}
   */
  #meshTracks() {
    /** @type {RemoteTrack[]} */
    const out = [];
    for (const [peerId, link] of this.mesh) {
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
          muted: info ? (this.#remoteMuted.get(`${peerId}|${info.trackId}`) ?? false) : false,
          trackId: info?.trackId,
          receiver: transceiver.receiver,
          path: 'mesh',
        });
      }
    }
    return out;
  }

  /**
   * What `pc` sends, for the `tracks` of a description.
   * @param {RTCPeerConnection} pc
   * @returns {TrackInfo[]}
   */
  #localTrackInfo(pc) {
    /** @type {TrackInfo[]} */
    const out = [];
    for (const transceiver of pc.getTransceivers()) {
      const track = transceiver.sender.track;
      if (!track) continue;
      const source = this.#localSources.get(this.#announcedId(track)) ?? (track.kind === 'audio' ? 'microphone' : 'camera');
      out.push({ trackId: this.#announcedId(track), source, mid: transceiver.mid, muted: !track.enabled });
    }
    return out;
  }

  // --- ICE on the SFU path ------------------------------------------------------------------------

  /**
   * @param {RTCPeerConnection} pc
   * @param {Transport} transport
   */
  #watchSfuPc(pc, transport) {
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
      if (gate.open) this.#send(msg);
      else gate.held.push(msg);
    };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === 'failed' && this.state === 'joined') {
        this.emit('error', { code: 'connection_failed', message: `${transport} connection failed` });
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
    this.#send({ ...msg, peerId: 'sfu', transport, sdp: pc.localDescription?.sdp });
    const gate = this.#candidateGate[transport];
    if (gate.open) return;
    gate.open = true;
    // Candidates gathered so far are already in the description; only end-of-candidates is news.
    for (const held of gate.held.splice(0)) if (held.candidate === null) this.#send(held);
  }
}

/**
 * `promise`, or a rejection after `ms`.
 * @template T
 * @param {Promise<T>} promise
 * @param {number} ms
 * @param {string} what
 * @returns {Promise<T>}
 */
function withTimeout(promise, ms, what) {
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  const timeout = new Promise((_resolve, reject) => {
    timer = setTimeout(() => reject(new SwitchboardError('timeout', `${what} took over ${ms / 1000} s`)), ms);
  });
  return /** @type {Promise<T>} */ (Promise.race([promise, timeout])).finally(() => clearTimeout(timer));
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

/**
 * @param {URL} base
 * @param {string} userId
 * @param {string} room
 * @returns {Promise<string>}
 */
async function fetchToken(base, userId, room) {
  /** @type {Response} */
  let res;
  try {
    res = await fetch(new URL('/auth/token', base), {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ userId, room }),
      signal: AbortSignal.timeout(SOCKET_OPEN_TIMEOUT_MS),
    });
  } catch (err) {
    throw new SwitchboardError('unreachable', `cannot reach ${base.origin} (${err instanceof Error ? err.message : err})`);
  }
  const body = await res.json().catch(() => null);
  if (!res.ok || typeof body?.token !== 'string') {
    // A proxy's 502/503 while the server restarts is worth retrying; a 4xx is not.
    const code = body?.error?.code ?? (res.status === 401 ? 'unauthorized' : res.status >= 500 ? 'unreachable' : 'bad_request');
    throw new SwitchboardError(code, body?.error?.message ?? `token request failed (${res.status})`);
  }
  return body.token;
}

/**
 * The microphones and cameras this browser offers (labels appear once media access is granted).
 * @returns {Promise<{microphones: MediaDeviceInfo[], cameras: MediaDeviceInfo[]}>}
 */
export async function listDevices() {
  const all = await navigator.mediaDevices.enumerateDevices();
  return {
    microphones: all.filter((d) => d.kind === 'audioinput'),
    cameras: all.filter((d) => d.kind === 'videoinput'),
  };
}

/**
 * Captures camera and microphone, for a preview or for `connect({stream})`.
 * @param {boolean | string} audio  false, true, or a microphone's deviceId
 * @param {boolean | string} video  false, true, or a camera's deviceId
 * @returns {Promise<MediaStream>}  fails with a SwitchboardError `media_unavailable`
 */
export async function captureMedia(audio, video) {
  const constraint = (/** @type {boolean | string} */ v) => (typeof v === 'string' ? { deviceId: { exact: v } } : v);
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: constraint(audio), video: constraint(video) });
  } catch (err) {
    const reason = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
    throw new SwitchboardError('media_unavailable', `cannot use camera or microphone (${reason})`);
  }
}
