// Switchboard browser SDK: signaling protocol version 1 (docs/protocol.md).
// Plain ES module, no dependencies, no build step.
//
//   import { Room } from './client.js';
//   const room = new Room();
//   room.on('trackSubscribed', ({ peerId, track, kind, source }) => {
//     if (kind === 'video') room.observeVideo(videoElement, peerId, source); // sizes the stream
//     ...
//   });
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
//
// Through the server a camera is sent in three simulcast layers (a quarter, a half and the whole
// of its size; a camera under 960x540 in the top two), and each subscriber gets the smallest that
// covers the largest element it shows that video in: `observeVideo(element, peerId, source)` watches an element's size, and
// `setVideoSize` tells a size the app knows otherwise. A video whose size was never told comes
// as the server chooses.

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
 * @property {string} [token]  a token your backend minted (a server with API keys mints none for
 *   pages): used for the join and for reconnecting, instead of asking `/auth/token`
 *
 * @typedef {object} ConnectionQuality  Measured over the last two seconds, all connections.
 * @property {number | null} rttMs  round-trip time to the server or the peers (the worst)
 * @property {number} lossPercent  incoming packets lost
 * @property {number} sendKbps
 * @property {number} receiveKbps
 * @property {'good' | 'fair' | 'poor'} quality
 * @property {SendLayer[]} sendLayers  the camera's simulcast layers (SFU mode), lowest first
 * @property {ReceivedVideo[]} remoteVideos  each remote video shown
 *
 * @typedef {object} SendLayer  One simulcast layer of the local camera, as encoded now.
 * @property {string} rid  'q' (quarter size), 'h' (half) or 'f' (full)
 * @property {boolean | null} active  false while no subscriber needs it (the server's `layers`);
 *   null when the browser does not say
 * @property {number} frameWidth  0 while nothing is encoded
 * @property {number} frameHeight
 * @property {number} framesPerSecond
 * @property {number} bytesSent  since the connection was made
 * @property {number} kbps
 * @property {string | null} qualityLimitationReason  'cpu' or 'bandwidth' when the browser sends
 *   less than asked, 'none', or null when it does not say
 *
 * @typedef {object} ReceivedVideo  One remote video as decoded now.
 * @property {string} peerId
 * @property {Source} source
 * @property {Mode} path
 * @property {number} frameWidth  the layer received (through the server), 0 before the first frame
 * @property {number} frameHeight
 * @property {number} framesPerSecond
 * @property {number} freezeCount  since the track began
 * @property {number} totalFreezesDuration  seconds
 *
 * @typedef {object} Speaker  One entry of `room.speakers`.
 * @property {string} peerId
 * @property {number} level  0 (just speaking) to 1 (the loudest)
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
 *                                 (as the server hears it in SFU mode; the browser, in a mesh)
 *  - speakers            (Speaker[])   who speaks now, loudest first (SFU mode)
 *  - connectionQuality   (ConnectionQuality)   every two seconds
 *  - localStream         (MediaStream)   local media captured, before joining
 *  - error               (ErrorEvent)
 *  - reconnecting        ({reason: string})   the connection to the server was lost; retrying
 *  - reconnected         ({})   back in the room (participants are announced again)
 *  - disconnected        ({reason: string, code?: number})   for good: left, refused, or 30 s
 *                                 of reconnecting failed
 */

import { SwitchboardError } from './errors.js';
import { LocalMedia, captureMedia } from './devices.js';
import { Emitter } from './emitter.js';
import { SignalingSocket, fetchToken, grantsOf, retryFor, tokenGrants } from './signaling.js';

/** Errors after which the server closes the socket and the session must not come back. */
const FINAL_CODES = ['removed', 'room_ended', 'replaced'];
import { SfuPath } from './sfu.js';
import { MeshPaths } from './mesh.js';
import { ModeSwitcher } from './mode.js';
import { CallStats } from './stats.js';
import { VideoViews } from './views.js';
import { FileTransfers } from './files.js';

export { SwitchboardError } from './errors.js';
export { listDevices, captureMedia } from './devices.js';
export { tokenGrants } from './signaling.js';
export { Lobby } from './lobby.js';
export { Matchmaker } from './matchmaker.js';

export const PROTOCOL_VERSION = 1;

/** How long the SDK keeps trying to get back into the room after losing the server. */
const RECONNECT_WINDOW_MS = 30_000;
/** `redirect`s followed in a row before a join gives up (a cluster needs one). */
const MAX_REDIRECTS = 3;
/** The active speaker stays highlighted through pauses this short. */
const SPEAKER_HOLD_MS = 1500;

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
  /**
   * Whether this participant's token lets it send media. A viewer's (`publish: false`) does not:
   * its camera and microphone are released once the room is joined, and it shares no screen.
   */
  get canPublish() {
    return this.grants.publish;
  }
  /** Whether this participant's token lets it receive the others' media. */
  get canSubscribe() {
    return this.grants.subscribe;
  }
  /** What this participant's token allows, as `joined` said. @type {import('./signaling.js').Grants} */
  grants = grantsOf(undefined);
  /** @type {Map<string, Participant>} remote participants by peerId */
  participants = new Map();
  /** @type {'new' | 'connecting' | 'joined' | 'reconnecting' | 'closed'} */
  state = 'new';
  /** The room's chat so far (the server keeps the latest 100 for those who join later). @type {ChatMessage[]} */
  chat = [];
  /** Who speaks now, loudest first, as the server hears it (SFU). @type {Speaker[]} */
  speakers = [];
  /** The most a video track is sent at, bits per second, as the server said on joining. @type {number | null} */
  maxVideoBitrate = null;
  /**
   * How each video received through the server is served for this client's bandwidth, by
   * publicationId: `lowered` or `paused` (a video not listed is served in `full`).
   * @type {Map<string, 'lowered' | 'paused'>}
   */
  videoAllocation = new Map();
  /** The server's estimate of this client's downlink, bits per second (0: none yet). */
  downlinkEstimate = 0;

  /** @type {{resolve: (msg: any) => void, reject: (err: Error) => void} | null} */
  #joinWaiter = null;
  /** Mute states by `peerId|trackId`, shared by both paths. @type {Map<string, boolean>} */
  #remoteMuted = new Map();
  /** What a reconnect needs: where, who, and the secret that replaces our lost self. */
  /** @type {{base: URL, room: string, name: string, joinTimeoutMs: number, token?: string} | null} */
  #session = null;
  /** @type {string | null} */ #resumeToken = null;
  /** Participants whose video the app does not show (off screen). @type {Set<string>} */
  #videoPaused = new Set();
  /** Chat messages already announced, by `id@at`. @type {Set<string>} */
  #chatSeen = new Set();
  /** The active speaker last announced. @type {string | null} */
  #speaker = null;
  /** Pending announcement that nobody speaks (a pause between words is not silence). @type {ReturnType<typeof setTimeout> | null} */
  #silenceTimer = null;

  // The parts, each with one job; the room wires them together and speaks for them.
  #media = new LocalMedia();
  #socket = new SignalingSocket({
    message: (msg) => this.#handle(msg),
    closed: (ev) => this.#socketClosed(ev),
    failed: (type, err) => this.#fail(type, err),
    invalid: () => this.emit('error', { code: 'bad_message', message: 'server sent invalid JSON' }),
  });
  /** @type {SfuPath} */
  #sfu = new SfuPath({
    send: (msg) => this.#send(msg),
    iceServers: () => this.iceServers,
    joined: () => this.state === 'joined',
    media: this.#media,
    remoteMuted: this.#remoteMuted,
    maxVideoBitrate: () => this.maxVideoBitrate,
    changed: () => {
      this.#switcher.reconcile();
      this.#views.sync();
    },
    fail: (context, err) => this.#fail(context, err),
    error: (event) => this.emit('error', event),
    dataChannel: (peerId, channel) => this.#files.incoming(peerId, channel),
  });
  /** How large each remote video is shown, told to the server (SFU). */
  #views = new VideoViews({
    send: (msg) => this.#send(msg),
    joined: () => this.state === 'joined',
    subscribePc: () => this.#sfu.subscribePc,
    subscriptions: () => this.#sfu.subscriptions.values(),
  });
  /** @type {MeshPaths} */
  #mesh = new MeshPaths({
    send: (msg) => this.#send(msg),
    iceServers: () => this.iceServers,
    participantId: () => this.participantId ?? '',
    mode: () => /** @type {Mode} */ (this.#switcher.mode),
    knows: (peerId) => this.participants.has(peerId),
    media: this.#media,
    remoteMuted: this.#remoteMuted,
    changed: () => this.#switcher.reconcile(),
    dataChannel: (peerId, channel) => this.#files.incoming(peerId, channel),
    fail: (context, err) => this.#fail(context, err),
  });
  #files = new FileTransfers({
    // In mesh browser to browser, on the SFU through the server.
    openChannel: (peerId, label) => {
      if (this.#switcher.mode === 'sfu') return this.#sfu.relay?.open(peerId, label) ?? null;
      return this.#mesh.links.get(peerId)?.pc.createDataChannel(label) ?? null;
    },
    peers: () => [...this.participants.keys()],
    emit: (type, arg) => this.emit(type, arg),
  });
  /** @type {ModeSwitcher} */
  #switcher = new ModeSwitcher({
    send: (msg) => this.#send(msg),
    joined: () => this.state === 'joined',
    closed: () => this.state === 'closed',
    participants: this.participants,
    videoPaused: this.#videoPaused,
    media: this.#media,
    sfu: this.#sfu,
    mesh: this.#mesh,
    emit: (type, arg) => this.emit(type, arg),
  });
  /** The active speaker and the connection badge. */
  #stats = new CallStats({
    remoteTracks: () => this.#switcher.shown(),
    connections: () => [this.#sfu.publishPc, this.#sfu.subscribePc, ...this.#mesh.connections()],
    busy: () => this.state !== 'joined' || this.#switcher.switching,
    // In a mesh nobody but the browser hears the others: the loudest decoded microphone.
    onSpeaker: (peerId) => {
      if (this.mode !== 'mesh') return;
      this.#speaker = peerId;
      this.emit('activeSpeaker', { peerId });
    },
    onQuality: (quality) => this.emit('connectionQuality', quality),
  });

  /** The room's mode (during a switch, the mode it is switching to). @returns {Mode} */
  get mode() {
    return this.#switcher.mode;
  }

  /** True between `mode`/`switching` and `mode`/`settled`. */
  get switching() {
    return this.#switcher.switching;
  }

  /** The connection to the server we send on (SFU mode). */
  get publishPc() {
    return this.#sfu.publishPc;
  }

  /** The connection from the server we receive on (SFU mode). */
  get subscribePc() {
    return this.#sfu.subscribePc;
  }

  /** The latest subscribe offer's sections, by mid. */
  get subscriptions() {
    return this.#sfu.subscriptions;
  }

  /** Mesh connections by peerId. */
  get mesh() {
    return this.#mesh.links;
  }

  /** Camera and microphone as captured (or switched to). */
  get localStream() {
    return this.#media.stream;
  }

  /** The screen being shared, if any. */
  get screenTrack() {
    return this.#media.screenTrack;
  }

  /**
   * @param {string} serverUrl
   * @param {ConnectOptions} options
   */
  async connect(serverUrl, { room, name, audio = true, video = true, stream: given, joinTimeoutMs = 15000, token: minted }) {
    if (this.state !== 'new') throw new Error('Room.connect may be called once');
    this.state = 'connecting';
    const base = new URL(serverUrl);
    try {
      // A viewer's token (no `publish` grant) sends nothing: no camera or microphone is asked for.
      if (minted && tokenGrants(minted)?.publish === false) {
        for (const track of given?.getTracks() ?? []) track.stop();
        given = undefined;
        audio = video = false;
      }
      // Media first: whichever mode the room is in, connections are made with the tracks in them.
      if (given || audio || video) {
        const stream = given ?? (await captureMedia(audio, video));
        if (this.state !== 'connecting') {
          for (const track of stream.getTracks()) track.stop();
          throw new SwitchboardError('closed', 'left while capturing media');
        }
        this.#media.adopt(stream);
        this.emit('localStream', stream);
      }
      this.#session = { base, room, name, joinTimeoutMs, token: minted };
      const token = minted ?? (await fetchToken(base, name, room));
      const deadline = Date.now() + joinTimeoutMs;
      for (;;) {
        try {
          await this.#enter(base, token, name, deadline);
          break;
        } catch (err) {
          // Joins are limited per address and per room: in a crowd arriving at once, wait a
          // moment. A node of a cluster that cannot reach its store now may a second later.
          const retry = err instanceof SwitchboardError && (err.code === 'rate_limited' || err.code === 'cluster_unavailable');
          if (!retry || Date.now() + 1000 > deadline || this.state !== 'connecting') throw err;
          await new Promise((r) => setTimeout(r, 1000));
        }
      }
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
    return this.#media.enabled('audio');
  }

  get cameraEnabled() {
    return this.#media.enabled('video');
  }

  /**
   * Offers a file to one participant (`to`, a peerId) or to everyone: browser to browser in a
   * mesh, through the server on the SFU. Each recipient accepts before anything is sent
   * (`fileOffered` on its side). Throws `too_large` past 100 MiB, `not_supported` while the
   * room is between modes and someone cannot be reached.
   * @param {Blob & {name?: string}} file  a `File` from an input, or any Blob
   * @param {{to?: string}} [options]
   * @returns {import('./files.js').Transfer[]} one per recipient; watch `fileProgress`, `fileSent`
   */
  sendFile(file, { to } = {}) {
    if (this.state !== 'joined') throw new SwitchboardError('closed', 'not in a room');
    return this.#files.send(file, to);
  }

  /** Every file sent or received in this room, by id. */
  get fileTransfers() {
    return this.#files.transfers;
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
    if (!this.canPublish) throw new SwitchboardError('not_allowed', 'your token does not allow publishing');
    const shared = await this.#media.startScreen(track);
    const stream = this.#media.screenStream;
    if (!shared || !stream) return;
    shared.addEventListener('ended', () => this.stopScreenShare());
    for (const pc of this.#mesh.connections()) pc.addTrack(shared, stream);
    this.#sfu.publishPc?.addTransceiver(shared, { direction: 'sendonly', streams: [stream] });
  }

  /** Stops the screen share. */
  stopScreenShare() {
    const track = this.#media.takeScreen();
    if (!track) return;
    for (const pc of [...this.#mesh.connections(), this.#sfu.publishPc]) {
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
    return this.#media.switchDevice(kind, deviceId, {
      closed: () => this.state === 'closed',
      replace: async (old, track) => {
        for (const pc of [this.#sfu.publishPc, ...this.#mesh.connections()]) {
          for (const sender of pc?.getSenders() ?? []) {
            // A connection closing meanwhile (a mode switch) no longer needs the track.
            if (sender.track === old) await sender.replaceTrack(track).catch(() => {});
          }
        }
      },
      add: (track, stream) => {
        for (const pc of this.#mesh.connections()) pc.addTrack(track, stream);
        // A camera in simulcast layers (a replaced one keeps its sender's layers).
        this.#sfu.publishTrack(track, stream);
      },
      changed: (stream) => this.emit('localStream', stream),
    });
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
    this.#sfu.applyPauses(this.#videoPaused);
  }

  /**
   * Watches how large `element` shows `peerId`'s `source` video, so that through the server the
   * video comes in the smallest simulcast layer that covers it (in device pixels): a tile gets a
   * small layer, the stage a large one. Growth is told at once, a shrink after half a second.
   * Calling it again for the same element with another participant or source moves the watch;
   * several elements showing one video count at the largest. Mesh connections send one layer
   * and ignore it; it holds across mode switches and reconnects.
   * @param {Element} element  usually the <video> the track plays in
   * @param {string} peerId
   * @param {Source} [source='camera']
   * @returns {() => void}  stops watching, as `unobserveVideo(element)`
   */
  observeVideo(element, peerId, source = 'camera') {
    this.#views.observe(element, peerId, source);
    return () => this.unobserveVideo(element);
  }

  /**
   * Stops watching `element` (removed, or showing no remote video any more).
   * @param {Element} element
   */
  unobserveVideo(element) {
    this.#views.unobserve(element);
  }

  /**
   * For apps that render video elsewhere (a canvas, WebGL): the size, in device pixels, that
   * `peerId`'s `source` video is shown at, counted with any element watched by `observeVideo`
   * (the largest wins). A width or height of 0 forgets it.
   * @param {string} peerId
   * @param {Source} source
   * @param {number} width
   * @param {number} height
   */
  setVideoSize(peerId, source, width, height) {
    this.#views.setSize(peerId, source, width, height);
  }

  /**
   * @param {'audio' | 'video'} kind
   * @param {boolean} enabled
   */
  #setEnabled(kind, enabled) {
    for (const trackId of this.#media.setEnabled(kind, enabled)) {
      this.#send({ type: 'mute', trackId, muted: !enabled });
    }
  }

  // --- the session: socket, join, reconnect, close ---------------------------------------------

  /** @param {object} msg */
  #send(msg) {
    this.#socket.send(msg);
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
   * Opens a socket at `base` and joins; in a cluster, follows `redirect` to the node that hosts
   * the room (3 hops at most).
   * @param {URL} base
   * @param {string} token
   * @param {string} name
   * @param {number} deadline  ms since the epoch
   */
  async #enter(base, token, name, deadline) {
    let node = base;
    for (let hops = 0; ; hops++) {
      await this.#socket.open(node, token);
      if (this.state !== 'connecting' && this.state !== 'reconnecting') return;
      const reply = await this.#join(name, Math.max(1000, deadline - Date.now()));
      if (reply?.type !== 'redirect') return;
      if (hops >= MAX_REDIRECTS) throw new SwitchboardError('redirect', `more than ${MAX_REDIRECTS} redirects, the last to ${reply.url}`);
      node = new URL(String(reply.url), base);
    }
  }

  /** @param {CloseEvent} ev  the signaling socket closed */
  #socketClosed(ev) {
    if (this.state === 'joined') this.#reconnect(ev.reason || `signaling socket closed (${ev.code})`);
    else if (this.state === 'connecting') this.#close(ev.reason || 'socket closed', true, ev.code);
    // While reconnecting, the attempt fails (here, or its join) and the next one follows.
    else if (this.state === 'reconnecting') {
      this.#joinWaiter?.reject(new SwitchboardError('socket', `signaling socket closed (${ev.code})`));
      this.#joinWaiter = null;
    }
  }

  /**
   * Gets back into the room after the server was lost (network drop, server restart): drops
   * the connections and remote participants, keeps local media, and rejoins with a fresh token
   * and the resume secret, retrying for up to 30 s.
   * @param {string} reason
   * @param {URL} [movedTo]  the node to try first (a cluster's `moved`); then the entry URL
   */
  async #reconnect(reason, movedTo) {
    const session = this.#session;
    if (this.state !== 'joined' || !session) return;
    this.state = 'reconnecting';
    this.emit('reconnecting', { reason });
    this.#dropRoomState();
    const stopped = () => this.state !== 'reconnecting';
    let first = movedTo;
    const result = await retryFor(
      RECONNECT_WINDOW_MS,
      async (deadline) => {
        const token = session.token ?? (await fetchToken(session.base, session.name, session.room));
        // Left meanwhile: no socket, no join (it would seat a phantom).
        if (stopped()) return;
        const node = first ?? session.base;
        first = undefined;
        await this.#enter(node, token, session.name, Math.min(Date.now() + session.joinTimeoutMs, deadline));
      },
      stopped,
      () => this.#socket.drop(),
    );
    if (result.ok) {
      // Joined again, unless it left meanwhile (TypeScript cannot see the join change state).
      if (/** @type {string} */ (this.state) === 'joined') this.emit('reconnected', {});
      return;
    }
    if (!result.stopped) this.#close(`could not reconnect: ${result.error || reason}`, true);
  }

  /** Forgets everything about the room but the local media, for a reconnect. */
  #dropRoomState() {
    this.#socket.drop();
    this.#switcher.reset();
    this.#sfu.close();
    this.#mesh.closeAll();
    for (const peerId of [...this.participants.keys()]) this.#removeParticipant(peerId);
    this.#remoteMuted.clear();
    this.speakers = [];
    this.videoAllocation.clear();
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
    this.#switcher.reset();
    this.#stats.stop();
    this.#views.stop();
    if (this.#silenceTimer) clearTimeout(this.#silenceTimer);
    this.#socket.drop(1000);
    this.#sfu.close();
    this.#mesh.closeAll();
    this.#media.stop();
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
      case 'redirect':
        // (cluster) the room lives on another node: `#enter` goes there.
        if (!this.#joinWaiter) return;
        this.#socket.drop(1000);
        this.#joinWaiter.resolve(msg);
        this.#joinWaiter = null;
        return;
      case 'moved':
        return this.#onMoved(msg);
      case 'peer_joined':
        return void this.#addParticipant(msg.peerId, msg.name);
      case 'peer_left':
        return this.#removeParticipant(msg.peerId);
      case 'mode':
        return this.#switcher.onMode(msg);
      case 'answer':
        if (!fromSfu) return this.#mesh.onDescription(msg);
        if (msg.transport === 'publish') await this.#sfu.onPublishAnswer(msg.sdp);
        return;
      case 'offer':
        if (!fromSfu) return this.#mesh.onDescription(msg);
        // One the server queued just before settling in mesh: its connection is gone.
        if (this.mode === 'mesh' && !this.switching) return;
        if (msg.transport === 'subscribe') await this.#sfu.onSubscribeOffer(msg, this.#videoPaused);
        return;
      case 'ice-candidate':
        if (!fromSfu && msg.peerId) return this.#mesh.onCandidate(msg);
        return this.#sfu.onCandidate(msg);
      case 'mute':
        return this.#onRemoteMute(msg);
      case 'chat':
        return this.#onChat(msg);
      case 'speakers':
        return this.#onSpeakers(msg);
      case 'layers':
        return this.#sfu.onLayers(msg);
      case 'allocation':
        return this.#onAllocation(msg);
      case 'bandwidth':
        this.downlinkEstimate = Number(msg.estimate) || 0;
        return this.emit('bandwidth', { estimate: this.downlinkEstimate });
      default:
        // Unknown message types are ignored, as unknown fields are (forward compatibility).
        return;
    }
  }

  /**
   * (cluster) The node is draining, or another node took the room: leave here and rejoin there,
   * as after a lost connection (participants are announced again).
   * @param {any} msg
   */
  #onMoved(msg) {
    if (this.state !== 'joined') return;
    let url;
    try {
      url = new URL(String(msg.url), this.#session?.base);
    } catch {
      return;
    }
    this.#send({ type: 'leave' });
    void this.#reconnect('the room moved to another server', url);
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
    this.maxVideoBitrate = Number(msg.maxVideoBitrate) > 0 ? Number(msg.maxVideoBitrate) : null;
    this.#switcher.mode = msg.mode === 'mesh' ? 'mesh' : 'sfu';
    this.grants = grantsOf(msg.grants);
    if (!this.canPublish && this.#media.stream) {
      this.#media.release();
      this.emit('localStream', null);
    }
    // The server knows nothing of mutes made before this join (or before a reconnect).
    for (const trackId of this.#media.mutedIds()) this.#send({ type: 'mute', trackId, muted: true });
    if (this.mode === 'sfu') this.#sfu.start();
    this.#stats.start();
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
    // The server ends this session for good (an admin, or a newer connection of this client):
    // reconnecting would undo the admin's action, or push out the newer connection.
    if (FINAL_CODES.includes(event.code)) {
      this.emit('error', event);
      this.#close(event.code, true);
      return;
    }
    // The server refused a publish offer: roll it back so later changes can be offered.
    if (event.code === 'invalid_sdp' && event.requestType === 'offer') this.#sfu.rollbackPublishOffer();
    // A video size dropped over the server's rate: the SDK tells them all again shortly.
    if (event.code === 'rate_limited' && event.requestType === 'view') {
      console.debug(`switchboard: ${event.message}`);
      this.#views.refused();
      return;
    }
    // The SDK addresses only participants it knows: an unknown one has just left, and a message
    // (a trickled candidate, say) crossed its `peer_left`. Likewise a negotiation message that
    // crossed a change of mode. Nothing for the app to act on.
    const negotiation = ['offer', 'answer', 'ice-candidate', 'pause', 'view'].includes(event.requestType);
    const crossedModeChange = event.code === 'invalid_state' && Date.now() - this.#switcher.changedAt < 3000;
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
    if (this.mode === 'mesh' && this.#mesh.offersTo(peerId)) this.#mesh.link(peerId);
    // An offer may already carry this participant's media.
    this.#switcher.reconcile();
    return participant;
  }

  /** @param {string} peerId */
  #removeParticipant(peerId) {
    const participant = this.participants.get(peerId);
    if (!participant) return;
    this.#mesh.close(peerId);
    // Drop its media at once rather than waiting for the next subscribe offer.
    this.#switcher.forget(peerId);
    this.participants.delete(peerId);
    this.emit('participantLeft', participant);
    this.#switcher.checkReady();
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

  /** @param {any} msg  the server's `speakers`, loudest first */
  #onSpeakers(msg) {
    this.speakers = (Array.isArray(msg.speakers) ? msg.speakers : [])
      .filter((/** @type {any} */ s) => this.participants.has(s?.peerId))
      .map((/** @type {any} */ s) => ({ peerId: String(s.peerId), level: Number(s.level) || 0 }));
    this.emit('speakers', this.speakers);
    if (this.mode !== 'sfu') return;
    const loudest = this.speakers[0]?.peerId ?? null;
    if (loudest) {
      if (this.#silenceTimer) clearTimeout(this.#silenceTimer);
      this.#silenceTimer = null;
      if (loudest === this.#speaker) return;
      this.#speaker = loudest;
      this.emit('activeSpeaker', { peerId: loudest });
    } else if (this.#speaker !== null && !this.#silenceTimer) {
      this.#silenceTimer = setTimeout(() => {
        this.#silenceTimer = null;
        this.#speaker = null;
        this.emit('activeSpeaker', { peerId: null });
      }, SPEAKER_HOLD_MS);
    }
  }

  /**
   * The server lowered, paused or restored a video for this client's bandwidth.
   * @param {any} msg
   */
  #onAllocation(msg) {
    const publicationId = String(msg.publicationId ?? '');
    const state = msg.state === 'lowered' || msg.state === 'paused' ? msg.state : 'full';
    this.downlinkEstimate = Number(msg.estimate) || 0;
    if (state === 'full') this.videoAllocation.delete(publicationId);
    else this.videoAllocation.set(publicationId, state);
    const track = [...this.participants.values()]
      .flatMap((p) => [...p.tracks.values()])
      .find((t) => t.publicationId === publicationId);
    this.emit('videoAllocation', {
      peerId: track?.peerId ?? null,
      publicationId,
      source: track?.source ?? null,
      state,
      estimate: this.downlinkEstimate,
    });
  }

  /** @param {any} msg */
  #onRemoteMute(msg) {
    const muted = !!msg.muted;
    if (msg.peerId === this.participantId) {
      // An admin muted one of our tracks: turn it off as the user would (they may turn it on).
      const kind = this.#media.kindOf(String(msg.trackId));
      if (muted && kind && this.#media.enabled(kind)) {
        this.#setEnabled(kind, false);
        this.emit('mutedByAdmin', { trackId: String(msg.trackId), kind });
      }
      return;
    }
    if (msg.trackId) this.#remoteMuted.set(`${msg.peerId}|${msg.trackId}`, muted);
    for (const sub of this.#sfu.subscriptions.values()) {
      if (sub.publicationId === msg.publicationId) sub.muted = muted;
    }
    for (const remote of this.#switcher.shown()) {
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
}
