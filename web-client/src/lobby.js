// Switchboard SDK: the lobby (docs/protocol.md, section 12). Be seen online, see who else is,
// call one of them; an accepted call hands each side a room and a token to join it with a Room.
//
//   const lobby = new Lobby();
//   lobby.on('online', ({ peerId, name }) => ...);          // also lobby.people
//   lobby.on('incomingCall', ({ callId, name }) => lobby.accept(callId));
//   lobby.on('callAccepted', ({ room, token }) => new Room().connect(url, { room, name, token }));
//   lobby.on('callEnded', ({ reason, name }) => ...);       // declined, busy, unavailable, timeout, cancelled
//   await lobby.connect(location.origin, { name: 'Alice' });
//   const callId = await lobby.call(bobPeerId);             // rings; lobby.cancel(callId)
//
// The lobby socket stays open during a call: more calls can come (they find you `busy` while
// you are in the call's room), and `call(peerId, { room })` invites someone into the call.
// A lost socket is reopened by itself for 30 s (`reconnecting`, then `reconnected` with the list
// of who is online afresh, or `disconnected`); a call that rang meanwhile is gone.

import { Emitter } from './emitter.js';
import { SwitchboardError, withTimeout } from './errors.js';
import { SignalingSocket, fetchToken, retryFor } from './signaling.js';

/** How long the lobby keeps trying to get back online after losing the server. */
const RECONNECT_WINDOW_MS = 30_000;

/**
 * @typedef {object} OnlinePerson
 * @property {string} peerId  the lobby id
 * @property {string} name
 *
 * @typedef {object} RingingCall  The call that rings now, made or received (at most one).
 * @property {string} callId
 * @property {string} peerId  the other side
 * @property {string} name  the other side's name
 * @property {'outgoing' | 'incoming'} direction
 *
 * @typedef {'declined' | 'busy' | 'unavailable' | 'timeout' | 'cancelled'} CallEndReason
 *
 * @typedef {object} LobbyOptions
 * @property {string} name  display name, unique in the lobby; also the userId of a minted token
 * @property {string} [token]  a token your backend minted with the `lobby` grant (a server with
 *   API keys mints none for pages); otherwise one is asked of `/auth/token`
 * @property {number} [timeoutMs=15000]
 */

/** Who is online, and calls between them. */
export class Lobby extends Emitter {
  /** @type {'new' | 'connecting' | 'online' | 'reconnecting' | 'closed'} */ state = 'new';
  /** Your id in the lobby. @type {string | null} */ peerId = null;
  /** @type {string | null} */ name = null;
  /** Everyone else online, by lobby id. @type {Map<string, OnlinePerson>} */ people = new Map();
  /** @type {RingingCall | null} */ ringing = null;
  /** Replies awaited, by the request's type. @type {Map<string, {replyType: string, resolve: (msg: any) => void, reject: (err: Error) => void}>} */
  #waiting = new Map();
  /** What going online again needs. @type {{base: URL, name: string, token?: string, timeoutMs: number} | null} */
  #session = null;
  #socket = new SignalingSocket({
    message: (msg) => this.#handle(msg),
    closed: () => this.#reconnect(),
    failed: (type, err) => console.error(`switchboard: handling \`${type}\` failed`, err),
    invalid: () => console.error('switchboard: the server sent something that is not JSON'),
  });

  /**
   * Goes online.
   * @param {string} serverUrl
   * @param {LobbyOptions} options
   */
  async connect(serverUrl, { name, token, timeoutMs = 15000 }) {
    if (this.state !== 'new') throw new Error('Lobby.connect may be called once');
    this.state = 'connecting';
    this.#session = { base: new URL(serverUrl), name, token, timeoutMs };
    try {
      await this.#enter();
      this.state = 'online';
    } catch (err) {
      this.#close(err instanceof SwitchboardError ? err.code : 'connect_failed');
      throw err;
    }
  }

  /** Opens the socket and enters the lobby: who is online comes afresh. */
  async #enter() {
    const session = /** @type {{base: URL, name: string, token?: string, timeoutMs: number}} */ (this.#session);
    const token = session.token ?? (await fetchToken(session.base, session.name, 'lobby', { lobby: true }));
    let node = session.base;
    let joined;
    // In a cluster, one node hosts the lobby: `redirect` says which (3 hops at most).
    for (let hops = 0; ; hops++) {
      await this.#socket.open(node, token);
      joined = await withTimeout(this.#request('lobby', { type: 'lobby', name: session.name }, 'lobby_joined'), session.timeoutMs, 'entering the lobby');
      if (joined?.type !== 'redirect') break;
      if (hops >= 3) throw new SwitchboardError('redirect', `more than 3 redirects, the last to ${joined.url}`);
      node = new URL(String(joined.url), session.base);
    }
    this.peerId = joined.peerId;
    this.name = joined.name;
    this.people.clear();
    for (const person of joined.online) this.people.set(person.peerId, { peerId: person.peerId, name: person.name });
  }

  /** The socket was lost while online: back in within the window, or gone. */
  async #reconnect() {
    if (this.state !== 'online') return;
    this.state = 'reconnecting';
    this.ringing = null;
    this.emit('reconnecting', undefined);
    const stopped = () => this.state !== 'reconnecting';
    const result = await retryFor(RECONNECT_WINDOW_MS, () => this.#enter(), stopped, () => this.#socket.drop());
    if (!result.ok) {
      if (!result.stopped) this.#close('socket');
    } else if (!stopped()) {
      this.state = 'online';
      this.emit('reconnected', undefined);
    }
  }

  /**
   * Calls someone online: into a new room of two, or into `room` (a call you are in). Resolves
   * with the call's id once it rings (`calling`); what follows comes as `callAccepted` or
   * `callEnded`.
   * @param {string} peerId
   * @param {{room?: string}} [options]
   * @returns {Promise<string>}
   */
  async call(peerId, { room } = {}) {
    const calling = await withTimeout(this.#request('call', { type: 'call', peerId, ...(room ? { room } : {}) }, 'calling'), 10_000, 'calling');
    return calling.callId;
  }

  /** @param {string} callId */
  accept(callId) {
    this.#socket.send({ type: 'accept_call', callId });
  }

  /** @param {string} callId */
  decline(callId) {
    this.#socket.send({ type: 'decline_call', callId });
  }

  /** @param {string} callId */
  cancel(callId) {
    this.#socket.send({ type: 'cancel_call', callId });
  }

  /** Goes offline; a call of yours that rings ends. */
  leave() {
    if (this.state === 'closed') return;
    this.#socket.send({ type: 'leave' });
    this.#close('left');
  }

  /**
   * Sends `msg` and waits for the reply of `replyType` (or an `error` answering `type`).
   * @param {string} type
   * @param {object} msg
   * @param {string} replyType
   * @returns {Promise<any>}
   */
  #request(type, msg, replyType) {
    return new Promise((resolve, reject) => {
      this.#waiting.get(type)?.reject(new SwitchboardError('superseded', `a newer \`${type}\` was sent`));
      this.#waiting.set(type, { replyType, resolve, reject });
      this.#socket.send(msg);
    });
  }

  /**
   * Hands a reply to the request waiting for it.
   * @param {any} msg
   */
  #settle(msg) {
    for (const [type, waiter] of this.#waiting) {
      if (waiter.replyType !== msg.type) continue;
      this.#waiting.delete(type);
      waiter.resolve(msg);
      return;
    }
  }

  /** @param {any} msg */
  #handle(msg) {
    switch (msg.type) {
      case 'redirect': {
        // (cluster) the lobby lives on another node: `#enter` goes there.
        const waiter = this.#waiting.get('lobby');
        if (!waiter) break;
        this.#waiting.delete('lobby');
        this.#socket.drop(1000);
        waiter.resolve(msg);
        break;
      }
      case 'lobby_joined':
        this.#settle(msg);
        break;
      case 'online': {
        const person = { peerId: msg.peerId, name: msg.name };
        this.people.set(person.peerId, person);
        this.emit('online', person);
        break;
      }
      case 'offline': {
        const person = this.people.get(msg.peerId);
        this.people.delete(msg.peerId);
        if (person) this.emit('offline', person);
        break;
      }
      case 'calling': {
        const name = this.people.get(msg.peerId)?.name ?? msg.peerId;
        this.ringing = { callId: msg.callId, peerId: msg.peerId, name, direction: 'outgoing' };
        this.emit('calling', this.ringing);
        this.#settle(msg);
        break;
      }
      case 'incoming_call':
        this.ringing = { callId: msg.callId, peerId: msg.peerId, name: msg.name, direction: 'incoming' };
        this.emit('incomingCall', this.ringing);
        break;
      case 'call_accepted': {
        const call = this.ringing?.callId === msg.callId ? this.ringing : null;
        if (call) this.ringing = null;
        const name = this.people.get(msg.peerId)?.name ?? call?.name ?? msg.peerId;
        this.emit('callAccepted', { callId: msg.callId, peerId: msg.peerId, name, room: msg.room, token: msg.token });
        break;
      }
      case 'call_ended': {
        const call = this.ringing?.callId === msg.callId ? this.ringing : null;
        if (call) this.ringing = null;
        this.emit('callEnded', {
          callId: msg.callId,
          reason: /** @type {CallEndReason} */ (msg.reason),
          peerId: call?.peerId ?? null,
          name: call?.name ?? null,
          direction: call?.direction ?? 'outgoing',
        });
        break;
      }
      case 'error': {
        const err = new SwitchboardError(msg.code, msg.message, msg.requestType);
        const waiter = msg.requestType ? this.#waiting.get(msg.requestType) : undefined;
        if (waiter) {
          this.#waiting.delete(msg.requestType);
          waiter.reject(err);
        } else {
          this.emit('error', { code: msg.code, message: msg.message, requestType: msg.requestType });
        }
        break;
      }
      default:
        break;
    }
  }

  /** @param {string} reason */
  #close(reason) {
    if (this.state === 'closed') return;
    const wasOnline = this.state === 'online' || this.state === 'reconnecting';
    this.state = 'closed';
    this.#socket.drop(1000);
    for (const waiter of this.#waiting.values()) waiter.reject(new SwitchboardError('closed', 'the lobby connection closed'));
    this.#waiting.clear();
    this.people.clear();
    this.ringing = null;
    if (wasOnline) this.emit('disconnected', { reason });
  }
}
