// Switchboard SDK: the mode switch, seen from one participant. Which remote track is shown for
// each participant's source (the current mode's once it decodes, the other path's until then);
// `ready` once everything shown comes through the new path; the old path's camera lightened
// while it only bridges the switch; the old connections closed on `settled`.

/** @typedef {import('./client.js').Mode} Mode */
/** @typedef {import('./sfu.js').SfuPath} SfuPath */
/** @typedef {import('./mesh.js').MeshPaths} MeshPaths */
/** @typedef {import('./client.js').RemoteTrack} RemoteTrack */
/** @typedef {import('./client.js').Participant} Participant */
/** @typedef {import('./devices.js').LocalMedia} LocalMedia */

import { changeEncodings } from './sfu.js';

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
/**
 * While a switch brings up the new path, the old path's camera is sent at half the width and
 * height and at most this frame rate: every page then encodes and decodes both paths at once,
 * and on a busy machine the full-size old path starves the new one (and itself) into a freeze.
 * (Through the server, every simulcast layer is at most half size: the smaller ones stay as they are.)
 */
const SWITCH_OLD_PATH_SCALE = 2;
const SWITCH_OLD_PATH_FPS = 15;

/**
 * What the switcher needs of the room.
 * @typedef {object} SwitchContext
 * @property {(msg: object) => void} send
 * @property {() => boolean} joined
 * @property {() => boolean} closed
 * @property {Map<string, Participant>} participants
 * @property {Set<string>} videoPaused  participants whose video the app does not show
 * @property {LocalMedia} media
 * @property {SfuPath} sfu
 * @property {MeshPaths} mesh
 * @property {(type: string, arg: any) => void} emit
 */

export class ModeSwitcher {
  /** The room's mode (during a switch, the mode it is switching to). @type {Mode} */
  mode = 'sfu';
  /** True between `mode`/`switching` and `mode`/`settled`. */
  switching = false;
  /** When the mode last changed: errors for messages that crossed it are expected. */
  changedAt = 0;
  /** Remote tracks announced to listeners, by `peerId|kind|source`. @type {Map<string, RemoteTrack>} */
  #active = new Map();
  /** Remote tracks that decode media steadily (video frames, audio packets). @type {WeakSet<MediaStreamTrack>} */
  #live = new WeakSet();
  /** The last decoded-frame (video) or packet (audio) count seen per track. @type {WeakMap<MediaStreamTrack, number>} */
  #progress = new WeakMap();
  /** When each track first showed decoded media. @type {WeakMap<MediaStreamTrack, number>} */
  #firstMediaAt = new WeakMap();
  /** @type {ReturnType<typeof setTimeout> | null} */
  #livePoll = null;
  #readySent = false;
  /** The number of the switch under way, echoed in `ready`. @type {number | undefined} */
  #switchNumber = undefined;
  /** Camera senders lightened for a switch, with the settings to restore, per encoding. @type {Map<RTCRtpSender, {scaleResolutionDownBy?: number, maxFramerate?: number}[]>} */
  #lightened = new Map();
  /** @type {SwitchContext} */ #ctx;

  /** @param {SwitchContext} ctx */
  constructor(ctx) {
    this.#ctx = ctx;
  }

  /** The remote tracks shown now. */
  shown() {
    return this.#active.values();
  }

  /** Forgets the switch in progress, for a reconnect or a close. */
  reset() {
    if (this.#livePoll) clearTimeout(this.#livePoll);
    this.#livePoll = null;
    this.switching = false;
    this.#readySent = false;
    this.#lightened.clear();
  }

  /** @param {any} msg  a `mode` message */
  onMode(msg) {
    const { sfu, mesh } = this.#ctx;
    /** @type {Mode} */
    const mode = msg.mode === 'mesh' ? 'mesh' : 'sfu';
    if (msg.phase === 'switching') {
      this.mode = mode;
      this.switching = true;
      this.#readySent = false;
      this.#switchNumber = typeof msg.switch === 'number' ? msg.switch : undefined;
      // Make: bring up the new path beside the old one.
      this.changedAt = Date.now();
      // The path being left only has to bridge the switch: lighten it. A switch overtaken by
      // one back gets its path restored.
      const meshPcs = mesh.connections();
      this.#lightenCamera(mode === 'sfu' ? meshPcs : [sfu.publishPc]);
      this.#restoreCamera(mode === 'sfu' ? [sfu.publishPc] : meshPcs);
      if (mode === 'sfu') sfu.start();
      else mesh.connectAll(this.#ctx.participants.keys());
      this.#ctx.emit('modeChanged', { mode, phase: 'switching' });
      this.reconcile();
      return;
    }
    if (msg.phase === 'settled' && mode === this.mode) {
      this.switching = false;
      this.changedAt = Date.now();
      // Break: the old path's connections go.
      if (mode === 'sfu') mesh.closeAll();
      else sfu.close();
      this.#lightened.clear();
      this.#ctx.emit('modeChanged', { mode, phase: 'settled' });
      this.reconcile();
    }
  }

  /**
   * Sends the camera on `pcs` at a fraction of its size and frame rate (see SWITCH_OLD_PATH_SCALE).
   * @param {(RTCPeerConnection | null)[]} pcs
   */
  #lightenCamera(pcs) {
    for (const sender of this.#cameraSenders(pcs)) {
      if (this.#lightened.has(sender)) continue;
      /** @type {{scaleResolutionDownBy?: number, maxFramerate?: number}[]} */
      const saved = [];
      this.#lightened.set(sender, saved);
      this.#updateEncodings(sender, (encodings) => {
        for (const encoding of encodings) {
          saved.push({ scaleResolutionDownBy: encoding.scaleResolutionDownBy, maxFramerate: encoding.maxFramerate });
          encoding.scaleResolutionDownBy = Math.max(encoding.scaleResolutionDownBy ?? 1, SWITCH_OLD_PATH_SCALE);
          encoding.maxFramerate = Math.min(encoding.maxFramerate ?? Infinity, SWITCH_OLD_PATH_FPS);
        }
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
      this.#updateEncodings(sender, (encodings) => {
        encodings.forEach((encoding, i) => {
          const before = saved[i];
          if (!before) return;
          encoding.scaleResolutionDownBy = before.scaleResolutionDownBy ?? 1;
          if (before.maxFramerate === undefined) delete encoding.maxFramerate;
          else encoding.maxFramerate = before.maxFramerate;
        });
      });
    }
  }

  /**
   * Changes a sender's encodings (every simulcast layer), in turn with other changes to them: a
   * restore must not overtake the lightening it undoes.
   * @param {RTCRtpSender} sender
   * @param {(encodings: RTCRtpEncodingParameters[]) => void} change
   */
  #updateEncodings(sender, change) {
    changeEncodings(sender, (encodings) => {
      change(encodings);
      return true;
    })
      // A connection closing meanwhile (the switch settling) needs no change.
      .catch((err) => console.debug('switchboard: sender encoding', err));
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
        if (sender.track?.kind === 'video' && sender.track !== this.#ctx.media.screenTrack) out.push(sender);
      }
    }
    return out;
  }

  /** Tells the server, once per switch, when everything shown comes through the new path. */
  checkReady() {
    if (!this.switching || this.#readySent || !this.#ctx.joined()) return;
    for (const remote of this.#active.values()) if (remote.path !== this.mode) return;
    this.#readySent = true;
    this.#ctx.send({ type: 'ready', mode: this.mode, switch: this.#switchNumber });
  }

  /**
   * Brings the announced remote tracks in line with both paths' connections. For each
   * participant's source, the current mode's track is shown once it decodes (or when there is
   * nothing else to show); until then the other path's track keeps playing.
   */
  reconcile() {
    const { participants, videoPaused, emit } = this.#ctx;
    if (this.#ctx.closed()) return;
    /** @type {Map<string, {preferred?: RemoteTrack, other?: RemoteTrack}>} */
    const groups = new Map();
    for (const candidate of [...this.#ctx.sfu.tracks(), ...this.#ctx.mesh.tracks()]) {
      if (!participants.has(candidate.peerId)) continue;
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
        preferred?.kind === 'video' && preferred.source === 'camera' && preferred.path === 'sfu' && videoPaused.has(preferred.peerId);
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
          emit('trackMuted', {
            peerId: current.peerId,
            publicationId: current.publicationId,
            source: current.source,
            muted: current.muted,
          });
        }
        continue;
      }
      this.#active.set(key, remote);
      participants.get(remote.peerId)?.tracks.set(remote.publicationId, remote);
      emit('trackSubscribed', remote);
    }
    this.checkReady();
    if ((waiting || (this.switching && !this.#readySent)) && !this.#livePoll) {
      this.#livePoll = setTimeout(() => this.#pollLive(), LIVE_POLL_MS);
    }
  }

  /** Marks new-path tracks that decode media as live, then reconciles. */
  async #pollLive() {
    this.#livePoll = null;
    if (this.#ctx.closed()) return;
    const candidates = this.mode === 'sfu' ? this.#ctx.sfu.tracks() : this.#ctx.mesh.tracks();
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
    this.reconcile();
  }

  /** Retires every track shown for `peerId` at once (it left). @param {string} peerId */
  forget(peerId) {
    for (const [key, remote] of [...this.#active]) {
      if (remote.peerId === peerId) this.#unannounce(key);
    }
  }

  /** @param {string} key */
  #unannounce(key) {
    const remote = this.#active.get(key);
    if (!remote) return;
    this.#active.delete(key);
    this.#ctx.participants.get(remote.peerId)?.tracks.delete(remote.publicationId);
    this.#ctx.emit('trackUnsubscribed', remote);
  }
}
