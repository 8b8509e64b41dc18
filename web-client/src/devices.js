// Switchboard SDK: local media. Capturing camera and microphone, what each local track is
// (source, the name it was announced by), mute, the screen share, and switching devices.

import { SwitchboardError } from './errors.js';

/** @typedef {import('./client.js').Source} Source */
/** @typedef {import('./client.js').TrackInfo} TrackInfo */

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

/** What this participant sends: camera and microphone, and a screen share. */
export class LocalMedia {
  /** @type {MediaStream | null} */ stream = null;
  /** @type {MediaStreamTrack | null} */ screenTrack = null;
  /** @type {MediaStream | null} */ screenStream = null;
  /** Sources of local tracks by the id they were announced by. @type {Map<string, Source>} */
  #sources = new Map();
  /** A replacement track (another camera) keeps the id its first track was announced by. @type {WeakMap<MediaStreamTrack, string>} */
  #announcedIds = new WeakMap();
  /** The device switch in progress, if any. @type {Promise<void>} */
  #deviceSwitch = Promise.resolve();
  #screenPending = false;

  /** @param {MediaStream} stream  camera and microphone, as captured */
  adopt(stream) {
    this.stream = stream;
    for (const track of stream.getTracks()) {
      this.#sources.set(track.id, track.kind === 'audio' ? 'microphone' : 'camera');
    }
  }

  /**
   * The name `track` is announced by (in `tracks` and `mute`).
   * @param {MediaStreamTrack} track
   */
  announcedId(track) {
    return this.#announcedIds.get(track) ?? track.id;
  }

  /**
   * What `pc` sends, for the `tracks` of a description.
   * @param {RTCPeerConnection} pc
   * @returns {TrackInfo[]}
   */
  trackInfo(pc) {
    /** @type {TrackInfo[]} */
    const out = [];
    for (const transceiver of pc.getTransceivers()) {
      const track = transceiver.sender.track;
      if (!track) continue;
      const source = this.#sources.get(this.announcedId(track)) ?? (track.kind === 'audio' ? 'microphone' : 'camera');
      out.push({ trackId: this.announcedId(track), source, mid: transceiver.mid, muted: !track.enabled });
    }
    return out;
  }

  /**
   * Enables or disables every local track of `kind`.
   * @param {'audio' | 'video'} kind
   * @param {boolean} enabled
   * @returns {string[]}  the announced ids of the tracks that changed
   */
  setEnabled(kind, enabled) {
    const changed = [];
    for (const track of this.stream?.getTracks() ?? []) {
      if (track.kind !== kind || track.enabled === enabled) continue;
      track.enabled = enabled;
      changed.push(this.announcedId(track));
    }
    return changed;
  }

  /** @param {'audio' | 'video'} kind */
  enabled(kind) {
    return this.stream?.getTracks().some((t) => t.kind === kind && t.enabled) ?? false;
  }

  /**
   * The kind of the local camera or microphone track announced as `trackId`, if there is one.
   * @param {string} trackId
   * @returns {'audio' | 'video' | null}
   */
  kindOf(trackId) {
    const track = this.stream?.getTracks().find((t) => this.announcedId(t) === trackId);
    return track ? /** @type {'audio' | 'video'} */ (track.kind) : null;
  }

  /** The announced ids of local tracks that are disabled now. */
  mutedIds() {
    return (this.stream?.getTracks() ?? []).filter((t) => !t.enabled).map((t) => this.announcedId(t));
  }

  /**
   * Takes `track` (or a screen the browser offers) as the screen share; null when a share is
   * already on or being picked.
   * @param {MediaStreamTrack} [track]
   * @returns {Promise<MediaStreamTrack | null>}
   */
  async startScreen(track) {
    if (this.screenTrack || this.#screenPending) return null;
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
    this.screenStream = new MediaStream([track]);
    this.#sources.set(track.id, 'screen');
    return track;
  }

  /** Forgets the screen share and returns its track (not stopped yet), if there was one. */
  takeScreen() {
    const track = this.screenTrack;
    this.screenTrack = null;
    this.screenStream = null;
    return track;
  }

  /**
   * Captures another microphone or camera and puts it in place of the current one, one switch
   * at a time (two at once would both replace the same old track).
   * @param {'audioinput' | 'videoinput'} kind
   * @param {string} deviceId
   * @param {{closed: () => boolean, replace: (old: MediaStreamTrack, track: MediaStreamTrack) => Promise<void>, add: (track: MediaStreamTrack, stream: MediaStream) => void, changed: (stream: MediaStream) => void}} on
   *   `replace` puts the new track on every connection sending the old one; `add` sends a kind
   *   not sent before; `changed` tells the app
   */
  switchDevice(kind, deviceId, on) {
    const next = this.#deviceSwitch.then(() => this.#switchDevice(kind, deviceId, on));
    this.#deviceSwitch = next.catch(() => {});
    return next;
  }

  /**
   * @param {'audioinput' | 'videoinput'} kind
   * @param {string} deviceId
   * @param {Parameters<LocalMedia['switchDevice']>[2]} on
   */
  async #switchDevice(kind, deviceId, on) {
    const audio = kind === 'audioinput';
    const captured = await captureMedia(audio ? deviceId : false, audio ? false : deviceId);
    const track = captured.getTracks()[0];
    if (on.closed()) {
      track.stop(); // Left during the permission prompt: the camera must not stay lit.
      return;
    }
    const stream = this.stream ?? new MediaStream();
    this.stream = stream;
    const old = stream.getTracks().find((t) => t.kind === track.kind);
    if (old) {
      track.enabled = old.enabled;
      this.#announcedIds.set(track, this.announcedId(old));
      await on.replace(old, track);
      stream.removeTrack(old);
      old.stop();
    } else {
      this.#sources.set(track.id, audio ? 'microphone' : 'camera');
    }
    stream.addTrack(track);
    // A kind not sent before: connections take it as a new track.
    if (!old) on.add(track, stream);
    on.changed(stream);
  }

  /** Stops every local track, the screen share included. */
  stop() {
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.screenTrack?.stop();
  }

  /** Stops every local track and forgets them: nothing will be sent. */
  release() {
    this.stop();
    this.stream = null;
    this.screenTrack = null;
    this.screenStream = null;
  }
}
