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

/**
 * @typedef {'microphone' | 'camera' | 'screen'} Source
 * @typedef {'publish' | 'subscribe'} Transport
 *
 * @typedef {object} Subscription  One media section of the server's subscribe offer.
 * @property {string} mid
 * @property {string} publicationId
 * @property {string} peerId
 * @property {'audio' | 'video'} kind
 * @property {Source} source
 * @property {boolean} muted
 *
 * @typedef {object} RemoteTrack  What `trackSubscribed` / `trackUnsubscribed` carry.
 * @property {string} peerId
 * @property {string} publicationId
 * @property {string} mid
 * @property {MediaStreamTrack} track
 * @property {'audio' | 'video'} kind
 * @property {Source} source
 * @property {boolean} muted
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
 * @property {boolean} [audio=true]
 * @property {boolean} [video=true]
 * @property {number} [joinTimeoutMs=15000]
 *
 * Events (listener argument):
 *  - participantJoined   (Participant)
 *  - participantUpdated  (Participant)   a known participant's name changed
 *  - participantLeft     (Participant)
 *  - trackSubscribed     (RemoteTrack)
 *  - trackUnsubscribed   (RemoteTrack)
 *  - trackMuted          ({peerId, publicationId, source, muted})
 *  - localStream         (MediaStream)   local media captured, before publishing
 *  - error               (ErrorEvent)
 *  - disconnected        ({reason: string, code?: number})
 */

export const PROTOCOL_VERSION = 1;

/** How long the first subscribe answer waits for local candidates before trickling the rest. */
const SUBSCRIBE_GATHER_WAIT_MS = 500;

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
  /** @type {RTCPeerConnection | null} */ publishPc = null;
  /** @type {RTCPeerConnection | null} */ subscribePc = null;
  /** @type {MediaStream | null} */ localStream = null;
  /** @type {Map<string, Participant>} remote participants by peerId */
  participants = new Map();
  /** @type {Map<string, Subscription>} the latest subscribe offer's sections, by mid */
  subscriptions = new Map();
  /** @type {'new' | 'connecting' | 'joined' | 'closed'} */
  state = 'new';

  /** @type {WebSocket | null} */ #ws = null;
  /** Incoming messages are handled one at a time, in arrival order. */
  #queue = Promise.resolve();
  /** @type {{resolve: (msg: any) => void, reject: (err: Error) => void} | null} */
  #joinWaiter = null;
  /** Remote tracks announced to listeners, by mid. @type {Map<string, RemoteTrack>} */
  #active = new Map();
  /** Stream ids seen in `track` events, by mid: a fallback when an offer omits a section. */
  #streamIdByMid = new Map();
  /** Local candidates are held until the description they belong to has been sent. */
  #candidateGate = {
    publish: { open: false, held: /** @type {any[]} */ ([]) },
    subscribe: { open: false, held: /** @type {any[]} */ ([]) },
  };

  /**
   * @param {string} serverUrl
   * @param {ConnectOptions} options
   */
  async connect(serverUrl, { room, name, audio = true, video = true, joinTimeoutMs = 15000 }) {
    if (this.state !== 'new') throw new Error('Room.connect may be called once');
    this.state = 'connecting';
    const base = new URL(serverUrl);
    try {
      const token = await fetchToken(base, name, room);
      await this.#openSocket(base, token);
      await this.#join(name, joinTimeoutMs);
      if (audio || video) {
        const stream = await captureMedia(audio, video);
        if (this.state !== 'joined') {
          for (const track of stream.getTracks()) track.stop();
          throw new SwitchboardError('closed', 'left while capturing media');
        }
        this.localStream = stream;
        this.emit('localStream', this.localStream);
        this.#publish().catch((err) => this.#fail('publish', err));
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
    return this.localStream?.getAudioTracks().some((t) => t.enabled) ?? false;
  }

  get cameraEnabled() {
    return this.localStream?.getVideoTracks().some((t) => t.enabled) ?? false;
  }

  /**
   * @param {'audio' | 'video'} kind
   * @param {boolean} enabled
   */
  #setEnabled(kind, enabled) {
    for (const track of this.localStream?.getTracks() ?? []) {
      if (track.kind !== kind || track.enabled === enabled) continue;
      track.enabled = enabled;
      this.#send({ type: 'mute', trackId: track.id, muted: !enabled });
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
      ws.onopen = () => resolve(undefined);
      ws.onerror = () => reject(new SwitchboardError('socket', `cannot open ${url.origin}/ws/signal`));
      ws.onclose = (ev) => {
        reject(new SwitchboardError('socket', `signaling socket closed (${ev.code})`));
        this.#close(ev.reason || 'socket closed', true, ev.code);
      };
      ws.onmessage = (ev) => {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch {
          this.emit('error', { code: 'bad_message', message: 'server sent invalid JSON' });
          return;
        }
        this.#queue = this.#queue
          .then(() => this.#handle(msg))
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
      this.#send({ type: 'join', name });
    });
  }

  /**
   * @param {string} reason
   * @param {boolean} notify  emit `disconnected` (only once the room was joined)
   * @param {number} [code]
   */
  #close(reason, notify, code) {
    if (this.state === 'closed') return;
    const wasJoined = this.state === 'joined';
    this.state = 'closed';
    this.#joinWaiter?.reject(new SwitchboardError('closed', reason));
    this.#joinWaiter = null;
    const ws = this.#ws;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onerror = null;
      if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(1000);
    }
    this.publishPc?.close();
    this.subscribePc?.close();
    for (const track of this.localStream?.getTracks() ?? []) track.stop();
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
    switch (msg?.type) {
      case 'joined':
        return this.#onJoined(msg);
      case 'error':
        return this.#onError(msg);
      case 'peer_joined':
        return this.#addParticipant(msg.peerId, msg.name);
      case 'peer_left':
        return this.#removeParticipant(msg.peerId);
      case 'answer':
        if (msg.transport === 'publish' && this.publishPc) {
          await this.publishPc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
        }
        return;
      case 'offer':
        if (msg.transport === 'subscribe') await this.#onSubscribeOffer(msg);
        return;
      case 'ice-candidate': {
        const pc = msg.transport === 'publish' ? this.publishPc : this.subscribePc;
        if (pc && msg.candidate?.candidate) await pc.addIceCandidate(msg.candidate);
        return;
      }
      case 'mute':
        return this.#onRemoteMute(msg);
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
    for (const peer of msg.peers ?? []) this.#addParticipant(peer.peerId, peer.name);
    this.#joinWaiter.resolve(msg);
    this.#joinWaiter = null;
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
    // An offer may already carry this participant's media.
    if (this.subscribePc) this.#reconcileTracks(this.subscribePc);
    return participant;
  }

  /** @param {string} peerId */
  #removeParticipant(peerId) {
    const participant = this.participants.get(peerId);
    if (!participant) return;
    // Drop its media at once rather than waiting for the next subscribe offer.
    for (const [mid, remote] of [...this.#active]) {
      if (remote.peerId === peerId) this.#unsubscribe(mid);
    }
    this.participants.delete(peerId);
    this.emit('participantLeft', participant);
  }

  /** @param {any} msg */
  #onRemoteMute(msg) {
    const participant = this.participants.get(msg.peerId);
    const remote = participant?.tracks.get(msg.publicationId);
    if (remote) remote.muted = !!msg.muted;
    for (const sub of this.subscriptions.values()) {
      if (sub.publicationId === msg.publicationId) sub.muted = !!msg.muted;
    }
    this.emit('trackMuted', {
      peerId: msg.peerId,
      publicationId: msg.publicationId,
      source: msg.source,
      muted: !!msg.muted,
    });
  }

  // --- publish connection ---------------------------------------------------------------------

  async #publish() {
    const stream = /** @type {MediaStream} */ (this.localStream);
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.publishPc = pc;
    this.#watchPc(pc, 'publish');
    for (const track of stream.getTracks()) {
      pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
    }
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    if (this.state !== 'joined') return;
    this.#sendDescription(pc, 'publish', {
      type: 'offer',
      tracks: stream.getTracks().map((t) => ({
        trackId: t.id,
        source: t.kind === 'audio' ? 'microphone' : 'camera',
      })),
    });
  }

  // --- subscribe connection -------------------------------------------------------------------

  #ensureSubscribePc() {
    if (this.subscribePc) return this.subscribePc;
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.subscribePc = pc;
    this.#watchPc(pc, 'subscribe');
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
    await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    // The server is the controlling ICE agent here. A client candidate it first learns from
    // a connectivity check (peer-reflexive) is nominated only after a wait of about a second,
    // so the first answer carries the host candidates instead of trickling them.
    await iceGatheringComplete(pc, SUBSCRIBE_GATHER_WAIT_MS);
    if (this.state !== 'joined') return;
    this.#sendDescription(pc, 'subscribe', { type: 'answer' });
    this.#reconcileTracks(pc);
  }

  /**
   * Brings the announced remote tracks in line with the negotiated subscribe connection.
   * Sections are identified by mid; a reused section (new publicationId on an old mid)
   * is an unsubscribe followed by a subscribe.
   * @param {RTCPeerConnection} pc
   */
  #reconcileTracks(pc) {
    /** @type {Map<string, RemoteTrack>} */
    const wanted = new Map();
    for (const transceiver of pc.getTransceivers()) {
      const mid = transceiver.mid;
      const direction = transceiver.currentDirection;
      if (mid == null || (direction !== 'recvonly' && direction !== 'sendrecv')) continue;
      const track = transceiver.receiver.track;
      const sub = this.subscriptions.get(mid);
      const peerId = sub?.peerId ?? this.#streamIdByMid.get(mid);
      if (!peerId || !this.participants.has(peerId)) continue;
      wanted.set(mid, {
        peerId,
        publicationId: sub?.publicationId ?? `${peerId}/${track.id}`,
        mid,
        track,
        kind: sub?.kind ?? /** @type {'audio' | 'video'} */ (track.kind),
        source: sub?.source ?? (track.kind === 'audio' ? 'microphone' : 'camera'),
        muted: !!sub?.muted,
      });
    }
    for (const [mid, remote] of [...this.#active]) {
      const next = wanted.get(mid);
      if (!next || next.publicationId !== remote.publicationId || next.peerId !== remote.peerId) {
        this.#unsubscribe(mid);
      }
    }
    for (const [mid, remote] of wanted) {
      if (this.#active.has(mid)) continue;
      this.#active.set(mid, remote);
      this.participants.get(remote.peerId)?.tracks.set(remote.publicationId, remote);
      this.emit('trackSubscribed', remote);
    }
  }

  /** @param {string} mid */
  #unsubscribe(mid) {
    const remote = this.#active.get(mid);
    if (!remote) return;
    this.#active.delete(mid);
    this.participants.get(remote.peerId)?.tracks.delete(remote.publicationId);
    this.emit('trackUnsubscribed', remote);
  }

  // --- ICE ----------------------------------------------------------------------------------

  /**
   * @param {RTCPeerConnection} pc
   * @param {Transport} transport
   */
  #watchPc(pc, transport) {
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
   * @param {{type: 'offer' | 'answer', tracks?: {trackId: string, source: Source}[]}} msg
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
  const res = await fetch(new URL('/auth/token', base), {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ userId, room }),
  });
  const body = await res.json().catch(() => null);
  if (!res.ok || typeof body?.token !== 'string') {
    const code = body?.error?.code ?? (res.status === 401 ? 'unauthorized' : 'bad_request');
    throw new SwitchboardError(code, body?.error?.message ?? `token request failed (${res.status})`);
  }
  return body.token;
}

/**
 * @param {boolean} audio
 * @param {boolean} video
 * @returns {Promise<MediaStream>}
 */
async function captureMedia(audio, video) {
  try {
    return await navigator.mediaDevices.getUserMedia({ audio, video });
  } catch (err) {
    const reason = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
    throw new SwitchboardError('media_unavailable', `cannot use camera or microphone (${reason})`);
  }
}
